"""Bad input against a real server process: schemathesis fuzzing the server's own OpenAPI schema,
then a hand-written table of hostile requests. Never a 5xx; every refusal is a 4xx in the OpenAI
envelope; the server is ready afterwards.

The server runs with a small Z_IMAGE_MAX_PIXELS so the fuzzer's valid requests stay cheap (the
default size, 1024x1024, is refused there).
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from attack_support import GENERATIONS, ServerProcess, assert_envelope
from test_images import encoded, gif_bomb, picture, png_claiming

pytestmark = pytest.mark.attack

FUZZ_EXAMPLES = 60
EDITS = "/v1/images/edits"
UPLOAD_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    process = ServerProcess(
        models_dir,
        tmp_path_factory.mktemp("input") / "server.log",
        env={
            "Z_IMAGE_MAX_PIXELS": str(128 * 128),
            "Z_IMAGE_REQUEST_TIMEOUT_S": "30",
            "Z_IMAGE_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        },
    )
    try:
        yield process.start()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(server.url + "/schema/openapi.json")


# The JSON routes; multipart edits get the hand-written table below.
JSON_OPERATIONS = [
    ("POST", GENERATIONS),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/ready"),
    # The AUTOMATIC1111 dialect's JSON routes (their hand-written table is in tests/test_sdapi.py).
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/img2img"),
    ("POST", "/sdapi/v1/options"),
    ("GET", "/sdapi/v1/progress"),
]


FUZZ_RUNS = [
    (method, path, mode)
    for method, path in JSON_OPERATIONS
    # Operations without parameters or body have no invalid input to generate.
    for mode in ([GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if method == "POST" else [GenerationMode.POSITIVE])
]


@pytest.mark.parametrize("method, path, mode", FUZZ_RUNS, ids=lambda value: getattr(value, "value", value))
def test_fuzzing_the_openapi_schema_finds_no_server_error(api_schema, method, path, mode):
    operation = api_schema[path][method]
    examples = FUZZ_EXAMPLES if method == "POST" else 5

    # schemathesis' own pytest plugin does not run under pytest 9 yet; its strategies do.
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def no_server_error(case):
        response = case.call(timeout=60)
        case.validate_response(response, checks=[not_a_server_error])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    no_server_error()


JSON = {"content-type": "application/json"}


def raw(body: bytes | str, content_type: str | None = "application/json") -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body.encode() if isinstance(body, str) else body, "headers": headers}


def as_json(payload) -> dict:
    return raw(json.dumps(payload))


HOSTILE_GENERATIONS = {
    # wrong types
    "prompt is a number": as_json({"prompt": 5}),
    "prompt is a list": as_json({"prompt": ["a", "b"]}),
    "prompt is null": as_json({"prompt": None}),
    "n is a string": as_json({"prompt": "a", "n": "two"}),
    "n is a float": as_json({"prompt": "a", "n": 1.5}),
    "n is a bool": as_json({"prompt": "a", "n": True}),
    "size is a number": as_json({"prompt": "a", "size": 64}),
    "seed is a string": as_json({"prompt": "a", "seed": "42"}),
    "steps is an object": as_json({"prompt": "a", "num_inference_steps": {"x": 1}}),
    "body is a list": as_json([{"prompt": "a"}]),
    "body is a string": as_json("a cat"),
    "body is null": raw("null"),
    # huge values
    "huge prompt": as_json({"prompt": "x" * 40_000}),
    "huge negative prompt": as_json({"prompt": "a", "negative_prompt": "x" * 40_000}),
    "absurd size": as_json({"prompt": "a", "size": "99999999x99999999"}),
    "zero size": as_json({"prompt": "a", "size": "0x0"}),
    "negative size": as_json({"prompt": "a", "size": "-64x64"}),
    "size with junk": as_json({"prompt": "a", "size": "64x64; DROP TABLE"}),
    "absurd n": as_json({"prompt": "a", "n": 10**6}),
    "n beyond 64 bits": raw('{"prompt": "a", "n": 100000000000000000000000000000}'),
    "seed beyond 64 bits": raw('{"prompt": "a", "seed": 1e400}'),
    "negative seed": as_json({"prompt": "a", "seed": -1}),
    "absurd steps": as_json({"prompt": "a", "num_inference_steps": 10**9}),
    "infinite guidance": raw('{"prompt": "a", "guidance_scale": 1e999}'),
    "NaN guidance": raw('{"prompt": "a", "guidance_scale": NaN}'),
    # encodings and framing
    "invalid UTF-8": raw(b'{"prompt": "\xff\xfe\xfa"}'),
    "lone surrogate escape": raw('{"prompt": "\\ud800", "size": "99x99"}'),
    "truncated JSON": raw('{"prompt": "a'),
    "empty body": raw(b""),
    "deeply nested JSON": raw('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "UTF-16 body": raw('{"prompt": "a"}'.encode("utf-16")),
    "oversized body": raw(json.dumps({"prompt": "x" * (UPLOAD_LIMIT + 1024)})),
    # content types
    "text/plain": raw('{"prompt": "a"}', "text/plain"),
    "no content type": raw('{"prompt": "a"}', None),
    "form-urlencoded": raw("prompt=a", "application/x-www-form-urlencoded"),
    "multipart to the JSON route": raw(
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na\r\n--b--\r\n', "multipart/form-data; boundary=b"
    ),
    "malformed multipart": raw(b"--nope\r\n\r\n\x00\x01", "multipart/form-data"),
}


@pytest.mark.parametrize("name", list(HOSTILE_GENERATIONS))
def test_hostile_generation_requests_get_a_4xx_envelope(server, name):
    response = httpx.post(server.url + GENERATIONS, timeout=60, **HOSTILE_GENERATIONS[name])
    assert_envelope(response)


PNG = encoded(picture())


def multipart(image: bytes | None = PNG, filename: str = "image.png", **fields) -> dict:
    """httpx multipart arguments as the OpenAI SDK sends them, with `fields` overriding the defaults."""
    values = {"prompt": "a cat", "num_inference_steps": "2"} | fields
    parts = [(key, (None, value)) for key, value in values.items() if value is not None]
    if image is not None:
        parts.append(("image", (filename, image, "image/png")))
    return {"files": parts}


def multipart_raw(body: bytes, content_type: str = "multipart/form-data; boundary=b") -> dict:
    return raw(body, content_type)


PART = b'--b\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'

HOSTILE_EDITS = {
    # content types and framing
    "JSON to the multipart route": as_json({"prompt": "a", "image": "aGVsbG8="}),
    "no content type": raw(b"prompt=a", None),
    "multipart without a boundary": multipart_raw(PART % (b"prompt", b"a") + b"--b--\r\n", "multipart/form-data"),
    "truncated multipart": multipart_raw(
        b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n' + PNG[:100]
    ),
    "garbage multipart": multipart_raw(b"\x00\x01\x02 not a form at all \xff" * 50),
    "empty multipart": multipart_raw(b"--b--\r\n"),
    "invalid UTF-8 in a field name": multipart_raw(PART % (b"\xff\xfe", b"a") + b"--b--\r\n"),
    "invalid UTF-8 in the prompt": multipart_raw(
        PART % (b"prompt", b"\xff\xfe\xfa")
        + b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        + PNG
        + b"\r\n--b--\r\n"
    ),
    "oversized body": multipart(image=b"\x89PNG" + b"\x00" * (UPLOAD_LIMIT + 1024)),
    # missing or hostile parts
    "no image": multipart(image=None),
    "no prompt": multipart(prompt=None),
    "empty prompt": multipart(prompt=""),
    "huge prompt": multipart(prompt="x" * 40_000),
    "a text file as the image": multipart(image=b"hello, I am not a picture", filename="notes.txt"),
    "a zero-byte image": multipart(image=b""),
    "a truncated PNG": multipart(image=PNG[: len(PNG) // 2]),
    "a PNG claiming 50000x50000": multipart(image=png_claiming(50_000, 50_000)),
    "a GIF bomb": multipart(image=gif_bomb(), filename="bomb.gif"),
    # wrong values, as form strings
    "n is not a number": multipart(n="two"),
    "absurd n": multipart(n="1000000"),
    "n beyond 64 bits": multipart(n="1" + "0" * 40),
    "absurd size": multipart(size="99999999x99999999"),
    "strength out of range": multipart(strength="2"),
    "strength is NaN": multipart(strength="nan"),
    "negative seed": multipart(seed="-1"),
    "steps is a word": multipart(num_inference_steps="many"),
    "unknown output format": multipart(output_format="bmp"),
}


@pytest.mark.parametrize("name", list(HOSTILE_EDITS))
def test_hostile_edit_requests_get_a_4xx_envelope(server, name):
    response = httpx.post(server.url + EDITS, timeout=60, **HOSTILE_EDITS[name])
    assert_envelope(response)


def test_hostile_methods_paths_and_headers(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert_envelope(client.get(GENERATIONS), 405)
        assert_envelope(client.delete("/v1/models"), 405)
        assert_envelope(client.get("/v1/../../etc/passwd"), 404)
        assert_envelope(client.get("/v1/" + "a" * 8000), 404)
        assert_envelope(client.post(GENERATIONS, json={"prompt": "a"}, headers={"Accept": "image/png", "x": "y" * 4000}))
        # A hostile request id is replaced, not echoed.
        response = client.get("/health", headers={"X-Request-ID": "evil\tid with spaces" + "x" * 300})
        assert response.headers["x-request-id"].startswith("req_")


def test_the_server_is_still_ready_and_serving_after_the_attacks(server):
    assert server.ready()
    response = httpx.post(
        server.url + GENERATIONS, json={"prompt": "still here", "size": "64x64", "num_inference_steps": 2}, timeout=60
    )
    assert response.status_code == 200
    edit = httpx.post(server.url + EDITS, timeout=60, **multipart())
    assert edit.status_code == 200, edit.text[:300]
    assert "Traceback" not in server.log()
