"""Offload choice, attention backends and compile modes, on the CPU and with the tiny pipeline."""

from __future__ import annotations

import pytest
import torch

from conftest import generate
from test_settings import run_cli
from zimage_server.acceleration import (
    AttentionPlan,
    captions_need_mask,
    choose_offload,
    component_sizes,
    resolve_attention,
)
from zimage_server.memory_plan import GIB, full_size_components
from zimage_server.settings import SettingsError

# The real Z-Image-Turbo in bf16: the memory model's full-size sizes (memory_plan.py).
REAL = full_size_components()


# The ladder at 1024x1024, batch 1, with the 1.25 GiB margin: everything resident needs ~21.9 GiB,
# the text encoder streamed ~14.4, model offload ~13.2.
@pytest.mark.parametrize(
    "free_gib, mode",
    [(79, "none"), (23, "none"), (21, "text_encoder"), (15.5, "text_encoder"), (14.6, "text_encoder"), (13.3, "model"),
     (8, "model")],
)
def test_offload_is_the_lightest_mode_that_fits(free_gib, mode):
    chosen, _slicing, reason = choose_offload(int(free_gib * GIB), REAL)
    assert chosen == mode
    assert f"{free_gib:.1f} GiB" in reason


def test_offload_reason_says_when_even_model_offload_does_not_fit():
    chosen, _slicing, reason = choose_offload(4 * GIB, REAL)
    assert chosen == "model" and "does not fit" in reason


def test_a_full_batch_on_a_24_gb_card_stays_resident_with_vae_slicing():
    # Unsliced, four 1024x1024 decodes need ~25 GiB: the bug where `none` ran out of memory.
    chosen, slicing, _reason = choose_offload(24 * GIB, REAL, batch=4)
    assert (chosen, slicing) == ("none", True)
    assert choose_offload(79 * GIB, REAL, batch=4)[:2] == ("none", False)


def test_component_sizes_count_two_streamed_text_encoder_blocks(runner):
    from types import SimpleNamespace

    from transformers import Qwen3Config, Qwen3Model

    from zimage_server.acceleration import module_bytes
    from zimage_server.testing import TINY_TEXT_ENCODER

    # Four blocks, so streaming (two on the device at a time) really holds less than all of them.
    encoder = Qwen3Model(Qwen3Config(**(TINY_TEXT_ENCODER | {"num_hidden_layers": 4}), vocab_size=64))
    pipeline = SimpleNamespace(text_encoder=encoder, transformer=runner.pipeline.transformer, vae=runner.pipeline.vae)
    sizes = component_sizes(pipeline)
    block = module_bytes(encoder.layers[0])
    assert sizes.text_encoder == module_bytes(encoder)
    assert sizes.text_encoder_streamed == sizes.text_encoder - 2 * block
    assert sizes.transformer == module_bytes(runner.pipeline.transformer) and sizes.vae > 0


def test_auto_attention_on_cpu_is_native_and_takes_masks():
    assert resolve_attention("auto", torch.device("cpu"), torch.float32) == AttentionPlan("native", True)


@pytest.mark.parametrize("name", ["flash", "_flash_3", "no_such_backend"])
def test_an_unusable_attention_backend_is_a_settings_error(name):
    with pytest.raises(SettingsError, match=f"Z_IMAGE_ATTENTION='{name}'"):
        resolve_attention(name, torch.device("cpu"), torch.float32)


def test_serve_with_an_unusable_attention_backend_fails_in_one_line(models_dir):
    result = run_cli("serve", "--attention", "flash", env={"MODELS_DIR": str(models_dir), "Z_IMAGE_DEVICE": "cpu"})
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "Z_IMAGE_ATTENTION='flash'" in line and "not usable on cpu" in line


def test_a_maskless_backend_hands_mixed_length_batches_to_the_fallback():
    plan = AttentionPlan("_flash_3", handles_masks=False)
    assert plan.backend_for(needs_mask=False) == "_flash_3"
    assert plan.backend_for(needs_mask=True) == "native"
    assert AttentionPlan("native", True).backend_for(needs_mask=True) == "native"


def test_captions_need_a_mask_only_when_their_padded_lengths_differ():
    assert not captions_need_mask([5, 17, 32], 32)
    assert captions_need_mask([32, 33], 32)
    assert not captions_need_mask([40], 32)


@pytest.mark.parametrize("mode", ["text_encoder", "model"])
def test_offload_modes_give_the_same_images_for_generations_and_edits(runner, settings, mode):
    # On a CPU the modes save nothing, but the placement code, the hooks, the edit pipelines built
    # over offloaded modules and the cached-embedding path all run as they would on a GPU.
    from PIL import Image

    from test_runner import pixels, spec
    from zimage_server.runner import load_runner

    offloaded = load_runner(settings.replace(offload=mode))
    assert offloaded.acceleration.offload == mode
    request = spec("a red chair", (3,), negative_prompt="blurry")
    [[expected]], [[image]] = generate(runner, [request]), generate(offloaded, [request])
    assert abs(pixels(image) - pixels(expected)).max() <= 1
    gray = Image.new("RGB", (64, 64), (128, 128, 128))
    edit = spec("a red chair", (4,), mode="img2img", images=(gray,), strength=0.6)
    [[expected]], [[image]] = generate(runner, [edit]), generate(offloaded, [edit])
    assert abs(pixels(image) - pixels(expected)).max() <= 1


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_compiled_transformers_give_the_same_images(runner, settings, mode):
    # The eager backend runs dynamo's tracing (where fullgraph breaks would show) without inductor's
    # C++ compile, so this stays fast on a CPU; the GPU benchmark compiles with inductor.
    from test_runner import pixels, spec
    from zimage_server.acceleration import apply_compile
    from zimage_server.runner import load_runner

    compiled = load_runner(settings)
    apply_compile(compiled.pipeline.transformer, mode, backend="eager")
    requests = [spec("a red chair", (3,)), spec("a much longer prompt about a lighthouse at dawn", (4,))]
    for expected, image in zip(sum(generate(runner, requests), []), sum(generate(compiled, requests), []), strict=True):
        assert abs(pixels(image) - pixels(expected)).max() <= 1


def test_a_mixed_length_batch_on_a_maskless_backend_runs_on_the_fallback(runner, settings):
    # On a CPU, PyTorch's own flash kernel runs but refuses masks: the case of flash/_flash_3 on a GPU.
    import dataclasses

    from test_runner import pixels, spec
    from zimage_server.runner import ModelRunner

    plan = resolve_attention("_native_flash", torch.device("cpu"), torch.float32)
    assert plan == AttentionPlan("_native_flash", handles_masks=False)
    flash = ModelRunner(runner.pipeline, settings, runner.device, runner.dtype)
    flash.acceleration = dataclasses.replace(flash.acceleration, attention=plan)
    mixed = [spec("a cat", (1,)), spec("a very long prompt about a lighthouse on a rocky coast at dawn " * 3, (2,))]
    for expected, image in zip(sum(generate(runner, mixed), []), sum(generate(flash, mixed), []), strict=True):
        assert abs(pixels(image) - pixels(expected)).max() <= 1
    # Without the fallback the same batch fails, so it really needed a mask.
    flash.acceleration = dataclasses.replace(flash.acceleration, attention=AttentionPlan("_native_flash", True))
    with pytest.raises(ValueError, match="attn_mask"):
        generate(flash, mixed)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_weights_count_at_the_memory_models_bytes_per_weight_and_row(kind):
    from torchao.quantization import quantize_

    from zimage_server.acceleration import module_bytes
    from zimage_server.checkpoints import torchao_config
    from zimage_server.memory_plan import WEIGHT_FORMATS

    layers = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))
    layers = layers.to(torch.bfloat16)
    assert module_bytes(layers) == 2 * 256 * 512 * 2
    quantize_(layers, torchao_config(kind))
    # The quantized tensors report their logical dtype's two bytes a weight; the inner tensors are what they hold.
    assert module_bytes(layers) == WEIGHT_FORMATS[kind].weight_bytes(2 * 256 * 512, 512 + 256)


@pytest.mark.parametrize("mode", ["none", "text_encoder", "model"])
def test_placement_answers_are_pinned_to_what_diffusers_walks_to(settings, mode):
    """Every pipeline the runner holds answers its execution device, and each model its dtype,
    as diffusers' own walk over the submodules does, without walking: a hook added afterwards
    (which would change the walk's answer) is not looked for."""
    from diffusers import DiffusionPipeline, ModelMixin, ZImagePipeline

    from zimage_server.runner import load_runner

    runner = load_runner(settings.replace(offload=mode, variant="turbo"))
    pipelines = {id(p): p for p in [*runner.mode_pipelines.values(), runner.hires_pipeline]}.values()
    assert len(pipelines) == 4  # text-to-image; img2img and inpaint for edits; img2img for the hires fix
    for pipeline in pipelines:
        assert isinstance(pipeline, DiffusionPipeline) and type(pipeline).__name__ == type(pipeline).__mro__[1].__name__
        walked = DiffusionPipeline._execution_device.fget(pipeline)
        assert pipeline._execution_device == walked == runner.execution_device
        for model in (pipeline.transformer, pipeline.vae):
            assert model.dtype == ModelMixin.dtype.fget(model) == torch.float32
    assert type(runner.pipeline).__mro__[1] is ZImagePipeline
    runner.pipeline.vae.__dict__["_pinned"]["dtype"] = torch.float16  # what the walk would never say
    assert runner.pipeline.vae.dtype == torch.float16 != ModelMixin.dtype.fget(runner.pipeline.vae)
    # Pinning again walks again, whatever was pinned before.
    from zimage_server.acceleration import pin_placement

    runner.pipeline.vae.to(torch.float64)
    pin_placement(runner.pipeline)
    assert runner.pipeline.vae.dtype == torch.float64 and runner.pipeline.transformer.dtype == torch.float32


@pytest.mark.parametrize(("mode", "inference"), [("none", True), ("text_encoder", True), ("model", False)])
def test_calls_run_in_inference_mode_unless_model_offload_moves_the_weights_inside_them(settings, mode, inference):
    """Model offload's hooks move the weights during the call: in inference mode that would leave
    them inference tensors, which the next LoRA swap (outside it) could not write."""
    from test_runner import spec
    from zimage_server.runner import load_runner

    runner = load_runner(settings.replace(offload=mode))
    seen: list[bool] = []
    runner.pipeline.transformer.register_forward_pre_hook(lambda *_: seen.append(torch.is_inference_mode_enabled()))
    generate(runner, [spec("a red chair", (3,))])
    assert seen and set(seen) == {inference}
    assert not any(p.is_inference() for p in runner.pipeline.transformer.parameters())
