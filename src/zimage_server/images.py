"""Decode and check uploaded images, encode generated ones for the wire (fpng for PNG, else Pillow)."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
FORMAT_FOR_MEDIA_TYPE = {media: fmt for fmt, media in MEDIA_TYPES.items()}


@dataclass(frozen=True)
class ImageParameters:
    """What produced an image, written into PNGs as A1111's `parameters` text chunk."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    variant: str
    strength: float | None = None  # edits only: how much of the input image was re-noised
    loras: tuple[tuple[str, float, str], ...] = ()  # (name, scale, short hash) of each LoRA applied
    extra: tuple[tuple[str, str | int | float], ...] = ()  # further A1111 keys, in order (the hires fix's, ...)

    def as_text(self) -> str:
        # The layout other image tools parse: prompt, then "Negative prompt:", then key: value pairs.
        # A1111 keeps LoRAs as tags in the prompt text, so pasting it back reproduces the image.
        tags = "".join(f" <lora:{name}:{scale:g}>" for name, scale, _ in self.loras)
        lines = [self.prompt + tags]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, CFG scale: {self.guidance_scale:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: z-image-{self.variant}"
            + (f", Denoising strength: {self.strength:g}" if self.strength is not None else "")
            + "".join(f", {key}: {infotext_value(str(value))}" for key, value in self.extra)
            + (
                f', Lora hashes: "{", ".join(f"{name}: {digest}" for name, _, digest in self.loras)}"'
                if self.loras
                else ""
            )
        )
        return "\n".join(lines)


def infotext_value(value: str) -> str:
    """A value as A1111's infotext writes it (its `quote`): JSON-quoted when it holds a comma, colon or newline."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


# fpng writes a 1024x1024 RGB PNG in 5-10 ms where Pillow's default takes 100-650 ms, in files
# 1.0-1.25x the size on picture-like images (benchmarks/encoders.py; only noiseless synthetic
# gradients, which no pipeline returns, come out larger: 5x). Pillow stays the fallback where fpng
# has no wheel, and for modes fpng does not write (it takes 8-bit RGB and RGBA only).
try:
    import fpng
except ImportError:
    fpng = None

# Pillow's zlib level where fpng cannot be used: level 1 is up to 6x faster than the default 6
# (no faster on noise), in files 1.0-1.2x the size on picture-like images (benchmarks/encoders.py).
PILLOW_PNG_LEVEL = 1
# WebP's fastest method: at 1024x1024 it takes a third to a half of the time of Pillow's default
# (4), 20-80 ms on picture-like images and ~120 ms on noise here, at the same quality and a file
# 1.0-1.1x the size (benchmarks/encoders.py).
WEBP_METHOD = 0
DEFAULT_QUALITY = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature, then IHDR's length, type, 13 bytes of data and CRC: the first chunk PNG allows after it.
IHDR_END = len(PNG_SIGNATURE) + 4 + 4 + 13 + 4

# For the images of one request, where their encoder releases the GIL (Pillow's PNG and WebP: two
# images take the time of one on our two cores); as many threads as cores, since more would queue.
_encode_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="encode")


XMP_PNG_KEYWORD = "XML:com.adobe.xmp"  # the iTXt keyword XMP readers look for in a PNG


def encode_image(
    image: Image.Image,
    output_format: str,
    compression: int | None,
    parameters: ImageParameters | None,
    xmp: bytes | None = None,
) -> bytes:
    """PNG (lossless, with a parameters chunk), or JPEG/WebP at quality `compression` (default 90);
    each with `xmp` (provenance.py's marks) where given, written in the same pass."""
    if output_format == "png":
        return encode_png(image, parameters, xmp)
    # OpenAI documents output_compression 0-100 with a default of 100 meaning best quality,
    # so it maps onto the encoder's quality scale; peers (vLLM-Omni, SGLang) read it the same way.
    quality = max(compression if compression is not None else DEFAULT_QUALITY, 1)
    options = {"method": WEBP_METHOD} if output_format == "webp" else {}
    if xmp is not None:
        options["xmp"] = xmp  # Pillow writes JPEG's APP1 XMP segment and WebP's extended-format XMP chunk
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality, **options)
    return buffer.getvalue()


def encode_images(
    images: list[Image.Image],
    parameters_list: list[ImageParameters | None],
    output_format: str,
    compression: int | None,
    xmp: bytes | None = None,
    finish: Callable[[bytes], bytes] | None = None,
) -> list[bytes]:
    """`encode_image` for each image of one request, in parallel where that is faster; `finish`, when
    given, runs on each encoded image in the same pass (C2PA signing).

    fpng and Pillow's JPEG encoder hold the GIL, so threads gain nothing there (benchmarks/encoders.py):
    a loop is as fast and skips the hand-off. Four 1024x1024 fpng PNGs take ~25 ms in a loop."""
    if len(images) != len(parameters_list):
        raise ValueError(f"{len(images)} images but {len(parameters_list)} parameter sets")

    def encode(image: Image.Image, parameters: ImageParameters | None) -> bytes:
        blob = encode_image(image, output_format, compression, parameters, xmp)
        return finish(blob) if finish is not None else blob

    holds_gil = output_format == "jpeg" or (output_format == "png" and all(map(fpng_writes, images)))
    if len(images) == 1 or holds_gil:
        return list(map(encode, images, parameters_list))
    return list(_encode_pool.map(encode, images, parameters_list))


def fpng_writes(image: Image.Image) -> bool:
    return fpng is not None and image.mode in ("RGB", "RGBA")


def encode_png(image: Image.Image, parameters: ImageParameters | None, xmp: bytes | None = None) -> bytes:
    """A lossless PNG, with A1111's `parameters` iTXt chunk and an XMP iTXt chunk when given."""
    texts = {}
    if parameters is not None:
        texts["parameters"] = parameters.as_text()
    if xmp is not None:
        texts[XMP_PNG_KEYWORD] = xmp.decode()
    if not fpng_writes(image):
        info = PngImagePlugin.PngInfo()
        for keyword, text in texts.items():
            info.add_itxt(keyword, text)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info, compress_level=PILLOW_PNG_LEVEL)
        return buffer.getvalue()
    png = fpng.from_pil(image)
    if not texts:
        return png
    # fpng writes no text chunks: add ours right after IHDR, where readers that stop at the first
    # IDAT (and Pillow's `Image.open(...).text` without a load) still find them.
    if png[len(PNG_SIGNATURE) + 4 : len(PNG_SIGNATURE) + 8] != b"IHDR":
        raise RuntimeError("fpng wrote a PNG that does not start with IHDR")
    chunks = b"".join(itxt_chunk(keyword, text) for keyword, text in texts.items())
    return png[:IHDR_END] + chunks + png[IHDR_END:]


def itxt_chunk(keyword: str, text: str) -> bytes:
    """An uncompressed iTXt chunk (PNG spec 11.3.4.5): keyword, NUL, compression flag and method,
    empty language tag and translated keyword (each NUL-ended), then the UTF-8 text."""
    return png_chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode("utf-8"))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data, and the CRC-32 of type and data (PNG spec 5.3)."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# Uploads: everything below treats the bytes as hostile until Pillow has decoded them within limits.

# Decoded pixels one upload may have: 8192x8192 (about 200 MB as RGB). Inputs are scaled down to at
# most Z_IMAGE_MAX_PIXELS before any model sees them, so larger photos gain nothing; this bound only
# keeps a tiny file that claims huge dimensions from allocating gigabytes.
MAX_DECODED_PIXELS = 8192 * 8192
UPLOAD_FORMATS = "PNG, JPEG or WebP"


class ImageInputError(ValueError):
    """An upload we refuse: 415 for a format we do not take, 400 for a broken or oversized image."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.message = message
        self.status_code = status_code


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from the file's magic bytes, for the three formats we accept."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_upload(data: bytes, what: str) -> Image.Image:
    """The decoded, EXIF-oriented image in its own mode; refuses other formats, bombs and broken files."""
    if not data:
        raise ImageInputError(f"'{what}' is an empty file.")
    image_format = sniff_format(data)
    if image_format is None:
        raise ImageInputError(f"'{what}' is not a {UPLOAD_FORMATS} image.", status_code=415)
    try:
        # formats= keeps Pillow from trying any other decoder on bytes that merely start like ours.
        image = Image.open(io.BytesIO(data), formats=[image_format])
        width, height = image.size
        # The header alone gives the size: refuse before load() allocates the pixels.
        if width * height > MAX_DECODED_PIXELS:
            raise ImageInputError(
                f"'{what}' is {width}x{height}: more than the {MAX_DECODED_PIXELS} pixels an upload may have."
            )
        image.load()
        return ImageOps.exif_transpose(image)
    except ImageInputError:
        raise
    except Image.DecompressionBombError:
        raise ImageInputError(
            f"'{what}' claims more than the {MAX_DECODED_PIXELS} pixels an upload may have."
        ) from None
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - any decoder failure on untrusted bytes means a broken file
        raise ImageInputError(
            f"'{what}' could not be decoded as {image_format}: the file is truncated or corrupt."
        ) from None


def has_alpha(image: Image.Image) -> bool:
    # Pillow's own test: alpha modes, a transparent palette entry or colour key, and "P" images
    # whose palette itself carries alpha (mode "RGBA" palettes), which the info dict does not show.
    return image.has_transparency_data


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for the model. Transparent pixels are composited on white, as viewers show them on a page;
    dropping alpha instead would expose whatever colour the encoder left there (often black)."""
    if image.mode.startswith("I"):
        # 16-bit grayscale PNG: Pillow's own conversion clips at 255 instead of scaling.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    if has_alpha(image):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def edit_area(mask: Image.Image) -> Image.Image:
    """The mask as "L", 255 where the model may repaint: alpha 0 if the mask has alpha (OpenAI's rule), else white."""
    if has_alpha(mask):
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value == 0 else 0)
    return to_rgb(mask).convert("L").point(lambda value: 255 if value >= 128 else 0)


def a1111_repaint_area(mask: Image.Image) -> Image.Image:
    """The mask as "L", 255 where the model may repaint, by AUTOMATIC1111's rule: opaque alpha if the
    mask has transparency (the opposite of OpenAI's alpha rule), else white, as in `edit_area`."""
    if has_alpha(mask):
        return mask.convert("RGBA").getchannel("A").point(lambda value: 255 if value > 128 else 0)
    return edit_area(mask)


def fit_size(
    width: int, height: int, *, max_pixels: int, max_side: int, min_side: int = 64, multiple: int = 16
) -> tuple[int, int]:
    """An output size near width x height: scaled down to fit max_pixels and max_side, snapped down to
    `multiple`, and at least min_side a side. The aspect ratio is kept except where min_side forces it."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5, max_side / width, max_side / height)
    fitted = [max(min_side, min(max_side, int(side * scale) // multiple * multiple)) for side in (width, height)]
    # Raising a thin side to min_side can push the area over max_pixels again: trim the long side.
    long = 0 if fitted[0] >= fitted[1] else 1
    while fitted[0] * fitted[1] > max_pixels and fitted[long] > min_side:
        fitted[long] -= multiple
    return fitted[0], fitted[1]


def fit_to(image: Image.Image, size: tuple[int, int], *, nearest: bool = False) -> Image.Image:
    """`image` scaled to cover `size` and centre-cropped to it, so nothing is stretched.
    Masks use nearest-neighbour so they stay binary."""
    if image.size == size:
        return image
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return ImageOps.fit(image, size, method=method)


# Control maps: what the server computes from a photo when a request asks for `canny`.

CANNY_LOW, CANNY_HIGH = 100, 200  # the thresholds A1111's ControlNet extension uses by default


def canny_edges(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """Canny's edge map (white edges on black, RGB) as OpenCV's `Canny(gray, low, high)` computes it:
    3x3 Sobel gradients, L1 magnitude, non-maximum suppression along the gradient, and hysteresis
    (weak edges kept only where they connect to strong ones). numpy only: no OpenCV dependency."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    padded = np.pad(gray, 1, mode="edge")

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy : padded.shape[0] - 1 + dy, 1 + dx : padded.shape[1] - 1 + dx]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = np.abs(gx) + np.abs(gy)
    # The gradient's direction, in four sectors: 0 (horizontal), 45, 90 and 135 degrees.
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    sector = (((angle + 22.5) // 45) % 4).astype(np.int8)
    padded_magnitude = np.pad(magnitude, 1)
    keep = np.zeros(magnitude.shape, dtype=bool)
    height, width = magnitude.shape
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = padded_magnitude[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        behind = padded_magnitude[1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        keep |= (sector == index) & (magnitude >= ahead) & (magnitude > behind)
    thin = np.where(keep, magnitude, 0)
    return Image.fromarray(hysteresis(thin > high, thin > low)).convert("RGB")


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """255 where a weak pixel connects (8-neighbourhood) to a strong one, else 0.

    A breadth-first walk from the strong pixels over the weak ones: each weak pixel is visited
    once, so a long faint edge costs its length, not that many passes over the whole image."""
    height, width = weak.shape
    padded = np.pad(weak, 1)  # a border of False, so neighbours never wrap around a row
    visited = np.pad(strong & weak, 1)
    stride = width + 2
    flat_weak, flat_visited = padded.ravel(), visited.ravel()
    queue = deque(np.flatnonzero(flat_visited).tolist())
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    while queue:
        index = queue.popleft()
        for offset in offsets:
            neighbour = index + offset
            if flat_weak[neighbour] and not flat_visited[neighbour]:
                flat_visited[neighbour] = True
                queue.append(neighbour)
    return np.where(visited[1:-1, 1:-1], 255, 0).astype(np.uint8)
