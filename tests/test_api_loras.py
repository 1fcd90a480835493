"""LoRAs over HTTP: the `loras` field and prompt tags on every route, batching by LoRA set, listing,
the PNG parameters, and every bad input a 400 naming the LoRA."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from safetensors.torch import save_file

from conftest import assert_envelope, burst_behind_a_blocker, live_server
from test_edits import form
from test_images import encoded, left_half_mask, picture
from test_loras import LAYOUTS, random_lora

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"
BASE = {"prompt": "a photo of a cat", "size": "64x64", "num_inference_steps": 2, "seed": 5}


@pytest.fixture(scope="module")
def loras(models_dir: Path) -> Path:
    """The default LoRA folder (MODELS_DIR/loras) of the shared runner, with files written from the tiny transformer."""
    folder = models_dir / "loras"  # made with MODELS_DIR (conftest), so the shared runner has the slot
    transformer = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo").transformer
    save_file(LAYOUTS["diffusers"](random_lora(transformer, seed=1)), folder / "pixel-art.safetensors")
    (folder / "styles").mkdir(exist_ok=True)
    save_file(LAYOUTS["kohya-original"](random_lora(transformer, seed=2)), folder / "styles" / "ink.safetensors")
    (folder / "truncated.safetensors").write_bytes((folder / "pixel-art.safetensors").read_bytes()[:200])
    other = {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
    }
    save_file(other, folder / "flux-style.safetensors")
    (models_dir / "outside.safetensors").write_bytes((folder / "pixel-art.safetensors").read_bytes())
    link = folder / "escape.safetensors"
    if not link.exists():
        link.symlink_to(models_dir / "outside.safetensors")
    return folder


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def generate(client, **fields) -> np.ndarray:
    response = client.post(URL, json=BASE | fields)
    assert response.status_code == 200, response.text[:300]
    return decode(response.json()["data"][0]["b64_json"])


def diffusers_reference(models_dir: Path, loras: Path, adapters: dict[str, float]) -> np.ndarray:
    pipe = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo")
    pipe.set_progress_bar_config(disable=True)
    for index, name in enumerate(adapters):
        pipe.load_lora_weights(str(loras / f"{name}.safetensors"), adapter_name=f"a{index}")
    pipe.set_adapters([f"a{index}" for index in range(len(adapters))], list(adapters.values()))
    image = pipe(
        "a photo of a cat",
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]
    return np.asarray(image, dtype=np.int16)


def test_the_field_and_prompt_tags_give_the_diffusers_image_and_plain_requests_stay_plain(client, loras, models_dir):
    plain_before = generate(client)
    by_field = generate(client, loras=[{"name": "pixel-art", "scale": 0.8}, {"name": "styles/ink", "scale": 0.5}])
    by_tags = generate(client, prompt="a photo of a cat <lora:pixel-art:0.8> <lora:styles/ink:0.5>")
    # The same LoRA named twice adds up: 0.5 + 0.3 by field and tag.
    mixed = generate(
        client,
        prompt="a photo of a cat <lora:pixel-art:0.3>",
        loras=[{"name": "pixel-art", "scale": 0.5}, {"name": "styles/ink", "scale": 0.5}],
    )
    assert np.array_equal(by_field, by_tags) and np.array_equal(by_field, mixed)
    reference = diffusers_reference(models_dir, loras, {"pixel-art": 0.8, "styles/ink": 0.5})
    assert np.abs(by_field - reference).max() <= 1
    assert np.abs(by_field - plain_before).max() > 10  # the LoRAs really change the image
    assert np.array_equal(generate(client, loras=[{"name": "pixel-art", "scale": 0}]), plain_before)
    assert np.array_equal(generate(client), plain_before)  # no LoRA after LoRAs: bit-exact


def test_a_mixed_burst_shares_calls_only_within_one_lora_set(settings, runner, loras):
    sets = [None, [{"name": "pixel-art"}], [{"name": "styles/ink", "scale": -1}], None, [{"name": "pixel-art"}]]

    def body(index: int, lora_set) -> dict:
        return BASE | {"seed": index} | ({"loras": lora_set} if lora_set else {})

    with live_server(settings, runner) as base:
        solo = [
            decode(httpx.post(base + URL, json=body(i, s), timeout=60).json()["data"][0]["b64_json"])
            for i, s in enumerate(sets)
        ]
        responses, calls = burst_behind_a_blocker(runner, base, URL, [body(i, s) for i, s in enumerate(sets)])
    assert calls == 3  # one call per distinct LoRA set: none, pixel-art, styles/ink
    for index, response in enumerate(responses):
        assert np.abs(decode(response.json()["data"][0]["b64_json"]) - solo[index]).max() <= 1


def test_edits_streams_and_the_png_parameters_carry_the_loras(client, loras):
    lora_form = form(
        encoded(picture()),
        prompt="a cat",
        num_inference_steps="2",
        seed="3",
        loras=json.dumps([{"name": "pixel-art", "scale": 0.7}]),
    )
    tagged_form = form(encoded(picture()), prompt="a cat <lora:pixel-art:0.7>", num_inference_steps="2", seed="3")
    plain_form = form(encoded(picture()), prompt="a cat", num_inference_steps="2", seed="3")
    edited = client.post(EDITS, **lora_form).json()["data"][0]["b64_json"]
    assert np.array_equal(decode(edited), decode(client.post(EDITS, **tagged_form).json()["data"][0]["b64_json"]))
    assert np.abs(decode(edited) - decode(client.post(EDITS, **plain_form).json()["data"][0]["b64_json"])).max() > 0
    text = Image.open(io.BytesIO(base64.b64decode(edited))).text["parameters"]
    digest = __import__("hashlib").sha256((loras / "pixel-art.safetensors").read_bytes()).hexdigest()[:12]
    assert text.startswith("a cat <lora:pixel-art:0.7>") and f'Lora hashes: "pixel-art: {digest}"' in text

    streamed = client.post(URL, json=BASE | {"stream": True, "loras": [{"name": "pixel-art", "scale": 0.8}]})
    completed = [
        json.loads(line[6:])
        for line in streamed.text.splitlines()
        if line.startswith("data: ") and '.completed"' in line
    ]
    assert np.array_equal(
        decode(completed[0]["b64_json"]), generate(client, loras=[{"name": "pixel-art", "scale": 0.8}])
    )


def test_inpainting_applies_loras_inside_the_mask_only(client, loras):
    common = dict(prompt="a cat", num_inference_steps="2", seed="3", strength="1")
    mask = encoded(left_half_mask())
    plain = client.post(EDITS, **form(encoded(picture()), mask, **common)).json()["data"][0]["b64_json"]
    styled = client.post(EDITS, **form(encoded(picture()), mask, **common, loras='[{"name": "pixel-art"}]'))
    assert styled.status_code == 200, styled.text[:300]
    difference = np.abs(decode(styled.json()["data"][0]["b64_json"]) - decode(plain))
    assert difference[:, :32].max() > 10  # the repainted half follows the LoRA
    assert difference[:, 40:].mean() < difference[:, :32].mean() / 4  # the kept half barely moves


def test_omni_edits_take_loras_too(edit_settings, edit_runner, models_dir, loras):
    from conftest import serving

    with serving(edit_settings, edit_runner) as client:
        common = dict(prompt="make it blue", num_inference_steps="2", seed="1", guidance_scale="0")
        plain = client.post(EDITS, **form(encoded(picture()), **common))
        styled = client.post(EDITS, **form(encoded(picture()), **common, loras='[{"name": "pixel-art"}]'))
        assert plain.status_code == styled.status_code == 200, styled.text[:300]
        assert (
            np.abs(decode(plain.json()["data"][0]["b64_json"]) - decode(styled.json()["data"][0]["b64_json"])).max() > 0
        )


def test_the_lora_list_names_sizes_ranks_modules_and_hashes(client, loras):
    listed = {card["name"]: card for card in client.get("/v1/loras").json()["data"]}
    assert {"pixel-art", "styles/ink"} <= set(listed)
    assert "truncated" not in listed and "escape" not in listed  # unusable or outside: not offered
    card = listed["styles/ink"]
    path = loras / "styles" / "ink.safetensors"
    assert card["size_bytes"] == path.stat().st_size and card["rank"] == 4
    assert card["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()[:12]
    assert "attention.to_q" in card["modules"]
    # A file dropped in while the server runs is usable at once.
    (loras / "fresh.safetensors").write_bytes((loras / "pixel-art.safetensors").read_bytes())
    assert "fresh" in {card["name"] for card in client.get("/v1/loras").json()["data"]}
    assert generate(client, loras=[{"name": "fresh"}]).shape == (64, 64, 3)


@pytest.mark.parametrize(
    "loras_field, prompt, names",
    [
        ([{"name": "nope"}], None, "nope"),
        ([{"name": "../outside"}], None, "../outside"),
        ([{"name": "/etc/passwd"}], None, "/etc/passwd"),
        ([{"name": "escape"}], None, "escape"),
        ([{"name": "truncated"}], None, "truncated"),
        ([{"name": "flux-style"}], None, "flux-style"),
        (None, "a cat <lora:nope:1>", "nope"),
        (None, "a cat <lora:pixel-art:lots>", "pixel-art"),
        ([{"name": n} for n in ("pixel-art", "styles/ink", "fresh", "truncated", "flux-style")], None, "at most 4"),
        ([{"name": "pixel-art", "scale": 4.5}], None, "scale"),
        (None, "a cat <lora:pixel-art:9>", "pixel-art"),
        ([{"name": "pixel-art", "weight": 1}], None, "weight"),
        ("pixel-art", None, "loras"),
    ],
)
def test_bad_loras_are_a_400_naming_them_and_the_server_stays_ready(client, loras, loras_field, prompt, names):
    body = BASE | ({"prompt": prompt} if prompt else {}) | ({"loras": loras_field} if loras_field is not None else {})
    error = assert_envelope(client.post(URL, json=body), 400)
    assert names in error["message"] and error["param"].startswith("loras"), error
    assert client.get("/ready").status_code == 200
    assert generate(client).shape == (64, 64, 3)


def test_malformed_loras_json_in_an_edit_form_is_a_400(client, loras):
    bad = form(encoded(picture()), prompt="a cat", num_inference_steps="2", loras="[{name: pixel-art}")
    error = assert_envelope(client.post(EDITS, **bad), 400)
    assert error["param"] == "loras" and "JSON" in error["message"]
    unknown = form(encoded(picture()), prompt="a cat", num_inference_steps="2", loras='[{"name": "nope"}]')
    assert "nope" in assert_envelope(client.post(EDITS, **unknown), 400)["message"]


@pytest.mark.parametrize("off", [{"lora_max_rank": 0}, {"lora_dir": Path("/nonexistent/loras")}])
def test_lora_off_refuses_lora_requests_clearly(settings, models_dir, loras, off):
    from conftest import serving
    from zimage_server.runner import load_runner

    off_settings = settings.replace(**off)
    runner = load_runner(off_settings)
    assert runner.lora_slot is None
    with serving(off_settings, runner) as client:
        error = assert_envelope(client.post(URL, json=BASE | {"loras": [{"name": "pixel-art"}]}), 400)
        assert "LoRA is off" in error["message"] and "Z_IMAGE_LORA_DIR" in error["message"]
        assert client.get("/v1/loras").json()["data"] == []
        assert generate(client).shape == (64, 64, 3)
