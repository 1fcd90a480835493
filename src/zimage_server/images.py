"""Encode generated images for the wire (Pillow only)."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, PngImagePlugin

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

    def as_text(self) -> str:
        # The layout other image tools parse: prompt, then "Negative prompt:", then key: value pairs.
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(
            f"Steps: {self.steps}, CFG scale: {self.guidance_scale:g}, Seed: {self.seed}, "
            f"Size: {self.width}x{self.height}, Model: z-image-{self.variant}"
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
