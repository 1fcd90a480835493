"""Transformers users bring as one file, and quantization on load. Imports torch.

Z_IMAGE_TRANSFORMER names a single-file transformer: a .safetensors file in the original/ComfyUI
key layout (or diffusers'), or a .gguf quant. `inspect_transformer_file` checks it against the
model folder's transformer config from its header alone (no weights read, so a wrong file is one
line at start-up, before anything loads), and `load_transformer` loads it with diffusers'
`from_single_file`, so the folder's own transformer weights are never read.

Z_IMAGE_QUANTIZE quantizes components with torchao right after loading (`quantize_components`),
before the LoRA slot wraps the linear layers and before placement moves them to the device.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .logs import first_line
from .model_layout import CheckpointError, is_gguf, is_safetensors, read_safetensors_header
from .settings import SettingsError

log = logging.getLogger("zimage_server.checkpoints")

# safetensors dtypes diffusers loads and casts to the serving dtype (fp8 files are upcast on load).
LOADABLE_SAFETENSORS_DTYPES = {"F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
# ComfyUI's "fp8_scaled" files carry a per-tensor scale beside each fp8 weight; diffusers 0.42
# ignores those scales, so such a file would load as wrong weights rather than fail.
SCALED_FP8_KEYS = ("scale_weight", "scaled_fp8")
# The compute capability of the first GPUs with fp8 matrix units (Ada, Hopper); on older GPUs and
# the CPU torchao's fp8 is an emulation that saves memory but costs speed, so it is refused.
FP8_MIN_CAPABILITY = (8, 9)
MAX_NAMES_SHOWN = 3


@dataclass(frozen=True)
class TransformerFile:
    """What a transformer file's header says: its format and the tensors' storage types, by count."""

    path: Path
    format: str  # "safetensors" or "gguf"
    storage: Mapping[str, int]  # e.g. {"Q8_0": 210, "F32": 63} or {"BF16": 273}

    @property
    def quantized(self) -> bool:
        return self.format == "gguf" and any(kind not in ("F32", "F16") for kind in self.storage)

    def describe(self) -> str:
        kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(self.storage.items(), key=lambda kv: -kv[1]))
        return f"{self.format} ({kinds} tensors)"


def read_gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each GGUF tensor's storage type and logical (torch-order) shape."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # numpy's memmap and gguf's parser raise several kinds for a bad file
        raise CheckpointError(f"{path} is not a readable GGUF file ({exc}); download it again") from None
    # GGUF stores shapes in ggml's order, innermost dimension first.
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}


def inspect_transformer_file(path: Path, config_dir: Path) -> TransformerFile:
    """Check that `path` holds a Z-Image transformer of the shape `config_dir`'s config.json describes."""
    if not path.is_file():
        raise CheckpointError(f"Z_IMAGE_TRANSFORMER: {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Z_IMAGE_TRANSFORMER: {path} is empty")
    if is_gguf(path):
        entries = read_gguf_tensors(path)
        from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

        supported = {kind.name for kind in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16"}
        refused = sorted({kind for kind, _ in entries.values() if kind not in supported})
        if refused:
            raise CheckpointError(f"{path} holds GGUF {', '.join(refused)} tensors, which diffusers cannot dequantize")
        shapes = {name: shape for name, (_, shape) in entries.items()}
        storage = [kind for kind, _ in entries.values()]
        format_name = "gguf"
    elif is_safetensors(path):
        header = read_safetensors_header(path)
        if any(key.endswith(SCALED_FP8_KEYS) for key in header):
            raise CheckpointError(
                f"{path} is a ComfyUI scaled-fp8 checkpoint (fp8 weights with per-tensor scale_weight), which "
                "diffusers 0.42 cannot load; use a plain fp8 e4m3fn, bf16 or GGUF file"
            )
        storage = [entry["dtype"] for entry in header.values()]
        refused = sorted(set(storage) - LOADABLE_SAFETENSORS_DTYPES)
        if refused:
            raise CheckpointError(
                f"{path} stores {', '.join(refused)} tensors; the server loads "
                f"{', '.join(sorted(LOADABLE_SAFETENSORS_DTYPES))} safetensors or GGUF quants"
            )
        shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
        format_name = "safetensors"
    else:
        raise CheckpointError(f"{path} is neither a safetensors nor a GGUF file; the server loads only those")
    check_architecture(path, shapes, config_dir)
    counts: dict[str, int] = {}
    for kind in storage:
        counts[kind] = counts.get(kind, 0) + 1
    return TransformerFile(path, format_name, counts)


def check_architecture(path: Path, shapes: Mapping[str, tuple[int, ...]], config_dir: Path) -> None:
    """Compare the file's tensors, renamed as diffusers will rename them, with the configured model's.

    The model is built on the meta device (no memory) and the renaming is diffusers' own converter
    run over meta tensors, so what passes here is exactly what `from_single_file` will find."""
    from diffusers import ZImageTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_z_image_transformer_checkpoint_to_diffusers,
    )

    with torch.device("meta"):
        expected = {
            name: tuple(tensor.shape)
            for name, tensor in ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(config_dir))
            .state_dict()
            .items()
        }
    found = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    # diffusers converts only when the file lacks the model's own names (its check, mirrored here).
    if not set(expected) <= set(found):
        found = convert_z_image_transformer_checkpoint_to_diffusers(found)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(
            f"{path} is not a Z-Image transformer: it lacks {len(missing)} of its tensors "
            f"({shown(missing)}); is it a checkpoint of another model?"
        )
    wrong = sorted(name for name in expected if tuple(found[name].shape) != expected[name])
    if wrong:
        name = wrong[0]
        raise CheckpointError(
            f"{path} does not fit the transformer config in {config_dir}: {name} is "
            f"{'x'.join(map(str, found[name].shape))}, the config expects {'x'.join(map(str, expected[name]))} "
            f"({len(wrong)} tensors differ; a checkpoint of another Z-Image size?)"
        )


def shown(names: list[str]) -> str:
    return ", ".join(names[:MAX_NAMES_SHOWN]) + (", ..." if len(names) > MAX_NAMES_SHOWN else "")


def load_transformer(checkpoint: TransformerFile, config_dir: Path, dtype: torch.dtype):
    """The transformer from its single file, in `dtype`; GGUF weights stay quantized and are dequantized per call."""
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    # diffusers dequantizes GGUF weights to fp16 whatever compute_dtype says, then computes in compute_dtype.
    quantization = (
        {"quantization_config": GGUFQuantizationConfig(compute_dtype=dtype)} if checkpoint.format == "gguf" else {}
    )
    try:
        return ZImageTransformer2DModel.from_single_file(
            str(checkpoint.path),
            config=str(config_dir),
            torch_dtype=dtype,
            local_files_only=True,
            **quantization,
        )
    except Exception as exc:  # what the header check could not see: damaged tensor data
        raise CheckpointError(f"{checkpoint.path} could not be loaded ({first_line(exc)})") from None


def check_quantization(choices: Mapping[str, str], device: torch.device, checkpoint: TransformerFile | None) -> None:
    """Refuse, before anything loads, a quantization this device or this transformer file cannot take."""
    if not choices:
        return
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise SettingsError("Z_IMAGE_QUANTIZE needs torchao (pip install 'torchao>=0.15')") from None
    if "fp8" in choices.values():
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if capability is None or capability < FP8_MIN_CAPABILITY:
            where = f"a GPU of compute capability {capability[0]}.{capability[1]}" if capability else f"{device.type}"
            raise SettingsError(
                f"Z_IMAGE_QUANTIZE=fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper); "
                f"this is {where}: use int8 instead"
            )
    if checkpoint is not None and checkpoint.quantized and "transformer" in choices:
        raise SettingsError(
            f"Z_IMAGE_QUANTIZE quantizes the transformer, but {checkpoint.path} is already a GGUF quant; "
            "quantize only the text encoder (text_encoder=int8)"
        )


def torchao_config(kind: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}[kind]()


def quantize_components(pipeline, choices: Mapping[str, str]) -> None:
    """torchao weight-only quantization of the chosen components' linear layers, in place."""
    from torchao.quantization import quantize_

    for component, kind in choices.items():
        quantize_(getattr(pipeline, component), torchao_config(kind))
        log.info("%s quantized to %s (torchao, weight-only)", component, kind)
