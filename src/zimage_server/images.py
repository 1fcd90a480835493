"""Decode and check uploaded images, encode generated ones for the wire (Pillow only)."""

from __future__ import annotations

import io
from dataclasses import dataclass

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

    def as_text(self) -> str:
        # The layout other image tools parse: prompt, then "Negative prompt:", then key: value pairs.
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, CFG scale: {self.guidance_scale:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: z-image-{self.variant}"
            + (f", Denoising strength: {self.strength:g}" if self.strength is not None else "")
        )
        return "\n".join(lines)


def encode_image(
    image: Image.Image, output_format: str, compression: int | None, parameters: ImageParameters | None
) -> bytes:
    """PNG (lossless, with a parameters chunk), or JPEG/WebP at quality `compression` (default 90)."""
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        if parameters is not None:
            info.add_itxt("parameters", parameters.as_text())
        image.save(buffer, format="PNG", pnginfo=info)
    else:
        # OpenAI documents output_compression 0-100 with a default of 100 meaning best quality,
        # so it maps onto the encoder's quality scale; peers (vLLM-Omni, SGLang) read it the same way.
        quality = compression if compression is not None else 90
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=max(quality, 1))
    return buffer.getvalue()


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
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
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
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


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
