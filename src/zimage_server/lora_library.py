"""LoRA requests and the folder of LoRA files: names, prompt tags, limits. No torch.

What the API checks before a request is queued lives here: which names exist (and that none
escapes the folder), the A1111 prompt tags, and the canonical key a request's LoRAs become. Reading
and applying the weights is loras.py's (torch).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("zimage_server.loras")

LORA_SUFFIX = ".safetensors"
# The short hash A1111 writes into "Lora hashes" infotexts: the file's SHA-256, first 12 hex digits
# (its extra-networks `shorthash`; 10 digits is its checkpoint hash).
SHORT_HASH_LENGTH = 12
MAX_SCALE = 4.0
LoraKey = tuple[tuple[str, float], ...]  # canonical (name, scale) pairs: sorted, each name once


class LoraError(ValueError):
    """A LoRA request or file the server cannot use; the message names the LoRA and says what to do."""


@dataclass(frozen=True)
class LoraInfo:
    """What a LoRA list shows: the file's size, its rank, the kinds of module it touches, A1111's short hash."""

    name: str
    size_bytes: int
    rank: int
    modules: tuple[str, ...]
    sha256_short: str


# ---------------------------------------------------------------------------------------------
# The folder of LoRA files


def file_identity(path: Path) -> tuple[str, int, int]:
    """(path, mtime_ns, size): changes whenever the file is replaced or rewritten, so it keys caches."""
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size)


class LoraLibrary:
    """The `.safetensors` files under one folder, named by their relative path without the suffix.

    The folder is scanned on every call (a directory walk is cheap next to a generation), so files
    dropped in while the server runs are found without a restart.
    """

    def __init__(self, folder: Path, describe: Callable[[str, Path], LoraInfo]) -> None:
        self.folder = Path(folder).resolve()
        self._describe = describe  # reads a file for its rank and modules (loras.read_info; needs torch)
        # Reading a file for its rank and hash costs a full read; a file is read again only when
        # its identity changes. Unreadable files are cached too, so listing does not retry them.
        # A plain dict is enough without a lock: two threads missing at once both read the file
        # and store equal values.
        self._info_cache: dict[tuple[str, int, int], LoraInfo | LoraError] = {}

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        names = []
        for path in self.folder.rglob(f"*{LORA_SUFFIX}"):
            # A symlink out of the folder is not the folder's to serve (resolve refuses it too).
            if path.is_file() and path.resolve().is_relative_to(self.folder):
                names.append(path.relative_to(self.folder).with_suffix("").as_posix())
        return sorted(names)

    def resolve(self, name: str) -> Path:
        """The file for `name`; refuses names that leave the folder and names with no file."""
        if not name or "\0" in name:
            raise LoraError(f"LoRA name {name!r} is empty or has a NUL byte; use a name from the LoRA list")
        name = name.removesuffix(LORA_SUFFIX)
        parts = Path(name).parts
        if Path(name).is_absolute() or any(part in ("..", ".") for part in parts):
            raise LoraError(f"LoRA {name!r}: names are paths inside the LoRA folder, without '..' or a leading '/'")
        path = self.folder / f"{name}{LORA_SUFFIX}"
        if not path.resolve().is_relative_to(self.folder):
            raise LoraError(f"LoRA {name!r} points outside the LoRA folder; use a name from the LoRA list")
        if not path.is_file():
            raise LoraError(
                f"unknown LoRA {name!r}: there is no {name}{LORA_SUFFIX} in the LoRA folder; "
                "use a name from the LoRA list"
            )
        return path

    def info(self, name: str) -> LoraInfo:
        path = self.resolve(name)
        key = file_identity(path)
        cached = self._info_cache.get(key)
        if cached is None:
            try:
                cached = self._describe(name, path)
            except LoraError as exc:
                cached = exc
            self._info_cache[key] = cached
        if isinstance(cached, LoraError):
            raise cached
        return cached

    def list(self) -> list[LoraInfo]:
        """Every usable LoRA; unreadable files are left out with a warning in the log."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.info(name))
            except LoraError as exc:
                log.warning("skipping LoRA %s: %s", name, exc)
        return infos


LORA_TAG = re.compile(r"<lora:([^<>]*)>")


def parse_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Take A1111 tags (`<lora:name:0.8>`, `<lora:name>` = scale 1) out of a prompt.

    Returns the prompt without the tags (runs of spaces the tags leave behind collapsed, line
    breaks kept) and the (name, scale) pairs in order. A1111's extra fields (`<lora:n:0.8:0.5>`,
    a text-encoder multiplier) are ignored: the server applies LoRAs to the transformer only.
    """
    pairs = []
    for match in LORA_TAG.finditer(prompt):
        name, _, rest = match.group(1).partition(":")
        name = name.strip()
        scale_text = rest.split(":")[0].strip()
        try:
            scale = float(scale_text) if scale_text else 1.0
        except ValueError:
            raise LoraError(
                f"LoRA tag {match.group(0)!r}: the scale must be a number, e.g. <lora:{name}:0.8>"
            ) from None
        pairs.append((name, scale))
    clean = LORA_TAG.sub("", prompt)
    clean = "\n".join(re.sub(r"[ \t]+", " ", line).strip() for line in clean.splitlines())
    return clean.strip(), pairs


# Sums like 0.1 + 0.2 must give the same key as 0.3.
SCALE_DIGITS = 6


def merge_requests(pairs: Iterable[tuple[str, float]]) -> LoraKey:
    """One canonical key for a set of (name, scale): the same LoRA twice adds up; sorted by name."""
    totals: dict[str, float] = {}
    for name, scale in pairs:
        totals[name] = totals.get(name, 0.0) + float(scale)
    return tuple(sorted((name, round(scale, SCALE_DIGITS)) for name, scale in totals.items()))


def check_lora_limits(key: Iterable[tuple[str, float]], max_loras: int, max_scale: float = MAX_SCALE) -> None:
    """Refuse too many LoRAs or a scale outside [-max_scale, max_scale], naming the LoRA."""
    key = list(key)
    if len(key) > max_loras:
        names = ", ".join(name for name, _ in key)
        raise LoraError(f"{len(key)} LoRAs requested ({names}); at most {max_loras} per request")
    for name, scale in key:
        if not math.isfinite(scale) or abs(scale) > max_scale:
            raise LoraError(f"LoRA {name!r}: scale {scale} is outside [-{max_scale}, {max_scale}]")
