"""The hires fix on the tiny model: both passes equal plain diffusers calls, A1111's sizes and steps."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline
from PIL import Image

from conftest import generate, make_spec
from test_runner import RecordingObserver
from zimage_server.hires import LATENT_MODES, HiresTarget, UnknownUpscaler, a1111_target, hires_params
from zimage_server.specs import HiresParams


def hires(target: HiresTarget, upscaler: str = "Latent", steps: int = 2, strength: float = 0.5, **limits) -> HiresParams:
    return hires_params(
        target,
        upscaler=upscaler,
        steps=steps,
        strength=strength,
        guidance_scale=0.0,
        upscaler_exists=lambda name: False,
        max_width=limits.get("max_width", 2048),
        max_height=limits.get("max_height", 2048),
        max_pixels=limits.get("max_pixels", 2048 * 2048),
    )


def hires_spec(prompt: str, seeds: tuple[int, ...], second: HiresParams, **overrides):
    spec = make_spec(prompt, seeds, **overrides)
    return dataclasses.replace(spec, params=dataclasses.replace(spec.params, hires=second))


@pytest.fixture(scope="module")
def plain(settings):
    """The reference: plain diffusers pipelines from the same folder, img2img over the same modules."""
    text_to_image = ZImagePipeline.from_pretrained(settings.model_dir)
    text_to_image.set_progress_bar_config(disable=True)
    image_to_image = ZImageImg2ImgPipeline(**text_to_image.components)
    image_to_image.set_progress_bar_config(disable=True)
    return text_to_image, image_to_image


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def second_pass_steps(steps: int, strength: float) -> int:
    return int(steps / min(strength, 0.999))


# -- A1111's sizes ------------------------------------------------------------------------------


def test_scale_multiplies_the_first_pass():
    target = a1111_target(512, 768, scale=2.0, resize_x=0, resize_y=0)
    assert (target.upscale_width, target.upscale_height) == (1024, 1536)
    assert target.output_size == (1024, 1536)
    # int() of the product, then A1111's latents (8 px) decide the decoded size: 512 x 1.3 = 665 -> 664.
    assert a1111_target(512, 512, scale=1.3, resize_x=0, resize_y=0).output_size == (664, 664)


def test_one_resize_side_keeps_the_aspect_ratio():
    assert a1111_target(512, 768, scale=2, resize_x=1000, resize_y=0).output_size == (1000, 1496)
    assert a1111_target(512, 768, scale=2, resize_x=0, resize_y=1000).output_size == (664, 1000)


def test_both_resize_sides_cover_then_crop_as_a1111_does():
    # A portrait first pass to a square: scaled to cover 1024 wide (1024x1536), then 512 px of
    # height cut, 256 above and 256 below (A1111 truncates latent rows: 32 on top, 32 below).
    target = a1111_target(512, 768, scale=2, resize_x=1024, resize_y=1024)
    assert (target.upscale_width, target.upscale_height, target.truncate_x, target.truncate_y) == (1024, 1536, 0, 64)
    assert target.output_size == (1024, 1024)
    assert target.crop_origin == (0, 256)
    # An odd number of latent rows to cut: the extra one goes below.
    odd = a1111_target(512, 520, scale=2, resize_x=600, resize_y=600)
    assert odd.truncate_y % 2 == 1 and odd.crop_origin[1] == odd.truncate_y // 2 * 8
    assert (odd.cover_size, odd.output_size, odd.crop_origin) == ((600, 608), (600, 600), (0, 0))


def test_the_second_pass_runs_at_multiples_of_16_and_answers_a1111s_size():
    second = hires(a1111_target(512, 512, scale=1.3, resize_x=0, resize_y=0))
    assert (second.width, second.height) == (656, 656)
    assert (second.output_width, second.output_height) == (664, 664)


def test_unknown_upscalers_and_oversized_targets_are_refused():
    with pytest.raises(UnknownUpscaler, match="could not find upscaler named 4x-Nothing"):
        hires(HiresTarget(128, 128), upscaler="4x-Nothing")
    with pytest.raises(ValueError, match="above this server's limits"):
        hires(HiresTarget(4096, 4096))
    for strength in (0, 1e-9, 0.009):  # a schedule of steps / strength: a billion steps at 1e-9
        with pytest.raises(ValueError, match="must be 0.01..1"):
            hires(HiresTarget(128, 128), strength=strength)


def test_the_schedule_length_makes_diffusers_run_exactly_the_steps_asked():
    from zimage_server.specs import img2img_steps

    misses = 0
    for steps in range(1, 201):
        for strength in [0.01 * i for i in range(1, 101)] + [0.68, 0.999]:
            second = hires(HiresTarget(128, 128), steps=steps, strength=strength)
            misses += int(steps / min(strength, 0.999)) != second.schedule_length
            assert img2img_steps(second.schedule_length, strength) == steps, (steps, strength)
    assert misses > 0  # A1111's formula alone misses some (51 steps at 0.68 would run 52)


# -- the two passes -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["Latent", "Latent (bicubic antialiased)", "Latent (nearest-exact)"])
def test_latent_hires_equals_plain_diffusers_passes(runner, plain, mode):
    text_to_image, image_to_image = plain
    second = hires(HiresTarget(128, 96), upscaler=mode, steps=2, strength=0.6)
    [images] = generate(runner, [hires_spec("a lighthouse", (11, 12), second)])
    # The reference: latents out of the first pass, interpolated as A1111 does, handed to img2img
    # as latents (its image processor told they are: 16 channels).
    image_to_image.image_processor.register_to_config(vae_latent_channels=16)
    interpolation, antialias = LATENT_MODES[mode]
    for seed, image in zip((11, 12), images, strict=True):
        latents = text_to_image(
            "a lighthouse", width=64, height=64, num_inference_steps=3, guidance_scale=0.0, max_sequence_length=64,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
        ).images  # fmt: skip
        upscaled = torch.nn.functional.interpolate(latents, size=(12, 16), mode=interpolation, antialias=antialias)
        expected = image_to_image(
            "a lighthouse", image=upscaled, strength=0.6, num_inference_steps=second_pass_steps(2, 0.6),
            width=128, height=96, guidance_scale=0.0, max_sequence_length=64,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]  # fmt: skip
        assert image.size == (128, 96)
        assert np.abs(pixels(image) - pixels(expected)).max() <= 1


def test_lanczos_hires_equals_plain_diffusers_passes(runner, plain):
    text_to_image, image_to_image = plain
    second = hires(HiresTarget(96, 128), upscaler="Lanczos", steps=3, strength=0.3)
    [[image]] = generate(runner, [hires_spec("a red kite", (5,), second)])
    first = text_to_image(
        "a red kite", width=64, height=64, num_inference_steps=3, guidance_scale=0.0, max_sequence_length=64,
        generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    expected = image_to_image(
        "a red kite", image=first.resize((96, 128), Image.Resampling.LANCZOS), strength=0.3,
        num_inference_steps=second_pass_steps(3, 0.3), width=96, height=128, guidance_scale=0.0,
        max_sequence_length=64, generator=torch.Generator("cpu").manual_seed(5),
    ).images[0]  # fmt: skip
    assert np.abs(pixels(image) - pixels(expected)).max() <= 1


@pytest.mark.parametrize(("steps", "strength"), [(2, 0.1), (3, 0.3), (4, 0.5), (3, 0.7), (2, 1.0), (51, 0.68)])
def test_the_second_pass_runs_exactly_its_steps_and_progress_counts_both_passes(runner, steps, strength):
    observer = RecordingObserver()
    second = hires(HiresTarget(96, 96), steps=steps, strength=strength)
    generate(runner, [hires_spec("a fox", (3,), second, observer=observer)])
    total = 3 + steps
    assert [(step, of) for step, of, _ in observer.steps] == [(step, total) for step in range(1, total + 1)]
    # The latents reported switch to the second pass's size after the first pass's 3 steps.
    assert observer.steps[2][2][2:] == (8, 8) and observer.steps[3][2][2:] == (12, 12)


def test_a_batched_hires_image_equals_its_solo_image(runner):
    second = hires(HiresTarget(96, 96), upscaler="Latent", steps=2, strength=0.5)
    [[alone]] = generate(runner, [hires_spec("a boat", (21,), second)])
    calls = runner.calls
    together = generate(runner, [hires_spec("an old map of the sea", (8, 9), second), hires_spec("a boat", (21,), second)])
    assert runner.calls == calls + 1  # one call for both requests
    assert np.abs(pixels(together[1][0]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(together[0][0]) - pixels(alone)).max() > 10


def test_a1111_sizes_that_are_not_multiples_of_16_come_back_exact(runner):
    # 64 x 1.3 = 83 px: A1111 decodes 83 // 8 latents, 80 px, and so does the second pass here.
    second = hires(a1111_target(64, 64, scale=1.3, resize_x=0, resize_y=0))
    [[image]] = generate(runner, [hires_spec("a bell", (1,), second)])
    assert image.size == (second.output_width, second.output_height) == (80, 80)
    crop = hires(a1111_target(64, 96, scale=2, resize_x=136, resize_y=136))
    [[cropped]] = generate(runner, [hires_spec("a bell", (1,), crop)])
    assert cropped.size == (136, 136)
