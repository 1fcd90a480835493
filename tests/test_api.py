"""The app through Litestar's TestClient (lifespan running) and a live uvicorn server, on the tiny model."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import numpy as np
import pytest
from PIL import Image

from conftest import burst_behind_a_blocker, live_server, metric, serving, wait_for
from zimage_server.api.requests import generation_spec
from zimage_server.api.schemas import GenerationRequest
from zimage_server.runner import ModelRunner

URL = "/v1/images/generations"


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    assert "Traceback" not in response.text
    return error


def test_generation_returns_openai_shape_with_seeded_pngs(client):
    response = client.post(URL, json={"prompt": "a red chair", "size": "128x64", "n": 2, "seed": 10})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"created", "data", "output_format", "size"}
    assert body["output_format"] == "png" and body["size"] == "128x64"
    assert [item["seed"] for item in body["data"]] == [10, 11]
    assert all(item["revised_prompt"] is None for item in body["data"])
    images = [decode(item["b64_json"]) for item in body["data"]]
    assert all(image.format == "PNG" and image.size == (128, 64) for image in images)
    parameters = images[0].text["parameters"]
    assert parameters.startswith("a red chair\n")
    assert "Steps: 8" in parameters and "Seed: 10" in parameters and "Size: 128x64" in parameters
    assert "Model: z-image-turbo" in parameters


def test_same_seed_same_image_and_random_seed_is_reported(client):
    request = {"prompt": "a cat", "size": "64x64", "seed": 123}
    first, second = (decode(client.post(URL, json=request).json()["data"][0]["b64_json"]) for _ in range(2))
    assert np.array_equal(np.asarray(first), np.asarray(second))
    unseeded = client.post(URL, json={"prompt": "a cat", "size": "64x64"}).json()["data"][0]
    assert isinstance(unseeded["seed"], int) and unseeded["seed"] >= 0


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_lossy_output_formats(client, output_format):
    body = client.post(
        URL, json={"prompt": "a cat", "size": "64x64", "output_format": output_format, "output_compression": 50}
    ).json()
    assert body["output_format"] == output_format
    assert decode(body["data"][0]["b64_json"]).format == output_format.upper()


@pytest.mark.parametrize("media_type, pil_format", [("image/png", "PNG"), ("image/jpeg", "JPEG"), ("image/webp", "WEBP")])
def test_accept_header_gets_raw_image_bytes_with_seed_header(client, media_type, pil_format):
    response = client.post(URL, json={"prompt": "a cat", "size": "64x64", "seed": 5}, headers={"Accept": media_type})
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type and response.headers["x-seed"] == "5"
    assert Image.open(io.BytesIO(response.content)).format == pil_format


def test_ignored_openai_fields_and_model_names_are_accepted(client):
    response = client.post(
        URL,
        json={
            "prompt": "a cat",
            "size": "auto",
            "model": "z-image-turbo",
            "quality": "high",
            "style": "vivid",
            "background": "auto",
            "moderation": "low",
            "user": "u1",
            "num_inference_steps": 1,
        },
    )
    assert response.status_code == 200
    assert response.json()["size"] == "1024x1024"


@pytest.mark.parametrize(
    "payload, param",
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * 32_001}, "prompt"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 5}, "n"),
        ({"prompt": "a", "n": 1.5}, "n"),
        ({"prompt": "a", "size": "big"}, "size"),
        ({"prompt": "a", "size": "100x100"}, "size"),
        ({"prompt": "a", "size": "32x32"}, "size"),
        ({"prompt": "a", "size": "4096x64"}, "size"),
        ({"prompt": "a", "size": "2048x2048"}, None),  # within limits: must NOT be rejected (checked below)
        ({"prompt": "a", "response_format": "gif"}, "response_format"),
        ({"prompt": "a", "output_format": "gif"}, "output_format"),
        ({"prompt": "a", "output_compression": 101}, "output_compression"),
        ({"prompt": "a", "model": "midjourney-v6"}, "model"),  # OpenAI names are aliases (Z_IMAGE_MODEL_ALIASES)
        ({"prompt": "a", "seed": -1}, "seed"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "guidance_scale": -1}, "guidance_scale"),
        ({"prompt": "a", "max_sequence_length": 513}, "max_sequence_length"),
        ({"prompt": "a", "cfg_truncation": 2}, "cfg_truncation"),
    ],
)
def test_invalid_values_get_400_naming_the_field(client, payload, param):
    server = client.app.state.server
    if param is None:
        # The largest size passes the default server's validation (checked without the seconds a
        # 2048x2048 generation takes here); a small max_pixels server refuses it with 400.
        spec, _ = generation_spec(msgspec.convert(payload, GenerationRequest), server)
        assert (spec.params.width, spec.params.height) == (2048, 2048)
        with serving(server.settings, server.runner, max_pixels=1024 * 1024) as small:
            assert_error(small.post(URL, json=payload), 400, "size")
        return
    assert_error(client.post(URL, json=payload), 400, param)
    assert client.get("/ready").status_code == 200


def test_malformed_requests_get_the_envelope(client):
    assert_error(client.post(URL, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(URL, content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"}), 400)
    assert_error(client.post(URL, content=b"prompt=a", headers={"content-type": "text/plain"}), 415)
    # The generations body may carry a base64 control image, so it has the upload limit.
    too_big = client.app.state.server.settings.max_upload_bytes + 1
    assert_error(client.post(URL, json={"prompt": "x" * too_big}), 413)
    assert_error(client.get("/v1/nothing-here"), 404)
    assert_error(client.get(URL), 405)


def test_raw_image_mode_needs_n_1(client):
    response = client.post(URL, json={"prompt": "a", "size": "64x64", "n": 2}, headers={"Accept": "image/png"})
    assert_error(response, 400, "n")


def test_models_health_ready_and_openapi(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ready").json()["status"] == "ready"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "z-image-turbo"
    # The variant table's defaults, which the page fills its fields from.
    assert models["data"][0]["defaults"] == {"num_inference_steps": 8, "guidance_scale": 0.0, "takes_mask": True}
    schema = client.get("/schema/openapi.json").json()
    assert URL in schema["paths"]


def test_not_ready_is_503(settings):
    from litestar.testing import TestClient

    from zimage_server.api import create_app

    # Without entering the lifespan the model never loads, as during start-up.
    client = TestClient(create_app(settings))
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 503
    error = assert_error(client.post(URL, json={"prompt": "a"}), 503)
    assert error["code"] == "not_ready"


def post_json(base: str, payload: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(base + URL, json=payload, timeout=timeout)


def test_concurrent_compatible_requests_share_one_pipeline_call_with_their_own_images(settings, runner):
    prompts = ["a cat", "a watercolor of mountains", "an astronaut portrait"]
    solo = {}
    with live_server(settings, runner) as base:
        for index, prompt in enumerate(prompts):
            body = post_json(base, {"prompt": prompt, "size": "64x64", "seed": index}).json()
            solo[prompt] = np.asarray(decode(body["data"][0]["b64_json"]), dtype=np.int16)
        bodies = [{"prompt": prompt, "size": "64x64", "seed": index} for index, prompt in enumerate(prompts)]
        responses, calls = burst_behind_a_blocker(runner, base, "/v1/images/generations", bodies)
    assert calls == 1  # one call for all three
    for prompt, response in zip(prompts, responses, strict=True):
        image = np.asarray(decode(response.json()["data"][0]["b64_json"]), dtype=np.int16)
        assert np.abs(image - solo[prompt]).max() <= 1


def test_full_queue_answers_429_with_retry_after(settings, runner):
    with live_server(settings, runner, max_queue=2) as base, ThreadPoolExecutor(4) as pool:
        runner.lock.acquire()
        try:
            running = pool.submit(post_json, base, {"prompt": "running", "size": "64x64"})
            wait_for(lambda: metric(base, "zimage_running_images") == 1)
            queued = pool.submit(post_json, base, {"prompt": "queued", "size": "64x64", "n": 2})
            wait_for(lambda: metric(base, "zimage_queue_requests") == 1)
            refused = post_json(base, {"prompt": "refused", "size": "64x64"})
        finally:
            runner.lock.release()
        error = assert_error(refused, 429)
        assert error["code"] == "queue_full" and refused.headers["retry-after"]
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_request_waiting_past_its_timeout_gets_504_and_the_server_recovers(settings, runner):
    with live_server(settings, runner, request_timeout_s=0.5) as base:
        runner.lock.acquire()
        try:
            error = assert_error(post_json(base, {"prompt": "slow", "size": "64x64"}), 504)
        finally:
            runner.lock.release()
        assert error["code"] == "timeout"
        assert post_json(base, {"prompt": "fine", "size": "64x64"}).status_code == 200


def test_a_client_that_leaves_while_queued_is_dropped_not_computed(settings, runner):
    with live_server(settings, runner) as base:
        runner.lock.acquire()
        try:
            calls_before = runner.calls
            running = threading.Thread(target=post_json, args=(base, {"prompt": "running", "size": "64x64"}))
            running.start()
            wait_for(lambda: metric(base, "zimage_running_images") == 1)
            with pytest.raises(httpx.ReadTimeout):
                post_json(base, {"prompt": "impatient", "size": "64x64"}, timeout=0.5)
            # The server noticed the hang-up: the queue no longer counts the job.
            wait_for(lambda: metric(base, "zimage_queue_requests") == 0)
        finally:
            runner.lock.release()
        running.join(timeout=30)
        wait_for(lambda: metric(base, "zimage_requests_dropped") == 1)  # the worker took it off, unrun
        assert runner.calls == calls_before + 1  # "impatient" never ran


class FailingRunner(ModelRunner):
    """The real runner, with a device error injected into its next call."""

    fail_next = True

    def run_call(self, params, rows):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("CUDA error: an illegal memory access at 0xdeadbeef")
        return super().run_call(params, rows)


def test_a_failing_batch_is_a_generic_500_and_the_server_stays_up(settings, runner):
    failing = FailingRunner(runner.pipeline, settings, runner.device, runner.dtype)
    with serving(settings, failing) as client:
        error = assert_error(client.post(URL, json={"prompt": "a", "size": "64x64"}), 500)
        assert "0xdeadbeef" not in error["message"] and "CUDA" not in error["message"]
        assert client.get("/ready").status_code == 200
        assert client.post(URL, json={"prompt": "a", "size": "64x64"}).status_code == 200


def test_openai_sdk_generates_images(settings, runner):
    from openai import OpenAI

    with live_server(settings, runner) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        result = sdk.images.generate(
            prompt="a lighthouse", size="64x64", n=2, extra_body={"seed": 3, "num_inference_steps": 2}
        )
    assert len(result.data) == 2
    assert decode(result.data[0].b64_json).size == (64, 64)


def test_a_model_call_that_returns_too_few_images_is_a_500_and_the_next_request_succeeds(settings, runner):
    from zimage_server.faults import FaultInjector

    faulty = ModelRunner(runner.pipeline, settings, runner.device, runner.dtype, faults=FaultInjector())
    with serving(settings, faulty) as client:
        error = assert_error(client.post(URL, json={"prompt": "short [[fault:short]]", "size": "64x64", "n": 2}), 500)
        assert error["type"] == "server_error" and "request id" in error["message"]
        assert client.get("/ready").status_code == 200
        assert len(client.post(URL, json={"prompt": "fine", "size": "64x64", "n": 2}).json()["data"]) == 2


def test_a_dead_batcher_worker_turns_ready_503_and_stops_the_server(settings, runner):
    stopped = threading.Event()
    with serving(settings, runner) as client:
        server = client.app.state.server
        server.stop_server = stopped.set  # what the CLI points at uvicorn (exits with EXIT_WORKER_DIED)
        client.blocking_portal.call(kill_worker, server.batcher)
        assert stopped.wait(5)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "broken"
        assert assert_error(client.post(URL, json={"prompt": "a", "size": "64x64"}), 503)["code"] == "shutting_down"
        assert "zimage_ready 0.0" in client.get("/metrics").text


async def kill_worker(batcher) -> None:
    batcher._worker.cancel()  # what a bug in the worker loop itself would do
    await asyncio.sleep(0.01)
