"""The runner on the tiny pipeline: seeds mean what they mean in diffusers, batching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import ZImagePipeline

from conftest import assert_each_is_the_diffusers_image, generate, make_spec
from zimage_server.model_layout import IncompleteModelError, verify_model_dir
from zimage_server.runner import load_runner
from zimage_server.specs import GenerationCancelled, GenerationSpec


def spec(prompt: str, seeds: tuple[int, ...], **overrides) -> GenerationSpec:
    return make_spec(prompt, seeds, **({"guidance_scale": 3.0} | overrides))


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_image_i_is_what_diffusers_returns_for_seed_plus_i(runner, settings):
    direct = ZImagePipeline.from_pretrained(settings.model_dir)
    direct.set_progress_bar_config(disable=True)
    [images] = generate(runner, [spec("a red chair", (41, 42))])
    call = dict(width=64, height=64, num_inference_steps=3, guidance_scale=3.0, max_sequence_length=64)
    assert_each_is_the_diffusers_image(images, direct, 41, "a red chair", **call)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_one_image_a_call_is_diffusers_image_bit_for_bit(runner, settings, guidance_scale):
    """The runner's own ways (cached embeddings, pinned placement, inference mode, the uint8
    conversion on the device) change no bit of a call diffusers would make alike."""
    direct = ZImagePipeline.from_pretrained(settings.model_dir)
    direct.set_progress_bar_config(disable=True)
    call = dict(width=128, height=128, num_inference_steps=3, guidance_scale=guidance_scale)
    [[image]] = generate(runner, [spec("a red chair", (41,), negative_prompt="blurry", **call)])
    generator = torch.Generator("cpu").manual_seed(41)
    expected = direct("a red chair", negative_prompt="blurry", generator=generator, max_sequence_length=64, **call)
    assert np.array_equal(np.asarray(image), np.asarray(expected.images[0]))


def test_a_request_gives_the_same_image_alone_and_inside_a_batch_of_other_prompts(runner):
    [[alone]] = generate(runner, [spec("a cat on a chair", (7,))])
    batched = generate(runner, 
        [
            spec("a much longer prompt about mountains at sunset in watercolor", (100, 101)),
            spec("a cat on a chair", (7,)),
            spec("astronaut", (5,), negative_prompt="blurry, low quality"),
        ]
    )
    assert np.abs(pixels(batched[1][0]) - pixels(alone)).max() <= 1
    # The batch really held distinct images, so the comparison above is not vacuous.
    assert np.abs(pixels(batched[0][0]) - pixels(alone)).max() > 10


def test_different_seeds_give_different_images(runner):
    [images] = generate(runner, [spec("a cat", (1, 2))])
    assert np.abs(pixels(images[0]) - pixels(images[1])).max() > 10


def test_loader_refuses_an_incomplete_folder(tmp_path, settings, models_dir):
    broken = tmp_path / "z-image-turbo"
    broken.mkdir()
    (broken / "model_index.json").write_text((models_dir / "z-image-turbo" / "model_index.json").read_text())
    with pytest.raises(IncompleteModelError, match="is missing"):
        verify_model_dir(broken)
    with pytest.raises(IncompleteModelError):
        load_runner(settings.replace(models_dir=tmp_path))


def test_loader_reports_the_rope_limits_of_the_loaded_transformer(runner):
    # The tiny model keeps the real geometry: 256 rope positions a side, 16 pixels each.
    assert (runner.max_width, runner.max_height) == (4096, 4096)


class RecordingObserver:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.steps: list[tuple[int, int, tuple]] = []
        self.cancel_after = cancel_after

    @property
    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.steps) >= self.cancel_after

    def wants_previews(self, step, total) -> bool:
        return False

    def on_step(self, step, total, latents, previews) -> None:
        self.steps.append((step, total, tuple(latents.shape)))


def test_observers_see_every_step_with_only_their_own_latents(runner):
    observer = RecordingObserver()
    generate(runner, [spec("a", (1, 2), observer=observer), spec("b", (3,))])
    assert [(step, total) for step, total, _ in observer.steps] == [(1, 3), (2, 3), (3, 3)]
    assert all(shape[0] == 2 for _, _, shape in observer.steps)


def test_a_call_whose_every_request_was_cancelled_stops_at_the_next_step(runner):
    first, second = RecordingObserver(cancel_after=1), RecordingObserver(cancel_after=1)
    with pytest.raises(GenerationCancelled):
        generate(
            runner,
            [
                spec("a", (1,), observer=first, num_inference_steps=50),
                spec("b", (2,), observer=second, num_inference_steps=50),
            ],
        )
    assert len(first.steps) == 1 and len(second.steps) == 1


def test_the_tiny_builder_never_writes_over_a_real_model(tmp_path, models_dir):
    import shutil

    from zimage_server.testing import WouldOverwriteRealModel, write_tiny_pipeline

    real = tmp_path / "z-image-turbo"
    shutil.copytree(models_dir / "z-image-turbo", real)
    (real / "TINY_RANDOM_MODEL.json").unlink()  # now it looks like real weights
    before = (real / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(WouldOverwriteRealModel):
        write_tiny_pipeline(real)
    assert (real / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    write_tiny_pipeline(tmp_path / "fresh")
    write_tiny_pipeline(tmp_path / "fresh")  # a tiny model is rewritten freely


def test_images_leave_the_lock_as_exactly_what_diffusers_pil_output_gives():
    from diffusers.image_processor import VaeImageProcessor

    from zimage_server.runner import to_images

    decoded = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1  # VAE range, overshoot
    processor = VaeImageProcessor()
    expected = processor.postprocess(decoded, output_type="pil")
    got = to_images(processor.postprocess(decoded, output_type="pt"))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected, strict=True))


def test_a_png_response_decodes_to_exactly_the_runners_pixels(client, runner):
    import base64
    import io

    from PIL import Image

    response = client.post("/v1/images/generations", json={"prompt": "a red chair", "size": "64x64", "seed": 41, "n": 2,
                                                          "num_inference_steps": 3, "max_sequence_length": 64})
    served = [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]
    [made] = generate(runner, [spec("a red chair", (41, 42), guidance_scale=0.0, max_sequence_length=64)])
    assert response.status_code == 200 and len(served) == 2
    assert all(np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b)) for a, b in zip(served, made, strict=True))
