"""Upscaler models over HTTP: A1111's upscaler list and Extras routes, and a model as the hires
fix's upscaler; spandrel's own call is the reference."""

from __future__ import annotations

import base64
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline
from PIL import Image
from safetensors.torch import save_file

from conftest import serving
from test_sdapi import assert_sdapi_error, sillytavern_payload
from test_upscalers import Exploit, direct, picture, tiny_models
from zimage_server.upscalers import Upscalers

EXTRA = "/sdapi/v1/extra-single-image"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers-api")
    models = tiny_models()
    for name in ("esrgan-2x", "compact-4x"):
        save_file(models[name].state_dict(), folder / f"{name}.safetensors")
    good = (folder / "compact-4x.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (folder / "exploit.pth").write_bytes(pickle.dumps(Exploit(folder / "pwned"), protocol=2))
    return folder


@pytest.fixture(scope="module")
def client(settings, runner, folder):
    saved = runner.upscalers
    # The shared runner's library, pointed at this module's folder (a real one, with its real lock).
    runner.upscalers = Upscalers(folder, device=runner.device, lock=runner.lock)
    try:
        with serving(settings, runner) as client:
            yield client
    finally:
        runner.upscalers = saved


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def image_of(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image.convert("RGB")


def test_the_upscaler_list_has_the_builtins_and_the_usable_models(client, folder):
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "compact-4x", "esrgan-2x"]
    models = {u["name"]: u for u in listed}
    assert (models["esrgan-2x"]["scale"], models["esrgan-2x"]["model_name"]) == (2, "ESRGAN")
    assert models["compact-4x"]["scale"] == 4 and models["compact-4x"]["model_path"].endswith("compact-4x.safetensors")
    assert not (folder / "pwned").exists()


def test_a_known_upscaler_list_answers_while_the_model_thread_is_busy(client, folder):
    import threading

    from zimage_server.model_thread import model_thread

    first = client.get("/sdapi/v1/upscalers").json()  # reads every file once
    busy, release = threading.Event(), threading.Event()
    held = model_thread().submit(lambda: (busy.set(), release.wait(30)))
    try:
        assert busy.wait(10)
        answered = client.get("/sdapi/v1/upscalers").json()
        assert not held.done()  # answered while the model's thread was still busy, not after
        assert answered == first
    finally:
        release.set()
        held.result(timeout=30)


def test_extra_single_image_equals_spandrels_call(client, folder):
    source = picture(48, 40)
    body = {"image": b64(source), "upscaler_1": "esrgan-2x", "resize_mode": 0, "upscaling_resize": 2}
    response = client.post(EXTRA, json=body)
    assert response.status_code == 200, response.text[:300]
    answer = response.json()
    expected = direct(folder / "esrgan-2x.safetensors", source)
    assert np.array_equal(np.asarray(image_of(answer["image"])), np.asarray(expected))
    assert "Postprocess upscaler: esrgan-2x" in answer["html_info"]


def test_extra_batch_images_upscales_each_alike(client):
    images = [picture(40, 40, seed) for seed in (1, 2)]
    body = {"imageList": [{"data": b64(image), "name": f"{i}.png"} for i, image in enumerate(images)],
            "upscaler_1": "Lanczos", "resize_mode": 1, "upscaling_resize_w": 96, "upscaling_resize_h": 64,
            "upscaling_crop": True}  # fmt: skip
    response = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert response.status_code == 200, response.text[:300]
    out = [image_of(text) for text in response.json()["images"]]
    assert [image.size for image in out] == [(96, 64), (96, 64)]
    # Scaled to cover 96x64 (x2.4 -> 96x96), then the centre cut: Lanczos from PIL, as A1111's.
    expected = images[0].resize((96, 96), Image.Resampling.LANCZOS).crop((0, 16, 96, 80))
    assert np.array_equal(np.asarray(out[0]), np.asarray(expected))


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"upscaler_1": "4x-Nowhere"}, "upscaler_1", "could not find upscaler named 4x-Nowhere"),
        ({"upscaler_2": "4x-Nowhere", "extras_upscaler_2_visibility": 0.5}, "upscaler_2", "could not find upscaler"),
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility", "face restoration"),
        ({"codeformer_visibility": 1}, "codeformer_visibility", "face restoration"),
        ({"upscaler_1": "exploit"}, "upscaler_1", "upscaler file exploit.pth"),
        ({"upscaler_1": "truncated"}, "upscaler_1", "upscaler file truncated.safetensors"),
        ({"upscaler_1": "esrgan-2x", "resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 4096},
         "upscaling_resize_w", "limit"),
    ],
)
def test_extras_that_cannot_run_are_400s_and_the_server_stays_ready(client, folder, fields, param, message):
    body = {"image": b64(picture(32, 32)), "upscaler_1": "Lanczos"} | fields
    error = assert_sdapi_error(client.post(EXTRA, json=body), 400)
    assert message in error["message"] and error["param"] == param
    assert client.get("/ready").status_code == 200 and not (folder / "pwned").exists()


def test_a_model_as_the_hires_upscaler_equals_plain_calls(client, settings, folder):
    body = sillytavern_payload("a red kite") | {
        "enable_hr": True, "hr_upscaler": "esrgan-2x", "hr_scale": 2, "seed": 6, "denoising_strength": 0.5,
    }  # fmt: skip
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text[:300]
    served = image_of(response.json()["images"][0])
    # The reference, with what the model policy ran: 8 steps, guidance 0, and the 2x model's output
    # exactly at the target (no resize after it).
    text_to_image = ZImagePipeline.from_pretrained(settings.model_dir)
    image_to_image = ZImageImg2ImgPipeline(**text_to_image.components)
    call = dict(guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(6))
    first = text_to_image("a red kite", negative_prompt=body["negative_prompt"], width=64, height=64,
                          num_inference_steps=8, **call).images[0]  # fmt: skip
    upscaled = direct(folder / "esrgan-2x.safetensors", first)
    expected = image_to_image(
        "a red kite", image=upscaled, strength=0.5, num_inference_steps=16, width=128, height=128,
        guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(6),
    ).images[0]  # fmt: skip
    assert served.size == (128, 128)
    assert np.abs(np.asarray(served, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_a_hires_upscaler_file_that_fails_when_its_call_runs_is_a_400(client):
    body = sillytavern_payload("a pier") | {"enable_hr": True, "hr_upscaler": "exploit"}
    error = assert_sdapi_error(client.post("/sdapi/v1/txt2img", json=body), 400)
    assert "upscaler file exploit.pth" in error["message"]
    ok = client.post("/sdapi/v1/txt2img", json=sillytavern_payload("a pier") | {"enable_hr": True, "hr_upscaler": "esrgan-2x"})
    assert ok.status_code == 200
