"""The memory simulation on the tiny config, the committed memory model, and `zimage-server plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from zimage_server.acceleration import choose_offload
from zimage_server.memory_plan import (
    GIB,
    TEXT_ENCODER_PARAMS,
    TEXT_ENCODER_QUANTIZABLE_PARAMS,
    TEXT_ENCODER_QUANTIZABLE_ROWS,
    TEXT_ENCODER_STREAMED_PARAMS,
    TRANSFORMER_PARAMS,
    TRANSFORMER_QUANTIZABLE_ROWS,
    VAE_PARAMS,
    WEIGHT_FORMATS,
    full_size_components,
    plan,
    predict_peak,
    transformer_bytes,
)

REPO = Path(__file__).resolve().parent.parent
# benchmarks/memory_plan.py, full size, 1024x1024, bf16 (docs/benchmarks.md; REFERENCE.md has the same figures).
SIMULATED_GIB = {
    ("none", 1, False): 20.618,
    ("none", 4, False): 25.133,
    ("none", 4, True): 21.218,
    ("text_encoder", 1, False): 13.126,
    ("text_encoder", 4, False): 17.640,
    ("text_encoder", 4, True): 13.726,
    ("model", 1, False): 11.991,
    ("model", 4, True): 13.570,
}
TOLERANCE_GIB = 0.02


def test_the_simulation_counts_the_tiny_models_weights_and_every_stage():
    import torch

    from zimage_server.architecture import TINY
    from zimage_server.memory_sim import STAGES, simulate_call

    call = simulate_call(TINY, offload="none", width=64, height=64, batch=2, vae_slicing=False, steps=2, dtype=torch.float32)
    # Direct count: every parameter and buffer is one allocation, rounded up to 512 bytes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zimage_server.memory_sim import build_fake_pipeline

    pipeline = build_fake_pipeline(TINY, torch.float32, FakeTensorMode(allow_non_fake_inputs=True))
    rounded = sum(
        -(-t.numel() * t.element_size() // 512) * 512
        for name in ("text_encoder", "transformer", "vae")
        for t in [*getattr(pipeline, name).parameters(), *getattr(pipeline, name).buffers()]
    )
    assert set(call.stages) == set(STAGES)
    for stage in STAGES:
        assert call.stages[stage].start >= rounded  # all weights resident in mode none
        assert call.activation_bytes(stage) > 0
    assert call.peak_bytes == max(s.peak for s in call.stages.values())


def test_model_offload_in_the_simulation_keeps_the_transformer_off_the_device_while_encoding():
    from zimage_server.architecture import TINY
    from zimage_server.memory_sim import simulate_call

    resident = simulate_call(TINY, offload="none", width=64, height=64, batch=1, vae_slicing=False, steps=2)
    offloaded = simulate_call(TINY, offload="model", width=64, height=64, batch=1, vae_slicing=False, steps=2)
    assert offloaded.stages["text_encoder"].start < resident.stages["text_encoder"].start
    assert offloaded.stages["text_encoder"].start < offloaded.sizes.transformer


def test_the_simulated_device_answers_torch_accelerator_memory_calls_from_its_tracker():
    """Libraries call torch's accelerator memory API mid-call (accelerate >= 1.16 empties the cache on
    every model-offload move); on the simulated device it must answer, from the simulation's counts."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zimage_server.memory_sim import DeviceMemoryTracker, _tracker_as_allocator, simulated_device

    device = simulated_device()
    assert torch.accelerator.current_accelerator() == torch.device(device.type)
    tracker = DeviceMemoryTracker()
    with _tracker_as_allocator(tracker), FakeTensorMode(allow_non_fake_inputs=True), tracker:
        kept = torch.empty(1000, dtype=torch.uint8, device=device)
        torch.empty(5000, dtype=torch.uint8, device=device)  # freed at once
        torch.accelerator.empty_cache()
        backend = torch.get_device_module(device.type)
        backend.empty_cache()
        assert torch.accelerator.memory_allocated() == backend.memory_allocated() == 1024
        assert torch.accelerator.max_memory_allocated() == 1024 + 5120
        torch.accelerator.reset_peak_memory_stats()
        assert torch.accelerator.max_memory_allocated() == 1024
        assert torch.accelerator.memory_stats()["allocated_bytes.all.current"] == 1024
        del kept
    assert torch.accelerator.memory_allocated is torch.accelerator.memory.memory_allocated  # restored


def test_model_offload_simulates_alike_on_accelerate_1_15_and_the_locked_release(tmp_path):
    """accelerate 1.15 never empties the cache mid-call, 1.16 does: the simulation gives one answer on both."""
    import accelerate

    def simulate(pythonpath: str | None) -> dict:
        code = (
            "import json, accelerate\n"
            "from zimage_server.architecture import TINY\n"
            "from zimage_server.memory_sim import simulate_call\n"
            "call = simulate_call(TINY, offload='model', width=64, height=64, batch=1, vae_slicing=False, steps=2)\n"
            "print(json.dumps({'accelerate': accelerate.__version__, 'peak': call.peak_bytes,\n"
            "                  'stages': {k: [v.start, v.peak] for k, v in call.stages.items()}}))\n"
        )
        env = os.environ | ({"PYTHONPATH": pythonpath} if pythonpath else {})
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.splitlines()[-1])

    old = tmp_path / "accelerate-1.15"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(old), "accelerate==1.15.0"],
        check=True,
    )
    on_old, on_locked = simulate(str(old)), simulate(None)
    assert on_old.pop("accelerate") == "1.15.0"
    assert on_locked.pop("accelerate") == accelerate.__version__ != "1.15.0"
    assert on_old == on_locked


def test_full_size_parameter_counts_match_a_fake_build():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zimage_server.acceleration import component_sizes
    from zimage_server.architecture import FULL_SIZE
    from zimage_server.memory_sim import build_fake_pipeline

    pipeline = build_fake_pipeline(FULL_SIZE, torch.bfloat16, FakeTensorMode(allow_non_fake_inputs=True))
    counts = {name: sum(p.numel() for p in getattr(pipeline, name).parameters()) for name in ("text_encoder", "transformer", "vae")}
    assert counts == {"text_encoder": TEXT_ENCODER_PARAMS, "transformer": TRANSFORMER_PARAMS, "vae": VAE_PARAMS}
    assert component_sizes(pipeline).text_encoder_streamed == 2 * TEXT_ENCODER_STREAMED_PARAMS
    # What torchao quantizes in the text encoder: every linear layer (one scale per output row).
    linears = [m for m in pipeline.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(m.weight.numel() for m in linears) == TEXT_ENCODER_QUANTIZABLE_PARAMS
    assert sum(m.out_features for m in linears) == TEXT_ENCODER_QUANTIZABLE_ROWS


@pytest.mark.parametrize("key", SIMULATED_GIB)
def test_the_model_reproduces_the_simulated_full_size_peaks(key):
    mode, batch, sliced = key
    predicted = predict_peak(full_size_components(), mode, 1024, 1024, batch, sliced).peak_bytes / GIB
    assert abs(predicted - SIMULATED_GIB[key]) <= TOLERANCE_GIB


def test_weight_formats_shrink_the_transformer_by_their_bytes_per_weight():
    bf16 = transformer_bytes(WEIGHT_FORMATS["bf16"])
    assert abs(bf16 / GIB - 11.46) < 0.01
    assert abs(transformer_bytes(WEIGHT_FORMATS["q8_0"]) / bf16 - 34 / 64) < 0.001
    assert abs(transformer_bytes(WEIGHT_FORMATS["q4_k"]) / bf16 - 144 / 512) < 0.001
    # int8 holds a scale and a zero point per row (5 bytes), fp8 a scale (4): one byte a row apart.
    int8, fp8 = transformer_bytes(WEIGHT_FORMATS["int8"]), transformer_bytes(WEIGHT_FORMATS["fp8"])
    assert int8 - fp8 == TRANSFORMER_QUANTIZABLE_ROWS and int8 < bf16 // 2 + GIB // 10


@pytest.mark.parametrize("gpu_gib, mode", [(24, "none"), (16, "text_encoder"), (13.5, "model")])
def test_choose_offload_follows_the_ladder(gpu_gib, mode):
    assert choose_offload(int(gpu_gib * GIB), full_size_components())[0] == mode


def test_a_24_gib_card_at_batch_4_slices_the_vae_decode():
    [none, *_] = plan(24 * GIB, 1024, 1024, 4)
    assert none.offload == "none" and none.vae_slicing and none.fits


def test_an_int8_text_encoder_alone_leaves_a_bf16_transformer_streaming_on_16_gib():
    bf16, te_int8, both_int8 = (plan(16 * GIB, quantize=q) for q in (None, "text_encoder=int8", "int8"))
    assert abs(bf16[0].predicted_peak_bytes - te_int8[0].predicted_peak_bytes - 3.38 * GIB) < 0.01 * GIB  # a byte less per linear weight
    assert not te_int8[0].fits and te_int8[1].fits
    # The ladder's resident 16 GB rung: both components in int8.
    assert both_int8[0].fits and both_int8[0].quantize == "transformer=int8,text_encoder=int8"
    assert not plan(12 * GIB, quantize="int8")[0].fits


def test_streaming_an_int8_text_encoder_holds_two_int8_blocks():
    bf16 = full_size_components()
    int8 = full_size_components(text_encoder_fmt=WEIGHT_FORMATS["int8"])
    block_bf16 = 2 * TEXT_ENCODER_QUANTIZABLE_PARAMS // 36
    assert bf16.text_encoder_streamed - int8.text_encoder_streamed == pytest.approx(2 * block_bf16 / 2, rel=0.01)


def test_an_already_quantized_transformer_takes_only_a_text_encoder_quantization(tmp_path):
    with pytest.raises(ValueError, match="quantize only the text encoder"):
        plan(16 * GIB, transformer="q8_0", quantize="int8")
    assert plan(16 * GIB, transformer="q8_0", quantize="text_encoder=int8")[0].fits


def test_smaller_cards_fit_with_a_quantized_transformer():
    assert plan(12 * GIB, transformer="bf16", quantize="transformer=int8")[1].fits  # text encoder streamed
    assert plan(8 * GIB, transformer="q6_k")[1].fits
    assert not any(row.fits for row in plan(8 * GIB, transformer="q8_0"))


def test_plan_json_runs_without_weights_or_torch():
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    code = "import sys; from zimage_server.cli import main; main(sys.argv[1:]); assert 'torch' not in sys.modules"
    result = subprocess.run(
        [sys.executable, "-c", code, "plan", "--gpu-memory", "16GiB", "--batch", "4", "--json"],
        env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    keys = {"offload", "transformer", "quantize", "width", "height", "batch", "vae_slicing", "predicted_peak_bytes", "fits"}
    assert [row["offload"] for row in rows] == ["none", "text_encoder", "model"]
    assert all(keys <= set(row) for row in rows)
    assert rows[1]["fits"] and rows[1]["vae_slicing"] and not rows[0]["fits"]


@pytest.mark.parametrize("qtype", ["Q8_0", "Q3_K"])  # Q3_K: a type the plan has no named format for
def test_plan_reads_a_gguf_files_tensor_types(tmp_path, qtype):
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from zimage_server.memory_plan import file_weight_bytes

    kind = GGMLQuantizationType[qtype]
    block, block_bytes = GGML_QUANT_SIZES[kind]
    path = tmp_path / "transformer.gguf"
    writer = GGUFWriter(str(path), "z-image")
    # Only the header is read: any bytes of the right length stand for the quantized blocks.
    writer.add_tensor("w", np.zeros((256, 256 // block * block_bytes), dtype=np.uint8), raw_dtype=kind)
    writer.add_tensor("norm", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    total, dequantized = file_weight_bytes(path)
    assert dequantized and total == 256 * 256 * block_bytes // block + 256 * 2


def test_the_gguf_formats_bytes_per_weight_are_ggmls():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for fmt in WEIGHT_FORMATS.values():
        if fmt.dequantized_per_layer:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.name.upper()]]
            assert fmt.bytes_per_weight == Fraction(block_bytes, block), fmt.name


def test_a_controlnet_counts_in_the_plan_and_at_start_up(tmp_path, runner):
    import torch
    from safetensors.torch import save_file

    from zimage_server.acceleration import component_sizes
    from zimage_server.testing import write_tiny_controlnet

    # A ControlNet file of 2 MiB of bf16 tensors: the plan reads their sizes from the header.
    path = tmp_path / "union.safetensors"
    save_file({"w": torch.zeros(1024, 1024, dtype=torch.bfloat16)}, path)
    with_controlnet = plan(16 * GIB, controlnet=path)
    without = plan(16 * GIB)
    for a, b in zip(with_controlnet, without):
        assert a.predicted_peak_bytes - b.predicted_peak_bytes == 1024 * 1024 * 2
    # At start-up the runner passes the ControlNet's own blocks (before from_transformer joins it).
    from diffusers import ZImageControlNetModel

    folder = write_tiny_controlnet(tmp_path / "tiny")
    controlnet = ZImageControlNetModel.from_pretrained(folder)
    own = sum(p.numel() * p.element_size() for p in controlnet.parameters())
    assert component_sizes(runner.pipeline, controlnet).controlnet == own > 0


def test_an_upscaler_counts_its_weights_everywhere_and_a_tiles_activations_in_an_upscale_stage(tmp_path):
    import dataclasses

    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    from zimage_server.memory_plan import upscaler_sizes
    from zimage_server.upscalers import DEFAULT_TILE, read_model, tile_activation_bytes

    path = tmp_path / "realesr-general-x4v3.safetensors"  # its shape (Compact, 64 features, 16 convs), random
    torch.manual_seed(0)
    module = Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4)
    save_file(module.state_dict(), path)
    weights, tile = upscaler_sizes(path)
    assert weights == 2 * sum(t.numel() for t in module.state_dict().values())  # bf16 on a CUDA card
    assert tile == tile_activation_bytes(read_model(path)[0], DEFAULT_TILE, torch.bfloat16)
    with_upscaler, without = plan(16 * GIB, upscaler=path), plan(16 * GIB)
    for a, b in zip(with_upscaler, without):
        assert a.predicted_peak_bytes - b.predicted_peak_bytes == weights and a.limiting_stage == b.limiting_stage
    # A 512 px tile of this net is 0.08 GiB (RealESRGAN_x4plus's ESRGAN: 1.0 GiB): the upscale stage
    # sets the peak only where its tile outgrows the stage beside it.
    sizes = dataclasses.replace(full_size_components(), upscaler=weights, upscaler_tile=tile)
    assert predict_peak(sizes, "model", 1024, 1024, 1, False).stage != "upscale"
    huge_tile = dataclasses.replace(sizes, upscaler_tile=40 * GIB)
    assert predict_peak(huge_tile, "model", 1024, 1024, 1, False).stage == "upscale"

    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    shown = subprocess.run(
        [sys.executable, "-m", "zimage_server.cli", "plan", "--gpu-memory", "16GiB", "--upscaler", str(path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"with upscaler realesr-general-x4v3: 0.00 GiB of weights resident, {tile / GIB:.2f} GiB" in shown.stdout
    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    broken = subprocess.run(
        [sys.executable, "-m", "zimage_server.cli", "plan", "--upscaler", str(tmp_path / "broken.pth")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert broken.returncode == 2 and broken.stderr.startswith("zimage-server: upscaler file broken.pth: ")
    assert len(broken.stderr.strip().splitlines()) == 1


def test_the_resident_enhancers_kv_cache_is_a_stage_beside_the_text_encoders_weights():
    from dataclasses import replace

    from zimage_server.memory_plan import ComponentSizes, enhancer_kv_bytes, plan, predict_peak

    assert enhancer_kv_bytes(400) == 144 * 1024 * (1024 + 400) and enhancer_kv_bytes(0) == 0
    sizes = ComponentSizes(text_encoder=8 * GIB, text_encoder_streamed=GIB, transformer=12 * GIB, vae=GIB // 4)
    # The enhance stage holds what encoding holds in that mode, less encoding's activations, plus the cache.
    resident_when_encoding = {"none": 8 * GIB + 12 * GIB + GIB // 4, "text_encoder": GIB + 12 * GIB + GIB // 4,
                              "model": 8 * GIB}  # fmt: skip
    for mode, weights in resident_when_encoding.items():
        with_kv = predict_peak(replace(sizes, enhancer_kv=64 * GIB), mode, 1024, 1024, 1, False)
        assert with_kv.stage == "enhance" and with_kv.peak_bytes == weights + 64 * GIB
    # At the default budget (about 200 MiB) it sets no peak on a 16 GiB card's plan.
    assert [row.offload for row in plan(16 * GIB, enhance_tokens=400) if row.fits] == ["text_encoder", "model"]
