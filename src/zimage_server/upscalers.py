"""Upscaler models and the plain resizes A1111 names beside them: listing, loading, tiled runs. Imports torch.

The folder (Z_IMAGE_UPSCALER_DIR, default MODELS_DIR/upscalers) holds `.safetensors` and `.pth`
files, each named like A1111 shows them: the file name without its extension. spandrel's core
registry reads them (MIT architectures only: ESRGAN, Compact, SPAN, SwinIR, HAT, ...);
`spandrel_extra_arches` is never imported, so a file of a restrictive-licence architecture is
simply "not recognised". A `.pth` goes through spandrel's restricted unpickler: `torch.load` with
`pickle_module=RestrictedUnpickle`, which turns torch's own weights-only default off but routes
every global the pickle names through an allow-list of nine (OrderedDict, the tensor rebuild
function, the storage types), so a pickle that imports anything else fails before it runs.

Beside the files there are always `None` (A1111's plain Lanczos resize in the hires fix),
`Lanczos` and `Nearest`. A file that cannot be used (unknown architecture, truncated, a pickle
that imports something) is left out of the list with one warning and answers `UpscalerFileError`
when named; its failure is remembered until the file changes, so it is read once.

A model runs as A1111 runs it: up to three passes until the image covers the asked size, then a
Lanczos resize to exactly that size. Each pass is tiled (ComfyUI's 512 with 32 overlap; halved on
out-of-memory, down to 4 x overlap): every tile is the core it writes plus `overlap` pixels of
context on each side, and only the core's output is kept, so for a convolution net whose
receptive-field radius is at most `overlap` the tiled result is the untiled one (bit-identical in
float32 on the CPU: tests/test_upscalers.py). Tiles and their context are aligned to the model's
`multiple_of`, so pixel-unshuffle models (Real-ESRGAN 2x) see the same grid. Outputs are assembled
as uint8 on the host, so the device holds one tile's activations, never a whole 4x image.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from spandrel import MAIN_REGISTRY, ArchRegistry, ImageModelDescriptor, ModelLoader, UnsupportedModelError

from .hires import PIXEL_RESIZES, UnknownUpscaler, UpscalerError, UpscalerFileError, UpscaleTooLarge
from .logs import first_line
from .memory_sim import DeviceMemoryTracker
from .lora_library import file_identity
from .model_thread import on_model_thread

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("zimage_server.upscalers")

SUFFIXES = (".safetensors", ".pth")
MAX_PASSES = 3  # A1111's Upscaler.upscale: a 2x model reaches at most 8x
DEFAULT_TILE = 512  # ComfyUI's ImageUpscaleWithModel
DEFAULT_OVERLAP = 32
DEFAULT_CACHE = 2
A1111_SIZE_STEP = 8  # A1111's extras round the scaled size down to a multiple of 8
# Not upscalers, though spandrel's core reads them: face restorers run on aligned face crops, and
# inpainting models take a mask.
USABLE_PURPOSES = ("SR", "Restoration")


@dataclass(frozen=True)
class UpscalerCard:
    """What a list shows of one upscaler. Built-ins have no path, scale or architecture."""

    name: str
    path: Path | None = None
    scale: int | None = None
    architecture: str | None = None  # spandrel's architecture id: ESRGAN, Compact, SPAN, ...
    parameters: int = 0
    size_bytes: int = 0
    supports_half: bool = False
    supports_bfloat16: bool = False
    tiling: str | None = None  # spandrel's ModelTiling: SUPPORTED, DISCOURAGED or INTERNAL


@dataclass
class LoadedUpscaler:
    card: UpscalerCard
    model: ImageModelDescriptor  # on the device, in the dtype it runs in (its `.dtype`)

    @property
    def multiple_of(self) -> int:
        return self.model.size_requirements.multiple_of


# ---------------------------------------------------------------------------------------------
# Reading files


def read_model(path: Path, registry: ArchRegistry = MAIN_REGISTRY) -> tuple[ImageModelDescriptor, UpscalerCard]:
    """The model in `path`, on the CPU in its file's dtype, and its card; any failure is one
    `UpscalerFileError` line naming the file (a traceback would tell a client nothing)."""
    if path.suffix.lower() not in SUFFIXES:
        raise UpscalerFileError(path, f"only {' and '.join(SUFFIXES)} files are read")
    try:
        model = ModelLoader("cpu", registry).load_from_file(path)
    except UnsupportedModelError:
        raise UpscalerFileError(path, "not an architecture spandrel's MIT core recognises") from None
    except Exception as exc:  # safetensors, zip, pickle and state-dict errors alike: the file is unusable
        raise UpscalerFileError(path, f"unreadable ({first_line(exc)})") from None
    if not isinstance(model, ImageModelDescriptor) or model.purpose not in USABLE_PURPOSES:
        raise UpscalerFileError(path, f"a {model.purpose} model ({model.architecture.id}), not an upscaler")
    if model.input_channels != 3 or model.output_channels != 3:
        channels = f"{model.input_channels} in, {model.output_channels} out"
        raise UpscalerFileError(path, f"not an RGB model ({channels} channels)")
    card = UpscalerCard(
        name=path.stem,
        path=path,
        scale=model.scale,
        architecture=str(model.architecture.id),
        parameters=sum(p.numel() for p in model.model.parameters()),
        size_bytes=path.stat().st_size,
        supports_half=model.supports_half,
        supports_bfloat16=model.supports_bfloat16,
        tiling=model.tiling.name,
    )
    return model, card


def compute_dtype(
    model: ImageModelDescriptor | UpscalerCard, device_type: str, bf16_capable: bool = True
) -> torch.dtype:
    """fp32 off CUDA; on CUDA bf16 (fp16's range without its overflows in ESRGAN's deep blocks), then
    fp16, each only where the architecture supports it."""
    if device_type == "cuda":
        if model.supports_bfloat16 and bf16_capable:
            return torch.bfloat16
        if model.supports_half:
            return torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Pixels and tiles


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (1, 3, H, W) in 0..1, as spandrel's and ComfyUI's callers make it."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).float() / 255


def tensor_to_pixels(output: torch.Tensor) -> torch.Tensor:
    """A model's (1, 3, h, w) output -> uint8 (h, w, 3): clamped to 0..1, scaled and rounded, in float32.
    In place on the float32 copy (or on a float32 output itself), so a tile costs one such buffer."""
    return output[0].float().clamp_(0, 1).mul_(255).round_().to(torch.uint8).permute(1, 2, 0)


def tile_spans(length: int, tile: int, overlap: int, multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """(tile_start, tile_end, core_start, core_end) along one axis: the cores partition [0, length),
    each tile is its core plus `overlap` pixels of context where the image has them, at most `tile`
    long, and every start is a multiple of `multiple` (the model's size step)."""
    overlap = -(-overlap // multiple) * multiple
    tile = max(tile // multiple * multiple, multiple)
    if length <= tile:
        return [(0, length, 0, length)]
    if tile <= 2 * overlap:
        raise ValueError(f"a tile of {tile} px leaves no core inside {overlap} px of overlap on each side")
    spans = []
    core_start = 0
    while core_start < length:
        start = max(0, core_start - overlap)
        end = min(length, start + tile)
        core_end = end if end == length else end - overlap
        spans.append((start, end, core_start, core_end))
        core_start = core_end
    return spans


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    # MPS and the CPU allocator say it in a RuntimeError.
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def tile_activation_bytes(
    model: ImageModelDescriptor, tile: int = DEFAULT_TILE, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Peak device bytes one `tile` x `tile` run allocates beyond the weights (its input, the
    activations, the float32 conversion of its output), simulated on the meta device. Moves
    `model` to the meta device: pass one read for this alone."""
    model.model.to(device="meta", dtype=dtype)
    tracker = DeviceMemoryTracker("meta")
    with torch.inference_mode(), tracker:
        tile_input = torch.empty(1, 3, tile, tile, device="meta", dtype=dtype)
        tensor_to_pixels(model(tile_input))
    return tracker.peak


def upscaler_memory(path: Path, tile: int = DEFAULT_TILE) -> tuple[int, int, UpscalerCard]:
    """For the memory plan, on a CUDA card: (weight bytes in the dtype used there, a tile's
    activation bytes, the card)."""
    model, card = read_model(Path(path))
    dtype = compute_dtype(model, "cuda")
    itemsize = dtype.itemsize
    tensors = model.model.state_dict().values()
    weights = sum(t.numel() * (itemsize if t.is_floating_point() else t.element_size()) for t in tensors)
    return weights, tile_activation_bytes(model, tile, dtype), card


# ---------------------------------------------------------------------------------------------
# The library


class Upscalers:
    """The upscaler folder, an LRU of loaded models on the runner's device, and the resizes.

    Everything that touches a model runs on the model thread; model passes take `lock` (the
    runner's, as the device is shared with the pipeline) once per call. A caller that already
    holds that lock says so with `lock_held=True` (threading.Lock is not reentrant).
    """

    def __init__(
        self,
        folder: Path,
        *,
        device: torch.device | str = "cpu",
        cache_size: int = DEFAULT_CACHE,
        max_pixels: int = 2048 * 2048,
        tile: int = DEFAULT_TILE,
        overlap: int = DEFAULT_OVERLAP,
        lock: threading.Lock | None = None,
        registry: ArchRegistry = MAIN_REGISTRY,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        if overlap < 0 or tile <= 2 * overlap:
            raise ValueError(f"tile ({tile}) must be more than twice the overlap ({overlap})")
        self.folder = Path(folder)
        self.device = torch.device(device)
        self.cache_size = cache_size
        self.max_pixels = max_pixels
        self.tile = tile
        self.overlap = overlap
        self.min_tile = max(4 * overlap, 32)  # halving stops here: a core of half the tile (ComfyUI stops at 128)
        self.lock = lock
        self.registry = registry
        self.loads = 0  # model files read into the LRU (a second read means it was evicted)
        # Cards (or the failure) per file identity: listing twice reads nothing. A plain dict is
        # enough without a lock: two threads missing at once both read the file and store equals.
        self._cards: dict[tuple[str, int, int], UpscalerCard | UpscalerFileError] = {}
        self._loaded: OrderedDict[tuple[str, int, int], LoadedUpscaler] = OrderedDict()

    @classmethod
    def from_settings(
        cls, settings: Settings, device: torch.device | str, *, lock: threading.Lock | None = None, **kwargs
    ) -> Upscalers:
        """Z_IMAGE_UPSCALER_DIR and Z_IMAGE_UPSCALER_CACHE; the pixel limit Z_IMAGE_MAX_PIXELS unless given."""
        kwargs.setdefault("max_pixels", settings.max_pixels)
        return cls(settings.upscalers_dir, device=device, cache_size=settings.upscaler_cache, lock=lock, **kwargs)

    # -- names -------------------------------------------------------------------------------------

    def files(self) -> dict[str, Path]:
        """Model files by name, scanned on every call so files dropped in are found without a restart.
        The folder's top level only (names are file stems, as in A1111); a .safetensors wins over a
        .pth of the same name, and a file named like a built-in is shadowed by it."""
        if not self.folder.is_dir():
            return {}
        root = self.folder.resolve()
        found: dict[str, Path] = {}
        for path in sorted(self.folder.iterdir()):
            if path.name.startswith(".") or path.suffix.lower() not in SUFFIXES or not path.is_file():
                continue
            if not path.resolve().is_relative_to(root):  # a symlink out of the folder is not the folder's
                continue
            if path.stem in PIXEL_RESIZES:
                continue
            if path.stem not in found or path.suffix.lower() == ".safetensors":
                found[path.stem] = path
        return dict(sorted(found.items()))

    def names(self) -> list[str]:
        return [*PIXEL_RESIZES, *self.files()]

    def exists(self, name: str) -> bool:
        """Whether `name` is a built-in or a file in the folder (cheap: no file is read)."""
        return name in PIXEL_RESIZES or name in self.files()

    def _path(self, name: str) -> Path:
        path = self.files().get(name)
        if path is None:
            raise UnknownUpscaler(name)
        return path

    # -- cards ---------------------------------------------------------------------------------------

    def card(self, name: str, read: bool = True) -> UpscalerCard | None:
        """The card of a built-in or a file; reads the file the first time (or after it changed),
        unless not to `read` (then None)."""
        if name in PIXEL_RESIZES:
            return UpscalerCard(name)
        path = self._path(name)
        key = file_identity(path)
        cached = self._cards.get(key)
        if cached is None and not read:
            return None
        if cached is None:
            return self._read(path, key)[1]
        if isinstance(cached, UpscalerFileError):
            raise cached
        return cached

    def _read(self, path: Path, key: tuple[str, int, int]) -> tuple[ImageModelDescriptor, UpscalerCard]:
        """Read a file (on the CPU), caching its card, or its failure (logged once per version of the file)."""
        try:
            model, card = read_model(path, self.registry)
        except UpscalerFileError as exc:
            log.warning("skipping %s", exc)
            self._cards[key] = exc
            raise
        self._cards[key] = card
        return model, card

    def list_upscalers(self, read_new: bool = True) -> list[UpscalerCard] | None:
        """The built-ins, then every usable file by name; unusable ones are left out (logged once each).
        Runs on the caller's thread: a file not seen before is read and built on the CPU (spandrel
        needs the state dict for the scale), well under a second for the common 5-70 MB files.
        Without `read_new` nothing is read (no torch work, so any thread may ask): None if a file
        has not been read yet."""
        cards = []
        for name in self.names():
            try:
                card = self.card(name, read=read_new)
            except UpscalerFileError:
                continue
            if card is None:
                return None
            cards.append(card)
        return cards

    # -- loaded models -------------------------------------------------------------------------------

    def _model(self, name: str) -> LoadedUpscaler:
        """The loaded model for `name`, from the LRU or read now (on the model thread)."""
        path = self._path(name)
        key = file_identity(path)
        loaded = self._loaded.get(key)
        if loaded is not None:
            self._loaded.move_to_end(key)
            return loaded
        cached = self._cards.get(key)
        if isinstance(cached, UpscalerFileError):
            raise cached
        started = time.perf_counter()
        model, card = self._read(path, key)
        if len(self._loaded) >= self.cache_size:
            while len(self._loaded) >= self.cache_size:
                self._loaded.popitem(last=False)
            free_device_memory(self.device)  # the evicted weights' blocks, back to the card's other users
        dtype = compute_dtype(model, self.device.type, self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        model.to(self.device, dtype).eval()
        loaded = self._loaded[key] = LoadedUpscaler(card, model)
        self.loads += 1
        log.info(
            "loaded upscaler %s (%s, %dx, %s params) on %s in %s in %.2f s",
            name, card.architecture, card.scale, f"{card.parameters:,}", self.device, str(dtype).removeprefix("torch."),
            time.perf_counter() - started,
        )  # fmt: skip
        return loaded

    def unload(self) -> None:
        """Drop every loaded model (the runner's sleep frees the device); the next use reads it again."""
        self._loaded.clear()
        free_device_memory(self.device)

    @property
    def loaded_names(self) -> list[str]:
        """Loaded models, least recently used first."""
        return [loaded.card.name for loaded in self._loaded.values()]

    @contextmanager
    def _holding_lock(self, lock_held: bool) -> Iterator[None]:
        with nullcontext() if self.lock is None or lock_held else self.lock:
            yield

    # -- running -------------------------------------------------------------------------------------

    def _run_model(self, loaded: LoadedUpscaler, image: Image.Image) -> Image.Image:
        """One pass of the model over the image, tiled; the tile halves on out-of-memory."""
        if image.width * image.height > self.max_pixels:
            raise UpscaleTooLarge(
                f"an upscaler pass over {image.width}x{image.height} would exceed the limit of {self.max_pixels} pixels"
            )
        tile = min(self.tile, max(image.width, image.height))
        pixels = image_to_tensor(image)
        while True:
            try:
                return self._run_tiles(loaded, pixels, tile)
            except Exception as exc:
                if not is_out_of_memory(exc) or tile // 2 < self.min_tile:
                    raise
                name = loaded.card.name
                log.warning("upscaler %s ran out of memory at %d px tiles; trying %d", name, tile, tile // 2)
            tile //= 2
            free_device_memory(self.device)  # after the except block, which held the failed tile's frames

    def _run_tiles(self, loaded: LoadedUpscaler, pixels: torch.Tensor, tile: int) -> Image.Image:
        scale, (height, width) = loaded.card.scale, pixels.shape[-2:]
        output = torch.empty((height * scale, width * scale, 3), dtype=torch.uint8)
        source = pixels.to(self.device, loaded.model.dtype)
        rows = tile_spans(height, tile, self.overlap, loaded.multiple_of)
        columns = tile_spans(width, tile, self.overlap, loaded.multiple_of)
        with torch.inference_mode():
            for top, bottom, core_top, core_bottom in rows:
                for left, right, core_left, core_right in columns:
                    result = loaded.model(source[..., top:bottom, left:right].contiguous())
                    if result.shape[-2:] != ((bottom - top) * scale, (right - left) * scale):
                        raise UpscalerFileError(
                            loaded.card.path, f"its output {tuple(result.shape[-2:])} is not {scale}x its input"
                        )
                    core = result[
                        ..., (core_top - top) * scale : (core_bottom - top) * scale,
                        (core_left - left) * scale : (core_right - left) * scale,
                    ]  # fmt: skip
                    output[core_top * scale : core_bottom * scale, core_left * scale : core_right * scale] = (
                        tensor_to_pixels(core).cpu()
                    )
        return Image.fromarray(output.numpy(), "RGB")

    def _model_passes(self, loaded: LoadedUpscaler, image: Image.Image, width: int, height: int) -> Image.Image:
        """A1111's loop: run the model (once at least) until the image covers width x height, at
        most MAX_PASSES times, stopping early if a pass does not grow it (a 1x model)."""
        for _ in range(MAX_PASSES):
            before = image.size
            image = self._run_model(loaded, image)
            if image.size == before or (image.width >= width and image.height >= height):
                break
        return image

    def _check_size(self, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise UpscalerError(f"cannot upscale to {width}x{height}: both sides must be at least 1 pixel")
        if width * height > self.max_pixels:
            raise UpscaleTooLarge(
                f"upscaling to {width}x{height} ({width * height} pixels) exceeds the limit of {self.max_pixels} pixels"
            )

    def _scale(
        self, image: Image.Image, upscaler: str, width: int, height: int, lock_held: bool, at_least_once: bool
    ) -> Image.Image:
        """`image` to exactly width x height with `upscaler` (a built-in resize or a model)."""
        if upscaler in PIXEL_RESIZES:
            return image.resize((width, height), PIXEL_RESIZES[upscaler])
        self._path(upscaler)  # an unknown name fails before any work
        if at_least_once or width > image.width or height > image.height:
            with self._holding_lock(lock_held):
                image = self._model_passes(self._model(upscaler), image, width, height)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        return image

    @on_model_thread
    def upscale_to(
        self, image: Image.Image, upscaler: str, width: int, height: int, *, lock_held: bool = False
    ) -> Image.Image:
        """A1111's resize_image for the hires fix: `None`/`Lanczos` a Lanczos resize, `Nearest` a
        nearest-neighbour one; a model runs only when the target is larger on some side (up to 3
        passes until it covers it), then a Lanczos resize to exactly width x height. RGB out."""
        self._check_size(width, height)
        return self._scale(image.convert("RGB"), upscaler, width, height, lock_held, at_least_once=False)

    @on_model_thread
    def extras_upscale(
        self,
        image: Image.Image,
        *,
        resize_mode: int = 0,
        upscaling_resize: float = 2.0,
        upscaling_resize_w: int = 512,
        upscaling_resize_h: int = 512,
        upscaling_crop: bool = True,
        upscaler_1: str | None = "None",
        upscaler_2: str | None = "None",
        extras_upscaler_2_visibility: float = 0.0,
        lock_held: bool = False,
    ) -> Image.Image:
        """A1111's /sdapi/v1/extra-single-image upscale (scripts/postprocessing_upscale.py).

        resize_mode 0 scales by `upscaling_resize`; 1 scales by max(w / width, h / height), the
        factor that covers upscaling_resize_w x _h, then with `upscaling_crop` cuts the centre to
        exactly that size, without it keeps the whole scaled image (aspect kept, one side larger).
        The scaled size is A1111's: each side times the factor, floored to a multiple of 8. A model
        runs at least once whatever the factor (as A1111's). `upscaler_1` "None" returns the image
        unchanged; `upscaler_2` with visibility > 0 upscales the same image again and blends it in
        (`Image.blend`). One deliberate difference: where A1111 pastes a scaled image that its
        rounding left up to 7 pixels short onto a black canvas, the crop here always covers.
        """
        first = None if upscaler_1 in (None, "None") else upscaler_1
        second = None if upscaler_2 in (None, "None") else upscaler_2
        for name in (first, second):  # A1111 checks both names before any work
            if name is not None and name not in PIXEL_RESIZES:
                self._path(name)
        if not 0.0 <= extras_upscaler_2_visibility <= 1.0:
            raise UpscalerError(f"extras_upscaler_2_visibility {extras_upscaler_2_visibility} is outside 0..1")
        if first is None:
            return image
        image = image.convert("RGB")
        if resize_mode == 1:
            self._check_size(upscaling_resize_w, upscaling_resize_h)
            factor = max(upscaling_resize_w / image.width, upscaling_resize_h / image.height)
        elif resize_mode == 0:
            if not (math.isfinite(upscaling_resize) and upscaling_resize > 0):
                raise UpscalerError(f"upscaling_resize {upscaling_resize} must be more than 0")
            factor = upscaling_resize
        else:
            raise UpscalerError(f"resize_mode {resize_mode} is not 0 (scale by) or 1 (scale to)")
        width = int(image.width * factor // A1111_SIZE_STEP * A1111_SIZE_STEP)
        height = int(image.height * factor // A1111_SIZE_STEP * A1111_SIZE_STEP)
        crop = resize_mode == 1 and upscaling_crop
        if crop:
            width, height = max(width, upscaling_resize_w), max(height, upscaling_resize_h)
        self._check_size(width, height)

        def upscaled(name: str) -> Image.Image:
            result = self._scale(image, name, width, height, lock_held=True, at_least_once=True)
            if crop:
                # A1111 pastes the image centred: at (w // 2 - iw // 2, h // 2 - ih // 2).
                left, top = width // 2 - upscaling_resize_w // 2, height // 2 - upscaling_resize_h // 2
                result = result.crop((left, top, left + upscaling_resize_w, top + upscaling_resize_h))
            return result

        # Plain resizes leave the device alone; a model's passes share it with the pipeline.
        models = [name for name in (first, second) if name is not None and name not in PIXEL_RESIZES]
        with self._holding_lock(lock_held or not models):
            result = upscaled(first)
            if second is not None and extras_upscaler_2_visibility > 0:
                result = Image.blend(result, upscaled(second), extras_upscaler_2_visibility)
        return result
