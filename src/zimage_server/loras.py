"""LoRAs for the Z-Image transformer: find them in a folder, read any common layout, swap them in per request.

A request's LoRAs (A1111 prompt tags) become one canonical key; `LoraSlot.activate(key)` turns that
key into ONE adapter whose A is the stacked As and whose B holds the side-by-side, scale-multiplied
Bs, and hot-swaps it into a resident rank-R adapter that was installed before warm-up. The adapter's
shapes and config never change, so a compiled transformer does not recompile when LoRAs change,
and "no LoRA" is the all-zero adapter, which gives the base image exactly.

Nothing here knows about HTTP: errors are `LoraError`s whose message a client can act on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .lora_library import SHORT_HASH_LENGTH, LoraError, LoraInfo, LoraLibrary, file_identity
from .model_thread import on_model_thread

log = logging.getLogger("zimage_server.loras")

# The resident adapter's name on the transformer; one adapter, always active.
SLOT_ADAPTER = "zimage_server_lora_slot"


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank update, delta W = up @ down, with the file's alpha already folded in."""

    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank]

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# `layers.3.`, `noise_refiner.0.`: where a module name says which block it is in.
BLOCK_PREFIX = re.compile(r"^[A-Za-z_]+\.\d+\.")


@dataclass(frozen=True)
class LoraWeights:
    """A LoRA file in diffusers module names (`layers.0.attention.to_q`), scaling 1 per unit of scale."""

    layers: Mapping[str, LoraLayer]

    @property
    def rank(self) -> int:
        """The widest layer: what the LoRA takes of the slot's rank budget."""
        return max(layer.rank for layer in self.layers.values())

    @property
    def module_kinds(self) -> tuple[str, ...]:
        """The modules touched, without their block (`attention.to_q`, not `layers.3.attention.to_q`)."""
        return tuple(sorted({BLOCK_PREFIX.sub("", name) for name in self.layers}))


@on_model_thread  # tensors: the model's thread (model_thread.py)
def read_info(name: str, path: Path) -> LoraInfo:
    weights = convert_lora_file(path, name)
    with path.open("rb") as file:
        digest = hashlib.file_digest(file, "sha256")
    return LoraInfo(
        name=name,
        size_bytes=path.stat().st_size,
        rank=weights.rank,
        modules=weights.module_kinds,
        sha256_short=digest.hexdigest()[:SHORT_HASH_LENGTH],
    )


# ---------------------------------------------------------------------------------------------
# Reading a file: any common layout -> diffusers module names

# Key fragments of adapter kinds that are not plain LoRA, and of LoRAs for other models' parts.
REFUSED_FORMATS = (
    (("lokr_w",), "LyCORIS LoKr"),
    (("hada_w",), "LyCORIS LoHa"),
    (("dora_scale", "lora_magnitude_vector"), "DoRA"),
    (("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders."), "text-encoder LoRA"),
)
# Z-Image's original module tree fuses q, k and v into `attention.qkv` and calls the output
# projection `attention.out`; diffusers 0.42's converter splits kohya's `lora_unet_` form of
# these but leaves `diffusion_model.` forms unconverted (an error or silently dropped keys).
FUSED_QKV = re.compile(r"^(.*\.attention)\.qkv\.(lora_[AB]\.weight)$")
ORIGINAL_OUT = re.compile(r"^(.*\.attention)\.out\.(lora_[AB]\.weight)$")
PEFT_KEY = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def read_safetensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            return {key: file.get_tensor(key) for key in file.keys()}, metadata
    except Exception as exc:  # safetensors raises its own error types, OSError and more for a bad file
        raise LoraError(f"LoRA {name!r} is not a readable .safetensors file ({exc}); replace the file") from None


def refuse_unsupported_formats(state_dict: Mapping[str, torch.Tensor], name: str) -> None:
    for fragments, kind in REFUSED_FORMATS:
        if any(fragment in key for key in state_dict for fragment in fragments):
            raise LoraError(
                f"LoRA {name!r} is a {kind}; the server applies plain LoRAs for the Z-Image transformer only"
            )


def convert_to_diffusers_keys(state_dict: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """diffusers' own Z-Image converter, then the fused-qkv splitting it misses; keys without `transformer.`."""
    from diffusers import ZImagePipeline

    try:
        converted = ZImagePipeline.lora_state_dict(dict(state_dict))
    except Exception as exc:  # the converter asserts on layouts it does not know
        raise LoraError(f"LoRA {name!r} has a layout the server does not understand ({exc})") from None
    split: dict[str, torch.Tensor] = {}
    for key, tensor in converted.items():
        key = key.removeprefix("transformer.")
        key = ORIGINAL_OUT.sub(r"\1.to_out.0.\2", key)
        fused = FUSED_QKV.match(key)
        if not fused:
            split[key] = tensor
            continue
        attention, part = fused.groups()
        # q, k and v read the same input, so A is shared; B's rows are q's, k's, then v's outputs.
        pieces = [tensor] * 3 if part.startswith("lora_A") else tensor.chunk(3, dim=0)
        for projection, piece in zip(("to_q", "to_k", "to_v"), pieces):
            split[f"{attention}.{projection}.{part}"] = piece
    return split


def metadata_scaling(metadata: Mapping[str, str], name: str):
    """A function module -> alpha/rank from diffusers' saved LoraConfig, or None when the file has none.

    Files that carry no config (kohya, ai-toolkit) have their alphas as tensors, which diffusers'
    converter already folds in; files diffusers saved keep alpha in this metadata instead.
    """
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    from peft.utils.other import get_pattern_key

    try:
        config = {key.removeprefix("transformer."): value for key, value in json.loads(raw).items()}
        default_alpha = float(config.get("lora_alpha", config["r"]))
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        use_rslora = bool(config.get("use_rslora", False))
    except (ValueError, KeyError, TypeError, AttributeError):
        raise LoraError(f"LoRA {name!r} has unreadable adapter metadata; re-save the file") from None

    def scaling(module: str, rank: int) -> float:
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), default_alpha))
        return alpha / (math.sqrt(rank) if use_rslora else rank)

    return scaling


def convert_lora_file(path: Path, name: str | None = None) -> LoraWeights:
    """Read a LoRA file in any supported layout; no model needed (see `load_lora_file` for the checks)."""
    name = name or path.stem
    state_dict, metadata = read_safetensors(path, name)
    if not state_dict:
        raise LoraError(f"LoRA {name!r} holds no tensors; replace the file")
    refuse_unsupported_formats(state_dict, name)
    converted = convert_to_diffusers_keys(state_dict, name)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        match = PEFT_KEY.match(key)
        if not match:
            raise LoraError(
                f"LoRA {name!r} has a key that is not a LoRA weight ({key}); the server applies plain LoRAs only"
            )
        module, part = match.groups()
        parts.setdefault(module, {})[part] = tensor
    scaling = metadata_scaling(metadata, name)
    layers = {}
    for module, pair in parts.items():
        if set(pair) != {"lora_A", "lora_B"} or pair["lora_A"].ndim != 2 or pair["lora_B"].ndim != 2:
            raise LoraError(f"LoRA {name!r} has an incomplete or non-linear layer for {module}; replace the file")
        down, up = pair["lora_A"], pair["lora_B"]
        if down.shape[0] != up.shape[1]:
            raise LoraError(f"LoRA {name!r}: the down and up weights of {module} disagree on the rank")
        if scaling is not None:
            up = up * scaling(module, down.shape[0])
        layers[module] = LoraLayer(down=down, up=up)
    return LoraWeights(layers=layers)


def lora_target_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear layer of the transformer: what a Z-Image LoRA may touch and the slot covers."""
    targets = {}
    for module_name, module in transformer.named_modules():
        # Once the slot is installed, peft wraps each Linear: the wrapper keeps the module's name
        # and the original Linear as its base layer, and adds Linears of its own inside.
        if PEFT_INTERNALS.intersection(module_name.split(".")):
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        if isinstance(base, torch.nn.Linear):
            targets[module_name] = base
    return targets


def adapter_dtype(linear: torch.nn.Linear) -> torch.dtype:
    """What a LoRA on this layer computes in: its weight's dtype, or for a GGUF layer (whose weight
    holds the quantized bytes) the dtype it dequantizes to."""
    return getattr(linear, "compute_dtype", None) or linear.weight.dtype


PEFT_INTERNALS = {"base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


def load_lora_file(path: Path, targets: Mapping[str, torch.nn.Linear], name: str | None = None) -> LoraWeights:
    """Read a LoRA file and check that every layer fits one of the transformer's linear layers
    (`targets`, from `lora_target_modules`).

    A file any of whose layers fits nothing (a LoRA for another model, or another Z-Image size) is
    refused whole, so a LoRA is never half-applied.
    """
    name = name or path.stem
    weights = convert_lora_file(path, name)
    unmatched = sorted(module for module in weights.layers if module not in targets)
    if unmatched:
        shown = ", ".join(unmatched[:3]) + (", ..." if len(unmatched) > 3 else "")
        raise LoraError(
            f"LoRA {name!r} does not fit this Z-Image transformer: no module {shown}; is it a LoRA for another model?"
        )
    for module, layer in weights.layers.items():
        linear = targets[module]
        if layer.down.shape[1] != linear.in_features or layer.up.shape[0] != linear.out_features:
            raise LoraError(
                f"LoRA {name!r} does not fit this Z-Image transformer: {module} is {linear.out_features}x"
                f"{linear.in_features}, the LoRA expects {layer.up.shape[0]}x{layer.down.shape[1]}"
            )
    return weights


# ---------------------------------------------------------------------------------------------
# The resident adapter


def installed_slot(pipe) -> LoraSlot | None:
    """The slot installed on this pipeline's transformer, if any."""
    return getattr(pipe.transformer, "zimage_lora_slot", None)


class LoraSlot:
    """One always-active, rank-`max_rank` adapter on the transformer that each request's LoRAs are swapped into.

    Install it before warm-up and compilation: hotswapping keeps every tensor's shape and the
    adapter's config, which `set_adapters` and `disable_lora` would change (each new state a
    recompile). It lives on the transformer, so Img2Img/Inpaint pipelines made with `from_pipe`
    share it. Not thread-safe: call `activate` under the same lock as the pipeline calls.
    """

    def __init__(self, pipe, library: LoraLibrary, max_rank: int, cache_files: int = 8) -> None:
        self.pipe = pipe
        self.library = library
        self.max_rank = max_rank
        self.cache_files = cache_files
        self._weights_cache: OrderedDict[tuple[str, int, int], LoraWeights] = OrderedDict()
        self.targets = lora_target_modules(pipe.transformer)
        pipe.enable_lora_hotswap(target_rank=max_rank)
        # Distinct zero tensors per module: peft keeps the tensors it is given as the adapter's
        # parameters, and later swaps write into them.
        placeholder = {}
        for module, linear in self.targets.items():
            dtype, device = adapter_dtype(linear), linear.weight.device
            placeholder[f"transformer.{module}.lora_A.weight"] = torch.zeros(max_rank, linear.in_features, dtype=dtype, device=device)
            placeholder[f"transformer.{module}.lora_B.weight"] = torch.zeros(linear.out_features, max_rank, dtype=dtype, device=device)
        pipe.load_lora_weights(placeholder, adapter_name=SLOT_ADAPTER)
        # Found again by `installed_slot`: every runner over this transformer must swap through it.
        pipe.transformer.zimage_lora_slot = self
        self._active_state: tuple[tuple[str, float, tuple[str, int, int]], ...] = ()

    def activate(self, key: Iterable[tuple[str, float]]) -> None:
        """Make the transformer apply exactly the LoRAs in `key` ((name, scale) pairs); a no-op if already so."""
        # Unknown names are refused even at scale 0; the files' identities make a LoRA rewritten
        # in place count as a change.
        files = {name: file_identity(self.library.resolve(name)) for name, _ in key}
        effective = tuple((name, scale) for name, scale in key if scale != 0)
        state = tuple((name, scale, files[name]) for name, scale in effective)
        if state == self._active_state:
            return
        state_dict = self._stacked_state_dict(effective) if effective else self._zero_state_dict()
        try:
            self.pipe.load_lora_weights(state_dict, adapter_name=SLOT_ADAPTER, hotswap=True)
        except Exception:
            # A swap that failed half-way leaves a mix of two adapters: fall back to the base model.
            self.pipe.load_lora_weights(self._zero_state_dict(), adapter_name=SLOT_ADAPTER, hotswap=True)
            self._active_state = ()
            raise
        self._active_state = state

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """The (name, scale) pairs the transformer applies now; () for none."""
        return tuple((name, scale) for name, scale, _ in self._active_state)

    def weights(self, name: str) -> LoraWeights:
        """A LoRA's weights from the LRU cache, read (and checked against the transformer) on a miss."""
        path = self.library.resolve(name)
        identity = file_identity(path)
        weights = self._weights_cache.get(identity)
        if weights is None:
            weights = load_lora_file(path, self.targets, name)
            self._weights_cache[identity] = weights
            while len(self._weights_cache) > self.cache_files:
                self._weights_cache.popitem(last=False)
        self._weights_cache.move_to_end(identity)
        return weights

    def _zero_state_dict(self) -> dict[str, torch.Tensor]:
        # One zero module is enough: peft zeroes every slot module a swapped-in adapter leaves out.
        module, linear = next(iter(self.targets.items()))
        return {
            f"transformer.{module}.lora_A.weight": torch.zeros(1, linear.in_features),
            f"transformer.{module}.lora_B.weight": torch.zeros(linear.out_features, 1),
        }

    def _stacked_state_dict(self, key: tuple[tuple[str, float], ...]) -> dict[str, torch.Tensor]:
        """One adapter for several LoRAs: As stacked along the rank, Bs side by side times their scale.

        Every module gets the same total rank (each LoRA padded to its widest layer, zeros where it
        does not touch the module): a uniform rank keeps diffusers' config free of rank and alpha
        patterns, which hotswapping requires to match the slot's.
        """
        stack = [(name, scale, self.weights(name)) for name, scale in key]
        total_rank = sum(weights.rank for _, _, weights in stack)
        if total_rank > self.max_rank:
            ranks = ", ".join(f"{name} rank {weights.rank}" for name, _, weights in stack)
            raise LoraError(
                f"LoRAs {ranks} need rank {total_rank} together, over the slot's {self.max_rank}; "
                "use fewer or lower-rank LoRAs, or raise Z_IMAGE_LORA_MAX_RANK"
            )
        touched = sorted({module for _, _, weights in stack for module in weights.layers})
        state_dict = {}
        for module in touched:
            linear = self.targets[module]
            downs, ups = [], []
            for _, scale, weights in stack:
                layer = weights.layers.get(module)
                down = torch.zeros(weights.rank, linear.in_features)
                up = torch.zeros(linear.out_features, weights.rank)
                if layer is not None:
                    down[: layer.rank] = layer.down
                    up[:, : layer.rank] = layer.up.float() * scale
                downs.append(down)
                ups.append(up)
            dtype = adapter_dtype(linear)
            state_dict[f"transformer.{module}.lora_A.weight"] = torch.cat(downs).to(dtype)
            state_dict[f"transformer.{module}.lora_B.weight"] = torch.cat(ups, dim=1).to(dtype)
        return state_dict
