"""Single-file transformer checkpoints written from a diffusers transformer, as users get them elsewhere.

- `original_layout`: diffusers' Z-Image single-file converter run backwards, giving the key layout
  of the upstream repo and ComfyUI (fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
  `x_embedder`, `final_layer`), optionally under ComfyUI's `model.diffusion_model.` prefix.
- `write_gguf`: a GGUF file as ComfyUI-GGUF's converter makes one, with the gguf package for the
  types it can encode and hand-written numpy encoders (`quantize_q6_k`, `quantize_q5_k`,
  `quantize_q4_k`, below) for the K-quants it cannot.
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


def _scales_and_mins(sub: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Q4_K/Q5_K's shared asymmetric quantization of (n, 8, 32) sub-blocks to 0..levels.

    ggml decodes `d * sc * q - dmin * m` with 6-bit sc, m >= 0, so each sub-block's grid starts at
    -dmin * m <= 0: a positive sub-block minimum is taken as 0 (as ggml does). The mins are rounded
    up and the scales then sized from the rounded base, rounded up too, so the grid covers the
    whole sub-block and q needs no clipping beyond fp16's rounding of d and dmin.
    """
    mins = -np.minimum(sub.min(axis=2), 0)  # >= 0
    dmin = (mins.max(axis=1, keepdims=True) / 63).astype(np.float16)
    dmin32 = dmin.astype(np.float32)
    m = np.ceil(mins / np.where(dmin32 > 0, dmin32, 1)).clip(0, 63)
    base = -dmin32 * m
    scales = np.maximum(sub.max(axis=2) - base, 0) / levels
    d = (scales.max(axis=1, keepdims=True) / 63).astype(np.float16)
    d32 = d.astype(np.float32)
    sc = np.ceil(scales / np.where(d32 > 0, d32, 1)).clip(0, 63)
    step = (d32 * sc)[:, :, None]
    q = np.where(step > 0, np.round((sub - base[:, :, None]) / np.where(step > 0, step, 1)), 0)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q.clip(0, levels).astype(np.uint8)


def _pack_scales_and_mins(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 6-bit scales and 8 6-bit mins in 12 bytes, the inverse of gguf.quants.Q4_K.get_scale_min:
    bytes 0-3 hold sc[0:4] and bytes 4-7 m[0:4] in their low 6 bits, with the top 2 bits of
    sc[4:8] and m[4:8] above them; bytes 8-11 hold the low 4 bits of sc[4:8] (low nibble) and
    m[4:8] (high nibble)."""
    return np.concatenate(
        [
            sc[:, :4] | (sc[:, 4:] >> 4) << 6,
            m[:, :4] | (m[:, 4:] >> 4) << 6,
            (sc[:, 4:] & 0x0F) | (m[:, 4:] & 0x0F) << 4,
        ],
        axis=1,
    )


def quantize_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 rows (lengths multiples of 256) as Q4_K blocks, the inverse of gguf.quants.Q4_K.dequantize_blocks.

    Each 256-value block (144 bytes): fp16 `d` and `dmin`, 12 bytes of 6-bit scales and mins for
    8 sub-blocks of 32 (see `_pack_scales_and_mins`), then 128 bytes of 4-bit values: byte l of
    each 32-byte group i holds value l of sub-block 2i in its low nibble and of 2i+1 in its high.
    """
    blocks = rows.astype(np.float32).reshape(-1, QK_K)
    n = blocks.shape[0]
    d, dmin, sc, m, q = _scales_and_mins(blocks.reshape(n, 8, 32), 15)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0] | q[:, :, 1] << 4).reshape(n, 128)
    packed = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales_and_mins(sc, m), qs], axis=1)
    return packed.reshape(*rows.shape[:-1], -1)


def quantize_q5_k(rows: np.ndarray) -> np.ndarray:
    """float32 rows (lengths multiples of 256) as Q5_K blocks, the inverse of gguf.quants.Q5_K.dequantize_blocks.

    Q4_K's layout with 5-bit values (176 bytes a block): after the 12 scale bytes, 32 bytes `qh`
    whose byte l holds the 5th bit of value l of sub-block j in bit j, then the low 4 bits as
    Q4_K's 128 bytes.
    """
    blocks = rows.astype(np.float32).reshape(-1, QK_K)
    n = blocks.shape[0]
    d, dmin, sc, m, q = _scales_and_mins(blocks.reshape(n, 8, 32), 31)
    qh = np.bitwise_or.reduce((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    low = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = (low[:, :, 0] | low[:, :, 1] << 4).reshape(n, 128)
    packed = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), _pack_scales_and_mins(sc, m), qh, qs], axis=1)
    return packed.reshape(*rows.shape[:-1], -1)


# K-quants the gguf package cannot encode, by type name.
HAND_WRITTEN = {"Q6_K": quantize_q6_k, "Q5_K": quantize_q5_k, "Q4_K": quantize_q4_k}


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
        else:
            quantize = HAND_WRITTEN.get(quant_type, lambda rows: gguf.quants.quantize(rows, qtype))
            writer.add_tensor(key, quantize(data), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, kept
