"""ControlNet on the tiny pipeline: the image a direct ZImageControlNetPipeline call gives, scale 0 is the
plain image, batching changes nothing, controlled and plain requests never share a call, every bad input
a 4xx; and the server's canny edge map against OpenCV's."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from diffusers import ZImageControlNetModel, ZImageControlNetPipeline, ZImagePipeline
from PIL import Image, ImageDraw, ImageFilter

from conftest import assert_each_is_the_diffusers_image, assert_envelope, generate, make_spec, serving
from test_edits import form
from test_images import encoded, left_half_mask, picture
from zimage_server.images import canny_edges
from zimage_server.runner import load_runner
from zimage_server.testing import write_tiny_controlnet

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"
BASE = {"prompt": "a photo of a cat", "size": "64x64", "num_inference_steps": 3, "seed": 5, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def control_settings(settings, models_dir: Path):
    write_tiny_controlnet(models_dir / "controlnets" / "union-1")
    return settings.replace(controlnet=Path("union-1"))  # relative: under MODELS_DIR/controlnets


@pytest.fixture(scope="module")
def control_runner(control_settings):
    return load_runner(control_settings)


@pytest.fixture(scope="module")
def inpaint_settings(settings, models_dir: Path):
    write_tiny_controlnet(models_dir / "controlnets" / "union-2", inpaint=True)
    return settings.replace(controlnet=models_dir / "controlnets" / "union-2")


def control_map(seed: int = 0) -> Image.Image:
    """Something shaped like a control map: white strokes on black."""
    image = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for _ in range(4):
        draw.line(tuple(int(v) for v in rng.integers(0, 64, 4)), fill="white", width=2)
    return image


def b64(image: Image.Image) -> str:
    return base64.b64encode(encoded(image)).decode()


def pixels(b64_json: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64_json))).convert("RGB"), dtype=np.int16)


def control_spec(prompt: str, seeds, control: Image.Image, scale: float = 0.75, **params):
    return make_spec(prompt, seeds, mode="control", control_scale=scale, control_image=control, **params)


def test_a_controlled_image_is_what_the_diffusers_controlnet_pipeline_gives(control_runner, models_dir):
    control = control_map()
    [images] = generate(control_runner, [control_spec("a cat", (5, 6), control)])
    pipe = ZImageControlNetPipeline(
        **ZImagePipeline.from_pretrained(models_dir / "z-image-turbo").components,
        controlnet=ZImageControlNetModel.from_pretrained(models_dir / "controlnets" / "union-1"),
    )
    pipe.set_progress_bar_config(disable=True)
    call = dict(width=64, height=64, num_inference_steps=3, guidance_scale=0.0, max_sequence_length=64,
                control_image=control, controlnet_conditioning_scale=0.75)
    assert_each_is_the_diffusers_image(images, pipe, 5, "a cat", **call)


def test_scale_zero_is_the_plain_image_and_batching_changes_nothing(control_runner):
    [[plain]] = generate(control_runner, [make_spec("a cat", (5,))])
    [[at_zero]] = generate(control_runner, [control_spec("a cat", (5,), control_map(), scale=0.0)])
    assert np.array_equal(np.asarray(plain), np.asarray(at_zero))
    [[alone]] = generate(control_runner, [control_spec("a cat", (5,), control_map(1))])
    batched = generate(
        control_runner,
        [
            control_spec("a longer prompt about a dog on a beach", (9, 10), control_map(2)),
            control_spec("a cat", (5,), control_map(1)),
        ],
    )
    assert np.abs(np.asarray(batched[1][0], np.int16) - np.asarray(alone, np.int16)).max() <= 1
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(plain, np.int16)).max() > 10  # the control steers


def test_the_generations_route_takes_base64_and_data_urls_and_never_batches_controlled_with_plain(
    control_settings, control_runner
):
    with serving(control_settings, control_runner) as client:
        control = control_map()
        by_b64 = client.post(URL, json=BASE | {"control_image": b64(control)})
        by_url = client.post(URL, json=BASE | {"control_image": "data:image/png;base64," + b64(control)})
        assert by_b64.status_code == by_url.status_code == 200, by_b64.text[:300]
        assert np.array_equal(
            pixels(by_b64.json()["data"][0]["b64_json"]), pixels(by_url.json()["data"][0]["b64_json"])
        )
        [[direct]] = generate(control_runner, [control_spec("a photo of a cat", (5,), control)])
        assert np.array_equal(pixels(by_b64.json()["data"][0]["b64_json"]), np.asarray(direct, np.int16))
        plain = client.post(URL, json=BASE).json()["data"][0]["b64_json"]
        assert np.abs(pixels(plain) - np.asarray(direct, np.int16)).max() > 10
        # A big photo is fitted to the output size (cover, centre-crop) like an edit input.
        photo = picture(200, 120, seed=3)
        fitted = client.post(URL, json=BASE | {"control_image": b64(photo), "control_preprocess": "canny"})
        assert fitted.status_code == 200, fitted.text[:300]
        from zimage_server.images import fit_to

        [[expected]] = generate(
            control_runner, [control_spec("a photo of a cat", (5,), canny_edges(fit_to(photo, (64, 64))))]
        )
        assert np.array_equal(pixels(fitted.json()["data"][0]["b64_json"]), np.asarray(expected, np.int16))


def test_controlled_and_plain_requests_queued_together_never_share_a_call(control_settings, control_runner):
    import httpx

    from conftest import burst_behind_a_blocker, live_server

    bodies = [BASE | {"control_image": b64(control_map(1))}, BASE, BASE | {"control_image": b64(control_map(2))}, BASE]
    with live_server(control_settings, control_runner) as base:
        solo = [pixels(httpx.post(base + URL, json=body, timeout=60).json()["data"][0]["b64_json"]) for body in bodies]
        responses, calls = burst_behind_a_blocker(control_runner, base, URL, bodies)
    assert calls == 2  # one call for both controlled requests (one control map each), one for both plain ones
    for response, alone in zip(responses, solo):
        assert np.abs(pixels(response.json()["data"][0]["b64_json"]) - alone).max() <= 1


def test_controlnet_inpainting_on_a_2x_checkpoint_changes_the_masked_edit(inpaint_settings, models_dir):
    runner = load_runner(inpaint_settings)
    assert runner.controlnet_inpaints
    with serving(inpaint_settings, runner) as client:
        common = dict(prompt="a cat", num_inference_steps="2", seed="3")
        edit_form = form(encoded(picture()), encoded(left_half_mask()), **common)
        edit_form["files"].append(("control_image", ("control.png", encoded(control_map()), "image/png")))
        controlled = client.post(EDITS, **edit_form)
        assert controlled.status_code == 200, controlled.text[:300]
        plain = client.post(EDITS, **form(encoded(picture()), encoded(left_half_mask()), **common))
        assert (
            np.abs(pixels(controlled.json()["data"][0]["b64_json"]) - pixels(plain.json()["data"][0]["b64_json"])).max()
            > 0
        )


def test_bad_control_inputs_are_4xx_and_the_server_stays_ready(control_settings, control_runner, client):
    # No ControlNet loaded: the setting that enables it is named.
    error = assert_envelope(client.post(URL, json=BASE | {"control_image": b64(control_map())}), 400)
    assert "Z_IMAGE_CONTROLNET" in error["message"] and error["param"] == "control_image"
    with serving(control_settings, control_runner) as served:
        cases = [
            ({"control_image": "not base64 at all!"}, 400, "control_image"),
            ({"control_image": "data:image/png,rawbytes"}, 400, "control_image"),
            ({"control_image": base64.b64encode(b"GIF89a" + bytes(40)).decode()}, 415, "control_image"),
            ({"control_image": base64.b64encode(encoded(picture())[:100]).decode()}, 400, "control_image"),
            ({"control_image": b64(control_map()), "control_scale": 2.5}, 400, "control_scale"),
            ({"control_image": b64(control_map()), "control_preprocess": "depth"}, 400, "control_preprocess"),
        ]
        for fields, status, param in cases:
            assert assert_envelope(served.post(URL, json=BASE | fields), status)["param"] == param, fields
        # A mask needs a 2.x (inpainting) checkpoint; a control image on an edit needs a mask.
        masked = form(encoded(picture()), encoded(left_half_mask()), prompt="a cat")
        masked["files"].append(("control_image", ("c.png", encoded(control_map()), "image/png")))
        assert assert_envelope(served.post(EDITS, **masked), 400)["param"] == "mask"
        unmasked = form(encoded(picture()), prompt="a cat")
        unmasked["files"].append(("control_image", ("c.png", encoded(control_map()), "image/png")))
        assert assert_envelope(served.post(EDITS, **unmasked), 400)["param"] == "control_image"
        assert served.get("/ready").status_code == 200
        assert served.post(URL, json=BASE | {"control_image": b64(control_map())}).status_code == 200


def test_canny_edges_are_opencvs_edges():
    cv2 = pytest.importorskip("cv2")
    image = Image.new("RGB", (128, 96), "white")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        draw.ellipse((i * 8, i * 6, 120 - i * 9, 90 - i * 5), outline=(i * 40, 90, 200 - i * 30), width=2)
    draw.rectangle((20, 50, 70, 80), fill=(110, 110, 110))
    for sample in (image.filter(ImageFilter.GaussianBlur(1.0)), picture(96, 64, seed=4)):
        ours = np.asarray(canny_edges(sample))[..., 0] > 0
        reference = cv2.Canny(np.asarray(sample.convert("L")), 100, 200) > 0
        # The same edges up to ties in the non-maximum suppression (OpenCV tests sectors in fixed point).
        agreement = (ours & reference).sum() / (ours | reference).sum()
        print(f"canny vs OpenCV: {100 * agreement:.1f}% of {reference.sum()} edge pixels agree")
        assert agreement >= 0.95 and reference.sum() > 100


def test_webuiapi_controlnet_units_and_the_extension_routes(control_settings, control_runner):
    import webuiapi

    from conftest import live_server

    control = control_map()
    with live_server(control_settings, control_runner, sdapi_sampling="client") as base:
        host, port = base.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        unit = webuiapi.ControlNetUnit(image=control, module="none", weight=0.75)
        common = dict(prompt="a photo of a cat", width=64, height=64, steps=3, cfg_scale=0, seed=5)
        # Each call gets its own alwayson_scripts: webuiapi's default `{}` is one dict shared by all calls,
        # and the units it puts there would reach every later call (this test's and other tests').
        result = api.txt2img(**common, controlnet_units=[unit], alwayson_scripts={})
        [[expected]] = generate(control_runner, [control_spec("a photo of a cat", (5,), control)])
        assert np.array_equal(np.asarray(result.image.convert("RGB"), np.int16), np.asarray(expected, np.int16))
        plain = api.txt2img(**common, alwayson_scripts={})
        assert not np.array_equal(np.asarray(plain.image), np.asarray(result.image))
        interface = webuiapi.ControlNetInterface(api)
        assert interface.model_list() == ["union-1"]
        assert "canny" in httpx_get(base, "/controlnet/module_list")["module_list"]
        assert httpx_get(base, "/controlnet/version")["version"] == 2
        # A second enabled unit, an unknown module, or a weight out of range: 400 with detail.
        import httpx

        body = {**common, "alwayson_scripts": {"ControlNet": {"args": [unit.to_dict(), unit.to_dict()]}}}
        for args in (
            [unit.to_dict(), unit.to_dict()],
            [unit.to_dict() | {"module": "openpose"}],
            [unit.to_dict() | {"weight": 5}],
            [unit.to_dict() | {"image": "%%%"}],
        ):
            body["alwayson_scripts"]["ControlNet"]["args"] = args
            response = httpx.post(base + "/sdapi/v1/txt2img", json=body, timeout=60)
            assert response.status_code == 400 and response.json()["detail"], response.text[:300]
        # A disabled unit is no unit.
        body["alwayson_scripts"]["ControlNet"]["args"] = [unit.to_dict() | {"enabled": False}]
        assert httpx.post(base + "/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200


def httpx_get(base: str, path: str) -> dict:
    import httpx

    response = httpx.get(base + path, timeout=30)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def test_a_missing_controlnet_or_one_that_cannot_run_is_one_line_at_start_up(models_dir):
    from test_settings import run_cli

    missing = run_cli(
        "serve", env={"MODELS_DIR": str(models_dir), "Z_IMAGE_CONTROLNET": "nope", "Z_IMAGE_OFFLINE": "1"}
    )
    assert missing.returncode == 3 and missing.stderr.strip().count("\n") == 0
    assert str(models_dir / "controlnets" / "nope") in missing.stderr and "Z_IMAGE_CONTROLNET" in missing.stderr
    offloaded = run_cli(
        "serve", env={"MODELS_DIR": str(models_dir), "Z_IMAGE_CONTROLNET": "union-1", "Z_IMAGE_OFFLOAD": "model"}
    )
    assert offloaded.returncode == 2 and "Z_IMAGE_OFFLOAD" in offloaded.stderr.strip().splitlines()[-1]


def test_loras_apply_under_the_controlnet(control_settings, control_runner, models_dir):
    from safetensors.torch import save_file

    from test_loras import LAYOUTS, random_lora

    assert control_runner.lora_slot is not None  # MODELS_DIR/loras exists (conftest)
    save_file(
        LAYOUTS["diffusers"](random_lora(control_runner.pipeline.transformer, 3)),
        models_dir / "loras" / "cn.safetensors",
    )
    with serving(control_settings, control_runner) as client:
        controlled = BASE | {"control_image": b64(control_map())}
        plain = pixels(client.post(URL, json=controlled).json()["data"][0]["b64_json"])
        styled = client.post(URL, json=controlled | {"loras": [{"name": "cn", "scale": 0.8}]})
        assert styled.status_code == 200, styled.text[:300]
        assert np.abs(pixels(styled.json()["data"][0]["b64_json"]) - plain).max() > 10
        again = pixels(client.post(URL, json=controlled).json()["data"][0]["b64_json"])
        assert np.array_equal(again, plain)  # no LoRA after a LoRA: bit-exact


def test_the_text_encoder_offload_mode_gives_the_same_controlled_image(control_settings, control_runner):
    # On a CPU the mode saves nothing, but its placement code and hooks run as on a GPU.
    offloaded = load_runner(control_settings.replace(offload="text_encoder"))
    assert offloaded.acceleration.offload == "text_encoder"
    request = control_spec("a cat", (5,), control_map())
    [[expected]], [[image]] = generate(control_runner, [request]), generate(offloaded, [request])
    assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1
