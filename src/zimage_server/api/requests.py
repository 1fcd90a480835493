"""Turn a validated request struct into work for the batcher: checks that depend on settings and model."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from ..pipelines import GenerationSpec, ZImageEngine
from ..settings import Settings
from .errors import ApiError
from .schemas import GenerationRequest

SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
DEFAULT_SIZE = (1024, 1024)
MIN_SIDE, MAX_SIDE = 64, 2048


@dataclass(frozen=True)
class OutputOptions:
    output_format: str
    compression: int | None


def parse_size(
    raw: str | None, engine: ZImageEngine, settings: Settings, default: tuple[int, int] = DEFAULT_SIZE
) -> tuple[int, int]:
    """(width, height) from "WxH", or `default` for "auto", within every limit the server and the model impose."""
    if raw is None or raw.strip().lower() in ("", "auto"):
        width, height = default
    else:
        match = SIZE_PATTERN.match(raw)
        if not match:
            raise ApiError(400, f"Invalid size '{raw}': use WIDTHxHEIGHT, e.g. 1024x1024, or auto.", param="size")
        width, height = int(match.group(1)), int(match.group(2))
    if width % 16 or height % 16:
        raise ApiError(400, f"Invalid size {width}x{height}: width and height must be multiples of 16.", param="size")
    max_width, max_height = min(MAX_SIDE, engine.max_width), min(MAX_SIDE, engine.max_height)
    if not (MIN_SIDE <= width <= max_width and MIN_SIDE <= height <= max_height):
        raise ApiError(
            400,
            f"Invalid size {width}x{height}: width must be {MIN_SIDE}..{max_width} and height {MIN_SIDE}..{max_height}.",
            param="size",
        )
    if width * height > settings.max_pixels:
        raise ApiError(
            400,
            f"Invalid size {width}x{height}: {width * height} pixels exceeds this server's limit of "
            f"{settings.max_pixels} (Z_IMAGE_MAX_PIXELS).",
            param="size",
        )
    return width, height


def check_model(model: str | None, engine: ZImageEngine) -> None:
    if model and model not in served_model_ids(engine):
        raise ApiError(
            400,
            f"Model '{model}' is not served here; this server runs '{served_model_ids(engine)[0]}'.",
            param="model",
            code="model_not_found",
        )


def served_model_ids(engine: ZImageEngine) -> list[str]:
    return [f"z-image-{engine.variant}", engine.variant]


def check_n(n: int, settings: Settings) -> None:
    if n > settings.max_n:
        raise ApiError(400, f"Invalid n={n}: this server makes at most {settings.max_n} images per request.", param="n")


def seeds_for(seed: int | None, n: int) -> tuple[int, ...]:
    base = seed if seed is not None else secrets.randbelow(2**32)
    return tuple(base + i for i in range(n))


def generation_spec(
    data: GenerationRequest, engine: ZImageEngine, settings: Settings, default_size: tuple[int, int] = DEFAULT_SIZE
) -> tuple[GenerationSpec, OutputOptions]:
    """Validate a generations request against this server and model; the spec the batcher will run."""
    if not data.prompt.strip():
        raise ApiError(400, "'prompt' must not be empty.", param="prompt")
    check_model(data.model, engine)
    check_n(data.n, settings)
    if data.response_format == "url":
        raise ApiError(
            400,
            "response_format 'url' is not supported: this server keeps no image store. Use b64_json.",
            param="response_format",
        )
    width, height = parse_size(data.size, engine, settings, default_size)
    spec = GenerationSpec(
        prompt=data.prompt,
        negative_prompt=data.negative_prompt or None,
        seeds=seeds_for(data.seed, data.n),
        width=width,
        height=height,
        num_inference_steps=data.num_inference_steps or engine.default_steps,
        guidance_scale=engine.default_guidance if data.guidance_scale is None else data.guidance_scale,
        cfg_normalization=bool(data.cfg_normalization),
        cfg_truncation=1.0 if data.cfg_truncation is None else data.cfg_truncation,
        max_sequence_length=data.max_sequence_length or 512,
    )
    return spec, OutputOptions(output_format=data.output_format or "png", compression=data.output_compression)


def batch_key(spec: GenerationSpec) -> tuple:
    """Requests with equal keys can share one pipeline call."""
    return (
        "generate",
        spec.width,
        spec.height,
        spec.num_inference_steps,
        spec.guidance_scale,
        spec.cfg_normalization,
        spec.cfg_truncation,
        spec.max_sequence_length,
    )
