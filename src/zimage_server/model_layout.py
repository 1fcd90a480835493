"""Is a folder a complete diffusers pipeline? Pure file checks, no torch, so it runs in milliseconds.

Used at start-up (refuse to start on a half-copied folder) and after a download (only a verified
folder is moved into place); `is_safetensors` and `is_gguf` tell single weight files apart by
their first bytes, and `read_safetensors_header` reads one's tensor table (the loader's checks and
the memory plan share it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path

# Files that hold a component's configuration, by component kind; any one of them is enough.
CONFIG_FILES = (
    "config.json",
    "scheduler_config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
)
WEIGHT_INDEXES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json")
SINGLE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")
# Components without weights of their own.
WEIGHTLESS = ("scheduler", "tokenizer", "siglip_processor", "processor", "image_processor", "feature_extractor")


class IncompleteModelError(Exception):
    """The folder is missing or lacks files the pipeline needs; the message says which."""


def pipeline_components(model_dir: Path) -> list[str]:
    """Component folder names that model_index.json declares (entries whose value is [library, class])."""
    index_path = model_dir / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise IncompleteModelError(f"{index_path} is missing") from None
    except (OSError, ValueError) as exc:
        raise IncompleteModelError(f"{index_path} is unreadable: {exc}") from None
    return [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]


def shard_files(component_dir: Path) -> list[Path]:
    """Every weight file a component needs: the shards its index lists, or its single weights file."""
    for index_name in WEIGHT_INDEXES:
        index_path = component_dir / index_name
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise IncompleteModelError(f"{index_path} is unreadable: {exc}") from None
            return [component_dir / name for name in sorted(set(weight_map.values()))]
    for name in SINGLE_WEIGHTS:
        if (component_dir / name).exists():
            return [component_dir / name]
    return []


def verify_model_dir(model_dir: Path, weights_elsewhere: Collection[str] = ()) -> None:
    """Raise IncompleteModelError unless every declared component has its config and all its weights.

    weights_elsewhere: components whose weights come from another file (a single-file transformer,
    Z_IMAGE_TRANSFORMER); their folder needs only its config."""
    if not model_dir.is_dir():
        raise IncompleteModelError(f"{model_dir} does not exist")
    for name in pipeline_components(model_dir):
        component_dir = model_dir / name
        if not component_dir.is_dir():
            raise IncompleteModelError(f"{component_dir} is missing")
        if not any((component_dir / config).exists() for config in CONFIG_FILES):
            raise IncompleteModelError(f"{component_dir} has no config file")
        if name in WEIGHTLESS or name in weights_elsewhere:
            continue
        shards = shard_files(component_dir)
        if not shards:
            raise IncompleteModelError(f"{component_dir} has no weights")
        missing = [shard.name for shard in shards if not shard.exists() or shard.stat().st_size == 0]
        if missing:
            raise IncompleteModelError(f"{component_dir} lacks weight shards: {', '.join(missing)}")


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with the length of its JSON header, then the header."""
    try:
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            return 2 <= length <= 100_000_000 and file.read(1) == b"{"
    except OSError:
        return False


def is_gguf(path: Path) -> bool:
    """A GGUF file starts with the magic bytes "GGUF"."""
    try:
        with path.open("rb") as file:
            return file.read(4) == b"GGUF"
    except OSError:
        return False


def checkpoint_sha256(model_dir: Path) -> str:
    """A stable id for a model folder from its small JSON files (pipeline index, component configs,
    weight indexes); hashing the weights themselves would read gigabytes."""
    digest = hashlib.sha256()
    for pattern in ("model_index.json", "*/config.json", "*/*.index.json"):
        for path in sorted(model_dir.glob(pattern)):
            digest.update(path.relative_to(model_dir).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


class CheckpointError(Exception):
    """A transformer file that cannot be served; the message is one line naming the file and why."""


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors header, checked against the file's size (a cut-off copy fails here)."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        try:
            header = json.loads(file.read(length))
        except ValueError:
            raise CheckpointError(f"{path} has an unreadable safetensors header (a damaged file?)") from None
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if path.stat().st_size < 8 + length + data_end:
        raise CheckpointError(
            f"{path} is truncated: its header describes {8 + length + data_end} bytes, the file has "
            f"{path.stat().st_size}; download it again"
        )
    return header
