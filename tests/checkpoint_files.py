"""Single-file transformer checkpoints written from a diffusers transformer, as users get them elsewhere.

- `original_layout`: diffusers' Z-Image single-file converter run backwards, giving the key layout
  of the upstream repo and ComfyUI (fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
  `x_embedder`, `final_layer`), optionally under ComfyUI's `model.diffusion_model.` prefix.
- `write_gguf`: a GGUF file as ComfyUI-GGUF's converter makes one, with the gguf package for the
  types it can encode and `quantize_q6_k` (below) for the K-quant it cannot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

COMFYUI_PREFIX = "model.diffusion_model."
# diffusers name fragment -> the original's; the inverse of convert_z_image_transformer_checkpoint_to_diffusers.
ORIGINAL_NAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_q.": ".attention.q_norm.",
    ".attention.norm_k.": ".attention.k_norm.",
}


def original_layout(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers Z-Image transformer state dict in the original key layout."""
    converted = {}
    for key, tensor in state_dict.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue  # fused into qkv with to_q below
        if ".attention.to_q." in key:
            parts = [state_dict[key.replace(".to_q.", f".{name}.")] for name in ("to_q", "to_k", "to_v")]
            key, tensor = key.replace(".to_q.", ".qkv."), torch.cat(parts)
        for diffusers_name, original_name in ORIGINAL_NAMES.items():
            key = key.replace(diffusers_name, original_name)
        converted[prefix + key] = tensor.contiguous()
    return converted


def write_safetensors(path: Path, state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    from safetensors.torch import save_file

    save_file({key: tensor.to(dtype) for key, tensor in state_dict.items()}, str(path))
    return path


QK_K = 256  # values per K-quant super-block


def quantize_q6_k(rows: np.ndarray) -> np.ndarray:
    """float32 rows (lengths multiples of 256) as Q6_K blocks, the inverse of gguf.quants.Q6_K.dequantize_blocks.

    Each 256-value block: 16 sub-blocks of 16 values, each with an int8 scale times one fp16 `d`;
    values are 6-bit (q + 32), their low 4 bits in `ql` (128 bytes), high 2 bits in `qh` (64 bytes).
    """
    blocks = rows.astype(np.float32).reshape(-1, QK_K)
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    sub_scale = np.abs(sub).max(axis=2) / 31  # per sub-block, so that q fits -32..31
    d = (sub_scale.max(axis=1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    scales = np.where(d32 > 0, np.round(sub_scale / np.where(d32 > 0, d32, 1)), 0).clip(-128, 127).astype(np.int8)
    step = d32[:, :, None] * scales.astype(np.float32)[:, :, None]
    q = np.where(step > 0, np.round(sub / np.where(step > 0, step, 1)), 0).clip(-32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(n, 2, 128)  # two halves of 128 values
    low, high = q & 0x0F, q >> 4
    low = low.reshape(n, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(n, 128)
    high = high.reshape(n, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    packed = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8).reshape(n, 2)], axis=1)
    return packed.reshape(*rows.shape[:-1], -1)


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], quant_type: str) -> tuple[Path, list[str]]:
    """A GGUF file of `state_dict` (original layout) with its linear weights in `quant_type`; also the
    names kept in F32: norms, biases and pad tokens (as ComfyUI-GGUF keeps them; the model reads pad
    tokens directly, not through a layer that dequantizes) and weights whose rows do not divide
    into the type's blocks."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant_type]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch="z_image")
    kept = []
    for key, tensor in state_dict.items():
        data = tensor.float().numpy()
        if not key.endswith(".weight") or data.ndim != 2 or data.shape[-1] % block:
            writer.add_tensor(key, data)
            kept.append(key)
        elif qtype == gguf.GGMLQuantizationType.Q6_K:
            writer.add_tensor(key, quantize_q6_k(data), raw_dtype=qtype)
        else:
            writer.add_tensor(key, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, kept
