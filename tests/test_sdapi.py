"""The AUTOMATIC1111 API (/sdapi/v1): webuiapi as an outside client, the payloads SillyTavern and
Open WebUI send, the sampling policy both ways, Basic auth, progress, hostile bodies; and the
OpenAI model aliases."""

from __future__ import annotations

import base64
import functools
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from conftest import assert_envelope, burst_of_sends, live_server, serving, wait_for
from test_api_loras import loras  # noqa: F401 - the fixture that writes the LoRA folder's files
from test_images import encoded, gif_bomb, picture, png_claiming

TXT2IMG = "/sdapi/v1/txt2img"
IMG2IMG = "/sdapi/v1/img2img"
OPTIONS = "/sdapi/v1/options"
KEY = "sk-test-0123456789"
# Small and quick: what a test needs unless it checks the sampling policy.
FAST = {"width": 64, "height": 64, "steps": 2, "cfg_scale": 0}


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def b64_png(image: Image.Image) -> str:
    return base64.b64encode(encoded(image)).decode()


def white_left_half(width: int = 64, height: int = 64) -> Image.Image:
    """An A1111 mask: white (repaint) on the left half, black elsewhere, no alpha."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    return mask


def assert_sdapi_error(response: httpx.Response, status: int | None = None) -> dict:
    """Our envelope plus A1111's `detail`, as FastAPI clients read it."""
    if status is None:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    else:
        assert response.status_code == status, response.text[:300]
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["detail"] == body["error"]["message"] and "Traceback" not in response.text
    return body["error"]


# -- webuiapi, the common A1111 client, against a live server ----------------------------------


@pytest.fixture(scope="module")
def fast_server(settings, runner):
    """A live server that runs the steps and CFG the client sends, so tests can ask for 2 steps."""
    with live_server(settings, runner, sdapi_sampling="client") as base:
        yield base


def webui(base: str) -> webuiapi.WebUIApi:
    host, port = base.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def test_webuiapi_txt2img_makes_batch_size_times_n_iter_images_with_consecutive_seeds(fast_server):
    api = webui(fast_server)
    result = api.txt2img(prompt="a red chair", seed=40, batch_size=2, n_iter=2, **FAST)
    assert len(result.images) == 4
    assert all(image.format == "PNG" and image.size == (64, 64) for image in result.images)
    assert result.info["all_seeds"] == [40, 41, 42, 43] and result.info["seed"] == 40
    assert result.info["steps"] == 2 and result.info["sd_model_name"] == "z-image-turbo"
    assert result.info["infotexts"][1] == result.images[1].text["parameters"]
    assert "Seed: 41" in result.info["infotexts"][1]
    assert result.parameters["prompt"] == "a red chair" and result.parameters["batch_size"] == 2
    unseeded = api.txt2img(prompt="a red chair", **FAST)
    assert unseeded.info["seed"] >= 0


def test_webuiapi_img2img_without_and_with_a_mask_repaints_where_the_mask_is_white(fast_server):
    api = webui(fast_server)
    source = picture(seed=3)
    plain = api.img2img(images=[source], prompt="a dog", seed=1, denoising_strength=0.5, **FAST)
    assert len(plain.images) == 1 and plain.images[0].size == (64, 64)
    assert plain.info["denoising_strength"] == 0.5

    def inpainted(seed: int, **fields) -> np.ndarray:
        result = api.img2img(
            images=[source],
            mask_image=white_left_half(),
            prompt="a dog",
            seed=seed,
            denoising_strength=1.0,
            **FAST | fields,
        )
        return np.asarray(result.image, dtype=np.int16)

    # Two seeds differ mostly where the model repainted (the tiny random VAE decodes nothing like
    # the input, so the input itself is no yardstick; the kept area still differs a little, as
    # encoding samples the VAE's posterior with the seed). The outer quarters sit away from the
    # mask's edge, which the decoder blends.
    for invert, (repainted, kept) in ((0, (slice(0, 16), slice(48, 64))), (1, (slice(48, 64), slice(0, 16)))):
        first, second = inpainted(1, inpainting_mask_invert=invert), inpainted(2, inpainting_mask_invert=invert)
        change = np.abs(first - second)
        assert change[:, kept].mean() * 2 < change[:, repainted].mean(), invert


def test_webuiapi_options_models_samplers_and_loras(fast_server, loras):  # noqa: F811
    api = webui(fast_server)
    options = api.get_options()
    assert options["sd_model_checkpoint"] == "z-image-turbo" and options["samples_format"] == "png"
    assert api.util_get_model_names() == ["z-image-turbo"]
    [model] = api.get_sd_models()
    assert set(model) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert model["sha256"].startswith(model["hash"]) and len(model["sha256"]) == 64
    assert options["sd_checkpoint_hash"] == model["sha256"]
    # Clients post the whole dict back to switch models: the served one is fine, another is a 400.
    assert api.set_options(options | {"sd_model_checkpoint": f"z-image-turbo [{model['hash']}]"}) is None
    refused = httpx.post(fast_server + OPTIONS, json={"sd_model_checkpoint": "sdxl_base.safetensors"})
    assert "one model per process" in assert_sdapi_error(refused, 400)["message"]
    assert api.util_get_current_model() == "z-image-turbo"
    assert api.util_get_sampler_names() == ["Euler"]
    assert {"pixel-art", "styles/ink"} <= {entry["name"] for entry in api.get_loras()}
    assert set(api.get_loras()[0]) == {"name", "alias", "path", "metadata"}
    # Without an upscaler folder: the built-in resizes only; the latent modes are always there.
    assert [entry["name"] for entry in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert len(api.get_latent_upscale_modes()) == 6 and api.get_sd_vae() == []
    tagged = api.txt2img(prompt="a cat <lora:pixel-art:0.8>", seed=3, **FAST)
    assert "<lora:pixel-art:0.8>" in tagged.info["infotexts"][0] and "Lora hashes" in tagged.info["infotexts"][0]


def test_webuiapi_with_basic_auth_when_a_key_is_set(settings, runner):
    with live_server(settings, runner, api_key=KEY, sdapi_sampling="client") as base:
        api = webui(base)
        with pytest.raises(RuntimeError) as refused:
            api.txt2img(prompt="a cat", **FAST)
        assert refused.value.args[0] == 401
        response = httpx.get(base + OPTIONS)
        assert response.headers["www-authenticate"].startswith("Basic")
        assert_sdapi_error(response, 401)
        wrong = httpx.get(base + OPTIONS, auth=("user", "wrong"))
        assert_sdapi_error(wrong, 401)
        api.set_auth("anyone", KEY)
        assert len(api.txt2img(prompt="a cat", **FAST).images) == 1
        assert httpx.get(base + OPTIONS, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        # The OpenAI routes keep their Bearer-only rule.
        assert httpx.get(base + "/v1/models", auth=("user", KEY)).status_code == 401


def test_without_a_key_any_authorization_header_is_ignored(client):
    # SillyTavern sends Basic even when unconfigured: with an empty "user:pass" that is "Basic Og==".
    for header in ("Basic Og==", "Basic ", "Bearer whatever", "garbage"):
        assert client.get(OPTIONS, headers={"Authorization": header}).status_code == 200


# -- the payloads other clients send, written from their public source --------------------------


def sillytavern_payload(prompt: str) -> dict:
    """SillyTavern's SD WebUI source: the extension's body, forwarded by its server with url and auth."""
    return {
        "url": "http://127.0.0.1:7860",
        "auth": "",
        "prompt": prompt,
        "negative_prompt": "lowres, bad anatomy, bad hands, text, error, cropped, worst quality",
        "sampler_name": "DPM++ 2M",
        "scheduler": "Automatic",
        "steps": 20,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "hr_additional_modules": [],
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "seed": 77,
        "override_settings": {"CLIP_stop_at_last_layers": 1, "sd_vae": None, "forge_additional_modules": None},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
        "alwayson_scripts": {},
    }


def test_sillytavern_full_payload_with_its_own_keys_and_empty_basic_header(client):
    headers = {"Authorization": "Basic " + base64.b64encode(b":").decode()}
    response = client.post(TXT2IMG, json=sillytavern_payload("a castle on a hill"), headers=headers)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 1
    assert not body["images"][0].startswith("data:")
    info = json.loads(body["info"])
    assert info["seed"] == 77 and info["width"] == 64 and info["sampler_name"] == "Euler"
    # With its job done, the progress poll it runs after switching models sees an idle server.
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert client.post("/sdapi/v1/interrupt").status_code == 200


def test_open_webui_discovers_switches_and_generates(client):
    # Its Automatic1111 engine: read options and models, post the whole options dict back, generate.
    options = client.get(OPTIONS).json()
    model = client.get("/sdapi/v1/sd-models").json()[0]["title"]
    assert client.post(OPTIONS, json=options | {"sd_model_checkpoint": model}).status_code == 200
    payload = {"prompt": "a lighthouse at dusk", "batch_size": 2, "width": 64, "height": 64, "steps": 50}
    response = client.post(TXT2IMG, json=payload | {"negative_prompt": ""}, headers={"authorization": ""})
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    assert len(body["images"]) == 2 and len(json.loads(body["info"])["all_seeds"]) == 2


def test_webuiapi_full_img2img_payload_over_plain_http(client):
    # What webuiapi.img2img posts, data: prefix included, with A1111's every field.
    payload = {
        "init_images": ["data:image/png;base64," + b64_png(picture())],
        "resize_mode": 0,
        "denoising_strength": 0.75,
        "mask_blur": 4,
        "inpainting_fill": 0,
        "inpaint_full_res": True,
        "inpaint_full_res_padding": 0,
        "inpainting_mask_invert": 0,
        "initial_noise_multiplier": 1,
        "prompt": "a cat",
        "styles": [],
        "seed": 5,
        "subseed": -1,
        "subseed_strength": 0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "batch_size": 1,
        "n_iter": 1,
        "steps": 20,
        "cfg_scale": 7.0,
        "image_cfg_scale": 1.5,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "tiling": False,
        "do_not_save_samples": False,
        "do_not_save_grid": False,
        "negative_prompt": "",
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "override_settings": {},
        "override_settings_restore_afterwards": True,
        "sampler_name": "Euler a",
        "scheduler": "automatic",
        "sampler_index": "Euler a",
        "include_init_images": False,
        "script_name": None,
        "script_args": [],
        "send_images": True,
        "save_images": False,
        "alwayson_scripts": {},
    }
    response = client.post(IMG2IMG, json=payload | {"mask": ""})  # an empty mask is none, as A1111 reads it
    assert response.status_code == 200, response.text[:300]
    assert response.json()["parameters"]["init_images"] is None


# -- the sampling policy ------------------------------------------------------------------------


def test_model_policy_runs_the_variants_steps_and_guidance_and_says_so(client):
    request = {"prompt": "a teapot", "seed": 11, "steps": 20, "cfg_scale": 7, "width": 64, "height": 64}
    body = client.post(TXT2IMG, json=request).json()
    info = json.loads(body["info"])
    assert (info["steps"], info["cfg_scale"], info["sampling_policy"]) == (8, 0.0, "model")
    assert "Steps: 8, CFG scale: 0" in info["infotexts"][0]
    openai = client.post("/v1/images/generations", json={"prompt": "a teapot", "seed": 11, "size": "64x64"})
    assert np.array_equal(decode(body["images"][0]), decode(openai.json()["data"][0]["b64_json"]))


def test_client_policy_runs_what_was_sent(settings, runner):
    with serving(settings, runner, sdapi_sampling="client") as client:
        request = {"prompt": "a teapot", "seed": 11, "steps": 3, "cfg_scale": 1.5, "width": 64, "height": 64}
        info = json.loads(client.post(TXT2IMG, json=request).json()["info"])
    assert (info["steps"], info["cfg_scale"], info["sampling_policy"]) == (3, 1.5, "client")


def test_sizes_that_are_multiples_of_8_snap_down_to_16(client):
    body = client.post(TXT2IMG, json={"prompt": "a cat", **FAST, "width": 72, "height": 88}).json()
    info = json.loads(body["info"])
    assert (info["width"], info["height"]) == (64, 80) and decode(body["images"][0]).shape[:2] == (80, 64)


# -- progress ---------------------------------------------------------------------------------


def test_progress_is_idle_then_counts_a_held_call(settings, runner):
    with live_server(settings, runner, sdapi_sampling="client") as base:
        idle = httpx.get(base + "/sdapi/v1/progress").json()
        assert idle["progress"] == 0 and idle["eta_relative"] == 0 and idle["state"]["job_count"] == 0
        with ThreadPoolExecutor(1) as pool:
            runner.lock.acquire()  # the GPU is busy: the request's call waits for it
            try:
                pending = pool.submit(httpx.post, base + TXT2IMG, json={"prompt": "a", **FAST}, timeout=60)
                wait_for(lambda: httpx.get(base + "/sdapi/v1/progress").json()["state"]["job_count"] >= 1)
                held = httpx.get(base + "/sdapi/v1/progress").json()
                assert 0 <= held["progress"] <= 1
            finally:
                runner.lock.release()
            assert pending.result().status_code == 200
        wait_for(lambda: httpx.get(base + "/sdapi/v1/progress").json()["state"]["job_count"] == 0)


def test_progress_reports_the_running_calls_step(client, monkeypatch):
    from zimage_server.api.jobs import JobHandle

    seen = []
    original = JobHandle.on_step

    def watching(self, step, total, latents, previews):
        original(self, step, total, latents, previews)
        seen.append(client.get("/sdapi/v1/progress").json())

    # Polled from the worker thread after each step: what a client polling at that moment sees.
    monkeypatch.setattr(JobHandle, "on_step", watching)
    assert client.post(TXT2IMG, json={"prompt": "a", **FAST, "seed": 1}).status_code == 200
    steps = [(entry["state"]["sampling_step"], entry["state"]["sampling_steps"]) for entry in seen]
    assert steps == [(1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (6, 8), (7, 8), (8, 8)]
    assert [entry["progress"] for entry in seen][:2] == [1 / 8, 2 / 8]


# -- hostile bodies ---------------------------------------------------------------------------


def raw(body: bytes | str, content_type: str | None = "application/json") -> dict:
    headers = {"content-type": content_type} if content_type else {}
    return {"content": body.encode() if isinstance(body, str) else body, "headers": headers}


def as_json(payload) -> dict:
    return raw(json.dumps(payload))


def edit(**fields) -> dict:
    return as_json({"prompt": "a", "init_images": [b64_png(picture())], **FAST} | fields)


GOOD = {"prompt": "a", **FAST}
COMMON_HOSTILE = {
    "not JSON": raw("prompt=a cat"),
    "truncated JSON": raw('{"prompt": "a'),
    "empty body": raw(b""),
    "invalid UTF-8": raw(b'{"prompt": "\xff\xfe"}'),
    "deeply nested JSON": raw('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "body is a list": as_json([GOOD]),
    "body is null": raw("null"),
    "text/plain": raw(json.dumps(GOOD), "text/plain"),
    "no content type": raw(json.dumps(GOOD), None),
    "prompt is a number": as_json(GOOD | {"prompt": 5}),
    "empty prompt": as_json(GOOD | {"prompt": ""}),
    "huge prompt": as_json(GOOD | {"prompt": "x" * 40_000}),
    "width is a list": as_json(GOOD | {"width": [64]}),
    "width is a word": as_json(GOOD | {"width": "wide"}),
    "steps is an object": as_json(GOOD | {"steps": {"x": 1}}),
    "batch_size is a float": as_json(GOOD | {"batch_size": 1.5}),
    "huge width": as_json(GOOD | {"width": 10**9}),
    "width beyond 64 bits": raw('{"prompt": "a", "width": 100000000000000000000000000000}'),
    "negative height": as_json(GOOD | {"height": -64}),
    "zero width": as_json(GOOD | {"width": 0}),
    "width not a multiple of 8": as_json(GOOD | {"width": 65}),
    "too many pixels": as_json(GOOD | {"width": 256, "height": 256}),
    "seed below -1": as_json(GOOD | {"seed": -2}),
    "seed beyond 64 bits": raw('{"prompt": "a", "seed": 1e400}'),
    "infinite cfg_scale": raw('{"prompt": "a", "cfg_scale": 1e999}'),
    "absurd steps": as_json(GOOD | {"steps": 10**9}),
    "too many images": as_json(GOOD | {"batch_size": 3, "n_iter": 3}),
    "another checkpoint": as_json(GOOD | {"override_settings": {"sd_model_checkpoint": "sdxl.safetensors"}}),
    "override_settings is a list": as_json(GOOD | {"override_settings": [1]}),
    "unknown LoRA tag": as_json(GOOD | {"prompt": "a <lora:nope:1>"}),
}
IMG2IMG_HOSTILE = {
    "no init_images": as_json(GOOD),
    "empty init_images": edit(init_images=[]),
    "init_images is a string": edit(init_images=b64_png(picture())),
    "broken base64": edit(init_images=["not base64 at all!"]),
    "a data: URL that is not base64": edit(init_images=["data:image/png," + b64_png(picture())]),
    "an empty image": edit(init_images=[""]),
    "a text file as the image": edit(init_images=[base64.b64encode(b"hello, not a picture").decode()]),
    "a GIF": edit(init_images=[base64.b64encode(encoded(picture(), "GIF")).decode()]),
    "a GIF bomb": edit(init_images=[base64.b64encode(gif_bomb()).decode()]),
    "a PNG claiming 50000x50000": edit(init_images=[base64.b64encode(png_claiming(50_000, 50_000)).decode()]),
    "a truncated PNG": edit(init_images=[base64.b64encode(encoded(picture())[:300]).decode()]),
    "two init images": edit(init_images=[b64_png(picture())] * 2),
    "a mask of the wrong size": edit(mask=b64_png(white_left_half(32, 32))),
    "a mask that marks nothing": edit(mask=b64_png(Image.new("L", (64, 64), 0))),
    "an inverted mask that marks nothing": edit(mask=b64_png(Image.new("L", (64, 64), 255)), inpainting_mask_invert=1),
    "broken base64 mask": edit(mask="%%%"),
    "denoising_strength out of range": edit(denoising_strength=2),
    "denoising_strength zero": edit(denoising_strength=0),
    "inpainting_mask_invert 2": edit(inpainting_mask_invert=2),
    "an oversized body": edit(init_images=["A" * (21 * 1024 * 1024)]),
}
HOSTILE = [
    *((TXT2IMG, name, request) for name, request in COMMON_HOSTILE.items()),
    *((IMG2IMG, name, request) for name, request in COMMON_HOSTILE.items()),
    *((IMG2IMG, name, request) for name, request in IMG2IMG_HOSTILE.items()),
    (OPTIONS, "options is a list", as_json([1])),
    (OPTIONS, "options is not JSON", raw("{")),
    (OPTIONS, "options with a checkpoint that is a number", as_json({"sd_model_checkpoint": 5})),
]


@pytest.fixture(scope="module")
def hostile_client(settings, runner):
    with serving(settings, runner, max_pixels=128 * 128) as client:
        yield client


@pytest.mark.parametrize(
    "path, name, request_args", HOSTILE, ids=[f"{path.split('/')[-1]}: {name}" for path, name, _ in HOSTILE]
)
def test_hostile_bodies_get_a_4xx_envelope_with_detail(hostile_client, path, name, request_args):
    assert_sdapi_error(hostile_client.post(path, **request_args))


def test_the_server_is_ready_after_the_hostile_bodies(hostile_client):
    assert hostile_client.get("/ready").status_code == 200
    assert hostile_client.post(TXT2IMG, json=GOOD).status_code == 200
    assert hostile_client.get("/sdapi/v1/nope").json()["detail"] == "Not Found"


# -- the OpenAI side: model aliases, and the schema ---------------------------------------------


def test_openai_model_names_are_served_by_default_and_strict_on_request(settings, runner):
    request = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}
    with serving(settings, runner) as client:
        for name in ("dall-e-2", "dall-e-3", "gpt-image-1", "z-image-turbo"):
            assert client.post("/v1/images/generations", json=request | {"model": name}).status_code == 200, name
        unknown = client.post("/v1/images/generations", json=request | {"model": "midjourney"})
        assert assert_envelope(unknown, 400)["code"] == "model_not_found"
        assert "detail" not in unknown.json()  # the OpenAI routes keep OpenAI's envelope
    with serving(settings, runner, model_aliases=()) as client:
        strict = client.post("/v1/images/generations", json=request | {"model": "dall-e-2"})
        assert assert_envelope(strict, 400)["code"] == "model_not_found"


def test_the_openapi_schema_documents_the_sdapi_routes(client):
    paths = client.get("/schema/openapi.json").json()["paths"]
    for path in (TXT2IMG, IMG2IMG, OPTIONS, "/sdapi/v1/sd-models", "/sdapi/v1/progress", "/sdapi/v1/loras"):
        assert path in paths, path
    assert "prompt" in json.dumps(paths[TXT2IMG]["post"])


def test_requests_queued_together_share_one_call(settings, runner):
    # The A1111 route joins the OpenAI route's batches: same model, same batcher.
    with live_server(settings, runner) as base:
        sends = [
            functools.partial(httpx.post, base + TXT2IMG, json={"prompt": "x", "width": 64, "height": 64}, timeout=60),
            functools.partial(httpx.post, base + "/v1/images/generations", json={"prompt": "y", "size": "64x64"}, timeout=60),
        ]
        responses, calls = burst_of_sends(runner, base, sends)
    assert [response.status_code for response in responses] == [200, 200]
    assert calls == 1


def test_a_checkpoint_hash_read_during_fetch_on_start_is_not_kept(tmp_path, models_dir, runner):
    import asyncio
    import shutil
    import threading

    from litestar.testing import TestClient

    from zimage_server.api import create_app
    from zimage_server.model_layout import checkpoint_sha256
    from zimage_server.settings import Settings

    release = threading.Event()

    async def fetch(settings: Settings) -> None:  # a download that finishes when the test says so
        while not release.is_set():
            await asyncio.sleep(0.01)
        shutil.copytree(models_dir / "z-image-turbo", settings.model_dir)

    settings = Settings(models_dir=tmp_path, variant="turbo", device="cpu", store=str(tmp_path / "outputs"))
    with TestClient(create_app(settings, runner, fetch_model=fetch)) as client:
        early = client.get(OPTIONS).json()["sd_checkpoint_hash"]
        release.set()
        wait_for(lambda: client.get("/ready").status_code == 200, 30)
        served = client.get(OPTIONS).json()["sd_checkpoint_hash"]
        assert client.get("/sdapi/v1/sd-models").json()[0]["sha256"] == served
    assert early != served == checkpoint_sha256(models_dir / "z-image-turbo")
