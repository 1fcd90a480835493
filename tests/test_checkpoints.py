"""Transformers from one file (original/ComfyUI safetensors, GGUF quants) and quantization on load,
written from the tiny transformer and loaded through the real loader.

The image differences (0..1 scale, against the folder's fp32 model) that docs/checkpoints.md
quotes are printed by:

    pytest tests/test_checkpoints.py -k differ -s
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageTransformer2DModel
from safetensors.torch import save_file

from checkpoint_files import COMFYUI_PREFIX, HAND_WRITTEN, original_layout, write_gguf, write_safetensors
from conftest import generate, make_spec
from test_logging import is_failure_line
from test_loras import LAYOUTS, random_lora
from test_settings import run_cli
from zimage_server.model_layout import IncompleteModelError, verify_model_dir
from zimage_server.runner import load_runner
from zimage_server.settings import Settings

SPECS = [make_spec("a photo of a cat", (1, 2)), make_spec("portrait of an astronaut", (3,))]
# Loose ceilings on the largest pixel difference per format (measured figures in docs/checkpoints.md).
GGUF_CEILINGS = {"F16": 0.01, "BF16": 0.05, "Q8_0": 0.1, "Q5_1": 0.3, "Q4_0": 0.5, "Q6_K": 0.1, "Q5_K": 0.05, "Q4_K": 0.15}
SAFETENSORS_CEILINGS = {torch.float16: 0.01, torch.bfloat16: 0.05, torch.float8_e4m3fn: 0.3}
LORA = "pixel-art"


@pytest.fixture(scope="module")
def tiny_transformer(models_dir: Path) -> ZImageTransformer2DModel:
    return ZImageTransformer2DModel.from_pretrained(models_dir / "z-image-turbo" / "transformer")


@pytest.fixture(scope="module")
def tiny_state_dict(tiny_transformer) -> dict[str, torch.Tensor]:
    return tiny_transformer.state_dict()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_transformer) -> Path:
    """A MODELS_DIR whose model folder lacks the transformer's weights, as `download --transformer` leaves it."""
    root = tmp_path_factory.mktemp("checkpoints")
    folder = root / "z-image-turbo"
    shutil.copytree(models_dir / "z-image-turbo", folder)
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (root / "transformers").mkdir()
    (root / "loras").mkdir()
    save_file(LAYOUTS["diffusers"](random_lora(tiny_transformer, seed=1)), root / "loras" / f"{LORA}.safetensors")
    return root


@pytest.fixture(scope="module")
def reference(runner) -> list[np.ndarray]:
    """The folder's fp32 model's images (the shared runner), as 0..1 floats."""
    return images(runner)


def images(runner, specs=SPECS) -> list[np.ndarray]:
    return [np.asarray(image, dtype=np.float64) / 255 for batch in generate(runner, specs) for image in batch]


def difference(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """Largest and mean absolute pixel difference, 0..1 scale."""
    diffs = np.abs(np.stack(a) - np.stack(b))
    return float(diffs.max()), float(diffs.mean())


def served(root: Path, **settings) -> Settings:
    return Settings(models_dir=root, variant="turbo", device="cpu", store="none", **settings)


def test_a_folder_without_transformer_weights_is_complete_only_with_a_transformer_file(root):
    with pytest.raises(IncompleteModelError, match="transformer has no weights"):
        verify_model_dir(root / "z-image-turbo")
    verify_model_dir(root / "z-image-turbo", weights_elsewhere=("transformer",))


@pytest.mark.parametrize("prefix", ["", COMFYUI_PREFIX], ids=["original", "comfyui-prefix"])
def test_an_fp32_file_in_the_original_layout_gives_the_folders_images_exactly(root, tiny_state_dict, reference, prefix):
    name = f"original{prefix.count('.')}.safetensors"
    write_safetensors(root / "transformers" / name, original_layout(tiny_state_dict, prefix), torch.float32)
    runner = load_runner(served(root, transformer=Path(name)))
    assert all(np.array_equal(a, b) for a, b in zip(images(runner), reference, strict=True))


@pytest.mark.parametrize("dtype", list(SAFETENSORS_CEILINGS), ids=str)
def test_half_precision_and_fp8_files_differ_little(root, tiny_state_dict, reference, dtype):
    path = write_safetensors(root / "transformers" / f"{dtype}.safetensors", original_layout(tiny_state_dict), dtype)
    largest, mean = difference(images(load_runner(served(root, transformer=path))), reference)
    print(f"\nsafetensors {str(dtype).removeprefix('torch.')}: max {largest:.2e}, mean {mean:.2e}")
    assert 0 < largest <= SAFETENSORS_CEILINGS[dtype]


# Hand-written K-quant -> (values per sub-block, bits per value, symmetric grid).
K_QUANT_GRIDS = {"Q6_K": (16, 6, True), "Q5_K": (32, 5, False), "Q4_K": (32, 4, False)}


@pytest.mark.parametrize("quant_type", list(HAND_WRITTEN))
def test_hand_written_k_quants_decode_through_gguf_within_a_step(quant_type):
    import gguf

    qtype = gguf.GGMLQuantizationType[quant_type]
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    rows[0], rows[1], rows[2] = 0, np.abs(rows[1]), -np.abs(rows[2])
    encoded = HAND_WRITTEN[quant_type](rows)
    assert encoded.dtype == np.uint8 and encoded.shape == (8, 512 // block * type_size)
    size, bits, symmetric = K_QUANT_GRIDS[quant_type]
    values = rows.reshape(8, -1, size)
    error = np.abs(gguf.quants.dequantize(encoded, qtype).reshape(values.shape) - values).max(axis=-1)
    # A sub-block's grid spans ±its largest magnitude (Q6_K) or its values with 0 (Q4_K/Q5_K take a
    # positive minimum as 0) in 2**bits - 1 steps. Rounding costs half a step; one step leaves room
    # for the 6-bit and int8 sub-block scales, but not for a value decoded from the wrong position.
    span = 2 * np.abs(values).max(axis=-1) if symmetric else values.clip(min=0).max(-1) - values.clip(max=0).min(-1)
    assert (error <= span / (2**bits - 1) + 1e-6).all()
    assert not error[0].any()  # the all-zero row decodes exactly


@pytest.mark.parametrize("quant_type", list(GGUF_CEILINGS))
def test_gguf_quants_differ_little(root, tiny_state_dict, reference, quant_type):
    original = original_layout(tiny_state_dict)
    path, kept = write_gguf(root / "transformers" / f"{quant_type}.gguf", original, quant_type)
    largest, mean = difference(images(load_runner(served(root, transformer=path))), reference)
    # The tiny model's rows are 32, 64 or 85 wide: the K-quants' 256-value blocks fit only the timestep MLP.
    print(
        f"\ngguf {quant_type}: max {largest:.2e}, mean {mean:.2e} ({len(kept)} of {len(original)} tensors kept in F32)"
    )
    assert 0 < largest <= GGUF_CEILINGS[quant_type]


@pytest.mark.parametrize("quantize", ["transformer=int8", "int8"])
def test_int8_quantization_on_load_differs_little(root, reference, models_dir, quantize):
    runner = load_runner(served(models_dir, quantize=quantize))
    largest, mean = difference(images(runner), reference)
    print(f"\nint8 ({quantize}): max {largest:.2e}, mean {mean:.2e}")
    assert 0 < largest <= 0.1
    assert type(runner.pipeline.transformer.layers[0].attention.to_q.weight).__name__ == "Int8Tensor"


def test_an_int8_text_encoder_streams_block_by_block_to_the_same_images(models_dir):
    # The 16 GB rung with a bf16 transformer streams the text encoder; int8 halves what it streams.
    resident = load_runner(served(models_dir, quantize="text_encoder=int8"))
    streamed = load_runner(served(models_dir, quantize="text_encoder=int8", offload="text_encoder"))
    assert type(streamed.pipeline.text_encoder.layers[0].mlp.up_proj.weight).__name__ == "Int8Tensor"
    assert streamed.acceleration.offload == "text_encoder"
    assert all(np.array_equal(a, b) for a, b in zip(images(resident), images(streamed), strict=True))


@pytest.mark.parametrize("kind", ["gguf-Q8_0", "int8"])
def test_a_lora_applies_to_quantized_transformers_unfused_and_leaves_them_exactly(root, tiny_state_dict, kind):
    if kind == "int8":
        path = write_safetensors(
            root / "transformers" / "fp32.safetensors", original_layout(tiny_state_dict), torch.float32
        )
        settings = served(root, transformer=path, quantize="transformer=int8")
    else:
        path, _ = write_gguf(root / "transformers" / "lora-Q8_0.gguf", original_layout(tiny_state_dict), "Q8_0")
        settings = served(root, transformer=path)
    runner = load_runner(settings)
    assert runner.lora_slot is not None
    spec = make_spec("a photo of a cat", (1,))
    [[before]] = generate(runner, [spec])
    [[with_lora]] = generate(runner, [make_spec("a photo of a cat", (1,), loras=((LORA, 1.0),))])
    [[after]] = generate(runner, [spec])
    assert np.abs(np.asarray(with_lora, dtype=np.int16) - np.asarray(before, dtype=np.int16)).max() > 10
    assert np.array_equal(np.asarray(after), np.asarray(before))


def write_bad_files(folder: Path, models_dir: Path, tiny_state_dict) -> dict[str, Path]:
    original = original_layout(tiny_state_dict)
    good = write_safetensors(folder / "good.safetensors", original, torch.bfloat16)
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    gguf, _ = write_gguf(folder / "good.gguf", original, "Q8_0")
    truncated_gguf = folder / "truncated.gguf"
    truncated_gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    scaled = {key: tensor.to(torch.float8_e4m3fn) for key, tensor in original.items()}
    scaled |= {
        "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "layers.0.attention.qkv.scale_weight": torch.ones(1),
    }
    save_file(scaled, folder / "scaled-fp8.safetensors")
    (folder / "notes.txt").write_text("not a checkpoint\n")
    return {
        "missing": folder / "nope.safetensors",
        "truncated": truncated,
        "truncated-gguf": truncated_gguf,
        "not-a-checkpoint": folder / "notes.txt",
        "another-model": models_dir / "z-image-turbo" / "vae" / "diffusion_pytorch_model.safetensors",
        "another-size": write_safetensors(
            folder / "wider.safetensors",
            {k: torch.cat([v, v]) if k.endswith("qkv.weight") else v for k, v in original.items()},
            torch.bfloat16,
        ),
        "scaled-fp8": folder / "scaled-fp8.safetensors",
    }


BAD_FILE_MESSAGES = {
    "missing": "does not exist",
    "truncated": "is truncated",
    "truncated-gguf": "not a readable GGUF file",
    "not-a-checkpoint": "neither a safetensors nor a GGUF file",
    "another-model": "is not a Z-Image transformer",
    "another-size": "does not fit the transformer config",
    "scaled-fp8": "scaled-fp8",
}


def test_every_bad_transformer_file_is_one_line_and_exit_3(root, models_dir, tiny_state_dict, tmp_path):
    bad = write_bad_files(tmp_path, models_dir, tiny_state_dict)
    env = {"MODELS_DIR": str(root), "Z_IMAGE_DEVICE": "cpu", "Z_IMAGE_OFFLINE": "1", "Z_IMAGE_PORT": "0"}
    # Seven processes that spend their life importing torch: started two at a time, one per core.
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(bad, pool.map(lambda path: run_cli("serve", "--transformer", str(path), env=env), bad.values())))
    for case, path in bad.items():
        result = results[case]
        line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        assert result.returncode == 3, (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and is_failure_line(line), (case, result.stderr[-2000:])
        assert BAD_FILE_MESSAGES[case] in line and str(path) in line, (case, line)


@pytest.mark.parametrize(
    "quantize, transformer, message",
    [
        ("fp8", "fp32.safetensors", "needs a CUDA GPU of compute capability 8.9"),
        ("transformer=int8", "q8.gguf", "already a GGUF quant"),
    ],
)
def test_quantization_a_device_or_file_cannot_take_is_refused_in_one_line(
    root, tiny_state_dict, quantize, transformer, message
):
    env = {"MODELS_DIR": str(root), "Z_IMAGE_DEVICE": "cpu", "Z_IMAGE_OFFLINE": "1", "Z_IMAGE_QUANTIZE": quantize}
    if transformer.endswith(".gguf"):
        write_gguf(root / "transformers" / transformer, original_layout(tiny_state_dict), "Q8_0")
    else:
        write_safetensors(root / "transformers" / transformer, original_layout(tiny_state_dict), torch.float32)
    env["Z_IMAGE_TRANSFORMER"] = transformer  # relative: under MODELS_DIR/transformers
    result = run_cli("serve", env=env)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr[-2000:]
    assert message in result.stderr
