"""The hires fix over HTTP: A1111's fields as SillyTavern, webuiapi and Forge send them, and the
OpenAI routes' `hires` object, with A1111-exact sizes and infotext."""

from __future__ import annotations

import base64
import io
import json

import pytest
import webuiapi
from PIL import Image

from conftest import live_server
from test_sdapi import TXT2IMG, assert_sdapi_error, sillytavern_payload, webui
from test_streaming import parse_events

GENERATIONS = "/v1/images/generations"


def image_of(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def infotext(body: dict, index: int = 0) -> str:
    return json.loads(body["info"])["infotexts"][index]


def test_sillytavern_hires_gets_a1111s_size_and_infotext(client):
    body = sillytavern_payload("a castle on a hill") | {"enable_hr": True, "width": 64, "height": 96}
    response = client.post(TXT2IMG, json=body)
    assert response.status_code == 200, response.text[:300]
    answer = response.json()
    image = image_of(answer["images"][0])
    assert image.size == (128, 192)
    info = json.loads(answer["info"])
    assert (info["width"], info["height"]) == (64, 96)  # A1111's Size is the first pass's
    assert info["denoising_strength"] == 0.7
    text = infotext(answer)
    assert "Size: 64x96" in text and "Denoising strength: 0.7, Hires upscale: 2.0, Hires upscaler: Latent" in text
    assert "Hires steps" not in text  # hr_second_pass_steps 0: A1111 leaves it out
    assert image.text["parameters"] == text
    assert info["extra_generation_params"] == {"Hires upscale": 2.0, "Hires upscaler": "Latent"}


def test_enable_hr_false_is_byte_identical_to_a_request_without_hires_fields(client):
    sent = sillytavern_payload("a quiet harbour") | {"seed": 5}  # enable_hr false, every hr field set
    plain = {name: value for name, value in sent.items() if not name.startswith(("hr_", "enable_hr", "denoising"))}
    assert len(plain) < len(sent) - 3
    off = client.post(TXT2IMG, json=sent).json()
    without = client.post(TXT2IMG, json=plain).json()
    assert off["images"] == without["images"]


def test_forge_body_with_its_hires_extras(client):
    body = sillytavern_payload("a lantern") | {
        "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (bicubic antialiased)", "hr_cfg": 1.0,
        "hr_distilled_cfg": 3.5, "hr_additional_modules": ["Use same choices"],
        "hr_checkpoint_name": "Use same checkpoint", "hr_sampler_name": "Euler", "hr_scheduler": "Simple",
        "hr_prompt": "a lantern, glowing", "hr_negative_prompt": "",
    }  # fmt: skip
    response = client.post(TXT2IMG, json=body)
    assert response.status_code == 200, response.text[:300]
    answer = response.json()
    assert image_of(answer["images"][0]).size == (96, 96)
    assert 'Hires upscaler: Latent (bicubic antialiased), Hires prompt: "a lantern, glowing"' in infotext(answer)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"hr_upscaler": "4x-Missing"}, "hr_upscaler", "could not find upscaler named 4x-Missing"),

        ({"hr_scale": 8, "width": 1024, "height": 1024}, "hr_scale", "above this server's limits"),
        ({"hr_resize_x": 4000, "hr_resize_y": 4000}, "hr_resize_x", "above this server's limits"),
        ({"denoising_strength": 0}, "denoising_strength", "must be 0.01..1"),
        ({"denoising_strength": 1e-9}, "denoising_strength", "must be 0.01..1"),
        ({"hr_checkpoint_name": "sdxl.safetensors", "hr_scale": 1.5}, "hr_checkpoint_name", "not served here"),
        ({"firstphase_width": 64, "firstphase_height": 0}, "firstphase_height", "both"),
        ({"hr_scale": 0.5}, "hr_scale", "hr_scale"),
        ({"hr_second_pass_steps": -1}, "hr_second_pass_steps", "hr_second_pass_steps"),
    ],
)
def test_hires_settings_the_server_cannot_run_are_400s(client, fields, param, message):
    body = sillytavern_payload("a pier") | {"enable_hr": True} | fields
    error = assert_sdapi_error(client.post(TXT2IMG, json=body), 400)
    assert message in error["message"] and error["param"] == param


def test_latent_upscale_modes_are_listed_with_a1111s_names(client):
    names = [mode["name"] for mode in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert names == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def fast_server(settings, runner):
    with live_server(settings, runner, sdapi_sampling="client") as base:
        yield base


def test_webuiapi_hires_with_both_resize_sides_crops_to_the_exact_size(fast_server):
    api = webui(fast_server)
    result = api.txt2img(
        prompt="a red chair", seed=3, width=64, height=96, steps=2, cfg_scale=0, enable_hr=True,
        hr_resize_x=136, hr_resize_y=136, hr_upscaler=webuiapi.HiResUpscaler.Lanczos, hr_second_pass_steps=2,
        denoising_strength=0.5,
    )  # fmt: skip
    [image] = result.images
    assert image.size == (136, 136)
    text = result.info["infotexts"][0]
    assert "Hires resize: 136x136, Hires steps: 2, Hires upscaler: Lanczos" in text


def test_openai_hires_by_scale_and_by_size(client):
    by_scale = client.post(GENERATIONS, json={"prompt": "a tower", "size": "64x64", "hires": {"scale": 2, "upscaler": "Latent"}})
    assert by_scale.status_code == 200, by_scale.text[:300]
    assert by_scale.json()["size"] == "128x128"
    assert image_of(by_scale.json()["data"][0]["b64_json"]).size == (128, 128)
    by_size = client.post(
        GENERATIONS, json={"prompt": "a tower", "size": "64x64", "hires": {"width": 96, "height": 128, "steps": 2}}
    )
    assert image_of(by_size.json()["data"][0]["b64_json"]).size == (96, 128)


@pytest.mark.parametrize(
    "hires",
    [{"scale": 2, "width": 128, "height": 128}, {"width": 128}, {"width": 100, "height": 128}, {"upscaler": "nope"},
     {"denoising_strength": 0}, {"scale": 9}, {"extra": 1}],
)  # fmt: skip
def test_openai_hires_mistakes_are_400s(client, hires):
    response = client.post(GENERATIONS, json={"prompt": "a tower", "size": "64x64", "hires": hires})
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"]["param"] in ("hires", "hires.scale", "hires.denoising_strength", "hires.extra")


def test_a_streamed_hires_request_reports_both_passes_as_one_run(client):
    body = {"prompt": "a kite", "size": "64x64", "num_inference_steps": 2, "stream": True,
            "hires": {"scale": 1.5, "steps": 3, "upscaler": "Latent"}}  # fmt: skip
    response = client.post(GENERATIONS, json=body)
    events = parse_events(response.text)
    progress = [(data["step"], data["total"]) for name, data in events if name.endswith("progress")]
    assert progress == [(step, 5) for step in range(1, 6)]
    completed = [data for name, data in events if name.endswith("completed")]
    assert image_of(completed[0]["b64_json"]).size == (96, 96)


def test_an_edit_with_hires_upscales_the_edited_result(client):
    source = Image.new("RGB", (64, 64), (200, 120, 40))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}
    data = {"prompt": "a sunset", "strength": "0.5", "hires": '{"scale": 2, "upscaler": "Latent", "steps": 2}'}
    response = client.post("/v1/images/edits", data=data, files=files)
    assert response.status_code == 200, response.text[:300]
    assert image_of(response.json()["data"][0]["b64_json"]).size == (128, 128)
    broken = client.post("/v1/images/edits", data=data | {"hires": "{scale: 2"}, files=files)
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "hires"


def test_hr_fields_are_checked_only_when_the_hires_fix_is_on(client):
    leftovers = {"enable_hr": False, "denoising_strength": 2, "hr_scale": 0.5, "hr_second_pass_steps": -1,
                 "firstphase_width": 64, "hr_upscaler": "4x-Nowhere"}  # fmt: skip
    response = client.post(TXT2IMG, json=sillytavern_payload("a field") | leftovers)
    assert response.status_code == 200, response.text[:300]


def test_an_hr_prompt_equal_to_the_prompt_is_not_written_as_a_hires_prompt(client):
    body = sillytavern_payload("a lantern") | {"enable_hr": True, "hr_scale": 1.5, "hr_prompt": "a lantern"}
    text = infotext(client.post(TXT2IMG, json=body).json())
    assert "Hires upscale: 1.5" in text and "Hires prompt" not in text


def test_seed_variation_on_the_omni_variant_is_a_400(edit_settings, edit_runner):
    from conftest import serving

    with serving(edit_settings, edit_runner) as omni:
        response = omni.post(GENERATIONS, json={"prompt": "a cat", "size": "64x64", "variation_strength": 0.2})
        assert response.status_code == 400 and response.json()["error"]["param"] == "variation_strength"
        hires = omni.post(GENERATIONS, json={"prompt": "a cat", "size": "64x64", "hires": {"scale": 2}})
        assert hires.status_code == 400 and "turbo or base" in hires.json()["error"]["message"]
