"""The prompt enhancer and seed variation over HTTP: revised_prompt, /v1/prompts/enhance, both
backends, the store's record, and bad input. References are plain library calls."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image

from conftest import serving
from test_prompt_enhancer import ChatServer
from zimage_server.prompt_enhancer import DALL_E_VERBATIM_PREFIX, build_messages, clean_answer
from zimage_server.resident_lm import ResidentLanguageModel

GENERATIONS = "/v1/images/generations"
ENHANCE = "/v1/prompts/enhance"
SMALL = {"size": "64x64", "num_inference_steps": 2}


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


@pytest.fixture(scope="module")
def plain(settings):
    pipeline = ZImagePipeline.from_pretrained(settings.model_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def plain_image(pipeline, prompt: str, seed: int) -> np.ndarray:
    image = pipeline(
        prompt, width=64, height=64, num_inference_steps=2, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def resident(settings, runner):
    with serving(settings, runner, enhance_max_tokens=24) as client:
        yield client


def test_the_resident_expansion_is_the_encoder_run_as_a_causal_lm(resident, runner):
    answer = resident.post(ENHANCE, json={"prompt": "a red fox in snow"})
    assert answer.status_code == 200, answer.text[:300]
    body = answer.json()
    lm = ResidentLanguageModel(runner)
    direct = lm.generate(build_messages("a red fox in snow"), 24, None)
    assert body["prompt"] == "a red fox in snow"
    # The tiny random encoder's greedy answer is blank lines: cleaned to nothing, so the prompt stays.
    assert clean_answer(direct) == "" and body["revised_prompt"] is None and body["fallback"] == "empty"
    # Sampled with a seed it writes (random) text: exactly the direct call's, and reproducible.
    seeded = [resident.post(ENHANCE, json={"prompt": "a red fox in snow", "seed": 7}).json() for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert seeded[0]["revised_prompt"] == clean_answer(lm.generate(build_messages("a red fox in snow"), 24, 7))
    assert seeded[0]["revised_prompt"]


def test_an_enhanced_generation_is_the_plain_image_of_its_revised_prompt(resident, plain):
    body = {"prompt": "a lighthouse", "seed": 4, "enhance_prompt": "per_image"} | SMALL
    response = resident.post(GENERATIONS, json=body)
    assert response.status_code == 200, response.text[:300]
    [item] = response.json()["data"]
    revised = resident.post(ENHANCE, json={"prompt": "a lighthouse", "seed": 4}).json()["revised_prompt"]
    assert item["revised_prompt"] == revised and revised
    assert np.abs(pixels(item["b64_json"]) - plain_image(plain, revised, 4)).max() <= 1
    # The stored record and the PNG keep both prompts.
    record = resident.get(f"/v1/images/{item['id']}").json()
    assert record["prompt"] == "a lighthouse" and record["parameters"]["revised_prompt"] == revised
    text = Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).text["parameters"]
    assert text.startswith(revised) and "Original prompt: a lighthouse" in text


def test_per_image_expansions_differ_and_are_reproducible(resident):
    body = {"prompt": "a bridge", "seed": 10, "n": 2, "enhance_prompt": "per_image"} | SMALL
    first, again = (resident.post(GENERATIONS, json=body).json()["data"] for _ in range(2))
    revised = [item["revised_prompt"] for item in first]
    assert revised == [item["revised_prompt"] for item in again]
    assert revised[0] != revised[1]
    seeded = resident.post(ENHANCE, json={"prompt": "a bridge", "seed": 11}).json()["revised_prompt"]
    assert revised[1] == seeded  # image i's expansion is sampled with image i's seed


def test_without_enhance_prompt_the_answer_is_byte_identical_to_enhance_false(settings, runner):
    chat = ChatServer()  # rewrites every prompt it is sent, so an enhancement would show
    try:
        with serving(settings, runner, prompt_enhancer=chat.url, prompt_enhancer_model="qwen3-max") as client:
            body = {"prompt": "a kettle", "seed": 3, "store": False} | SMALL
            absent = client.post(GENERATIONS, json=body).json()["data"][0]
            off = client.post(GENERATIONS, json=body | {"enhance_prompt": False}).json()["data"][0]
            assert absent["b64_json"] == off["b64_json"] and absent["revised_prompt"] is None
            assert chat.requests == []
            on = client.post(GENERATIONS, json=body | {"enhance_prompt": True}).json()["data"][0]
            assert on["revised_prompt"] == "A detailed picture of a kettle." and on["b64_json"] != off["b64_json"]
    finally:
        chat.close()


def test_the_dall_e_as_is_prefix_is_honoured(resident, plain):
    prompt = f"{DALL_E_VERBATIM_PREFIX} a blue cube"
    response = resident.post(GENERATIONS, json={"prompt": prompt, "seed": 2, "enhance_prompt": True} | SMALL)
    [item] = response.json()["data"]
    assert item["revised_prompt"] is None
    assert np.abs(pixels(item["b64_json"]) - plain_image(plain, "a blue cube", 2)).max() <= 1
    assert resident.post(ENHANCE, json={"prompt": prompt}).json()["fallback"] == "skipped_prefix"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (GENERATIONS, {"prompt": "a cat", "enhance_prompt": "yes"}, "enhance_prompt"),
        (GENERATIONS, {"prompt": "a cat", "variation_strength": 1.5}, "variation_strength"),
        (GENERATIONS, {"prompt": "a cat", "variation_strength": -0.1}, "variation_strength"),
        (ENHANCE, {"prompt": "x" * 40_000}, "prompt"),
        (ENHANCE, {"prompt": ""}, "prompt"),
        (ENHANCE, {"prompt": "a cat", "seed": -1}, "seed"),
        ("/sdapi/v1/txt2img", {"prompt": "a cat", "enhance_prompt": "always"}, "enhance_prompt"),
    ],
)
def test_bad_enhancement_and_variation_input_is_a_400_envelope(resident, path, body, param):
    response = resident.post(path, json=body)
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["param"] == param and "Traceback" not in response.text


def test_a_server_with_the_enhancer_off_says_so(settings, runner):
    with serving(settings, runner, prompt_enhancer="off") as client:
        response = client.post(GENERATIONS, json={"prompt": "a cat", "enhance_prompt": True} | SMALL)
        assert response.status_code == 400 and "Z_IMAGE_PROMPT_ENHANCER=off" in response.json()["error"]["message"]
        assert client.post(ENHANCE, json={"prompt": "a cat"}).status_code == 400


def test_a_chat_backend_revises_and_never_fails_a_request(settings, runner):
    chat = ChatServer()
    chat.replies = {
        "a quiet pond": '```json\n{"prompt": "A still pond at dawn, mist over reeds, a heron on the far bank."}\n```',
        "a failing pond": (500, b'{"error": "overloaded"}'),
        "a thinking pond": "<think>the user wants a pond</think>A pond in a forest clearing.",
    }
    try:
        with serving(settings, runner, prompt_enhancer=chat.url, prompt_enhancer_model="qwen3-max") as client:
            def revised(prompt: str) -> str | None:
                response = client.post(GENERATIONS, json={"prompt": prompt, "enhance_prompt": True} | SMALL)
                assert response.status_code == 200, response.text[:300]
                return response.json()["data"][0]["revised_prompt"]

            assert revised("a quiet pond") == "A still pond at dawn, mist over reeds, a heron on the far bank."
            assert revised("a thinking pond") == "A pond in a forest clearing."
            assert revised("a failing pond") is None
            metrics = client.get("/metrics").text
            assert 'zimage_prompt_enhancer_fallbacks_total{reason="backend_error"} 1.0' in metrics
            assert chat.requests[0]["model"] == "qwen3-max"
            assert chat.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    finally:
        chat.close()


# -- seed variation -----------------------------------------------------------------------------


def test_variation_zero_is_bit_identical_and_a_strength_is_reproducible(resident):
    body = {"prompt": "a windmill", "seed": 12, "store": False} | SMALL
    plain_answer = resident.post(GENERATIONS, json=body).json()["data"][0]["b64_json"]
    zero = resident.post(GENERATIONS, json=body | {"variation_strength": 0}).json()["data"][0]["b64_json"]
    assert zero == plain_answer
    varied = [resident.post(GENERATIONS, json=body | {"variation_strength": 0.3}).json()["data"][0] for _ in range(2)]
    assert varied[0]["b64_json"] == varied[1]["b64_json"]
    assert np.abs(pixels(varied[0]["b64_json"]) - pixels(plain_answer)).max() > 0


def test_a_varied_image_is_the_plain_pipeline_fed_the_varied_embedding(runner, plain):
    from conftest import generate, make_spec

    [[image]] = generate(runner, [make_spec("a barn", (5,), num_inference_steps=2, variation_strength=0.2)])
    embeds, _ = plain.encode_prompt("a barn", device="cpu", do_classifier_free_guidance=False, max_sequence_length=64)
    noise = torch.randn(embeds[0].shape, generator=torch.Generator("cpu").manual_seed(5))
    varied = embeds[0] + noise * 0.2 * embeds[0].float().std()
    expected = plain(
        prompt_embeds=[varied], width=64, height=64, num_inference_steps=2, guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1


def test_a_batched_varied_image_equals_its_solo_image(runner):
    from conftest import generate, make_spec

    [[alone]] = generate(runner, [make_spec("a barn", (8,), variation_strength=0.3)])
    together = generate(runner, [make_spec("a tall tree", (1, 2), variation_strength=0.3), make_spec("a barn", (8,), variation_strength=0.3)])
    assert np.abs(np.asarray(together[1][0], np.int16) - np.asarray(alone, np.int16)).max() <= 1
    [[unvaried]] = generate(runner, [make_spec("a barn", (8,))])
    assert np.abs(np.asarray(unvaried, np.int16) - np.asarray(alone, np.int16)).max() > 1  # it was varied
