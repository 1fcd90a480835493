"""Turn a validated request struct into work for the batcher: checks that depend on settings and model."""

from __future__ import annotations

import dataclasses
import re
import secrets

from ..hires import HiresError, HiresTarget, UpscalerError, hires_params
from ..lora_library import LoraError, LoraKey, check_lora_limits, merge_requests, parse_lora_tags
from ..specs import CallMode, CallParams, GenerationSpec, HiresParams
from .errors import ApiError, lora_error
from .responses import OutputOptions, store_unavailable
from .schemas import GenerationRequest, HiresRequest
from .state import ServerState

SIZE_PATTERN = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")
DEFAULT_SIZE = (1024, 1024)
MIN_SIDE, MAX_SIDE = 64, 2048


def max_sides(server: ServerState) -> tuple[int, int]:
    """The largest width and height this server and the loaded model accept."""
    return min(MAX_SIDE, server.runner.max_width), min(MAX_SIDE, server.runner.max_height)


def parse_size(raw: str | None, server: ServerState, default: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
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
    max_width, max_height = max_sides(server)
    if not (MIN_SIDE <= width <= max_width and MIN_SIDE <= height <= max_height):
        raise ApiError(
            400,
            f"Invalid size {width}x{height}: width must be {MIN_SIDE}..{max_width} and height {MIN_SIDE}..{max_height}.",
            param="size",
        )
    settings = server.settings
    if width * height > settings.max_pixels:
        raise ApiError(
            400,
            f"Invalid size {width}x{height}: {width * height} pixels exceeds this server's limit of "
            f"{settings.max_pixels} (Z_IMAGE_MAX_PIXELS).",
            param="size",
        )
    return width, height


def check_model(model: str | None, server: ServerState) -> None:
    if model and model not in served_model_ids(server):
        raise ApiError(
            400,
            f"Model '{model}' is not served here; this server runs '{server.variant.model_name}'.",
            param="model",
            code="model_not_found",
        )


def served_model_ids(server: ServerState) -> list[str]:
    """The names requests may send as `model`: the model's own, then the aliases for clients that
    cannot change theirs (Z_IMAGE_MODEL_ALIASES: OpenAI's own image model names by default)."""
    return [server.variant.model_name, server.variant.name, *server.settings.model_aliases]


def check_n(n: int, server: ServerState) -> None:
    if n > server.settings.max_n:
        raise ApiError(
            400, f"Invalid n={n}: this server makes at most {server.settings.max_n} images per request.", param="n"
        )


def seeds_for(seed: int | None, n: int) -> tuple[int, ...]:
    base = seed if seed is not None else secrets.randbelow(2**32)
    return tuple(base + i for i in range(n))


def requested_loras(data: GenerationRequest, server: ServerState) -> tuple[str, LoraKey]:
    """The prompt without its <lora:...> tags, and the request's LoRAs (field and tags) as one key.

    Names are checked against the folder now, so an unknown or escaping name is a 400 before
    anything is queued; the file itself is read (and may still be refused) when its call runs."""
    try:
        prompt, tagged = parse_lora_tags(data.prompt)
        key = merge_requests([*((lora.name, lora.scale) for lora in data.loras or ()), *tagged])
        if not key:
            return prompt, key
        library = server.runner.lora_library
        if library is None:
            raise LoraError(
                "LoRA is off on this server: its LoRA folder (Z_IMAGE_LORA_DIR, default MODELS_DIR/loras) did "
                "not exist at start-up, or Z_IMAGE_LORA_MAX_RANK=0; create the folder and restart"
            )
        check_lora_limits(key, server.settings.max_loras)
        for name, _ in key:
            library.resolve(name)
    except LoraError as exc:
        raise lora_error(exc) from None
    return prompt, key


def generation_spec(
    data: GenerationRequest,
    server: ServerState,
    *,
    mode: CallMode = "generate",
    default_size: tuple[int, int] = DEFAULT_SIZE,
    **edit_params,
) -> tuple[GenerationSpec, OutputOptions]:
    """Validate a request's shared fields against this server and model; the spec the batcher will run.

    Edits pass their mode and their own call parameters (strength, references_digest) and add
    their images to the spec."""
    prompt, loras = requested_loras(data, server)
    if not prompt.strip():
        raise ApiError(400, "'prompt' must not be empty.", param="prompt")
    check_model(data.model, server)
    check_n(data.n, server)
    response_format = response_format_for(data, server)
    width, height = parse_size(data.size, server, default_size)
    variant = server.variant
    params = CallParams(
        mode=mode,
        width=width,
        height=height,
        num_inference_steps=data.num_inference_steps or variant.default_steps,
        guidance_scale=variant.default_guidance if data.guidance_scale is None else data.guidance_scale,
        cfg_normalization=bool(data.cfg_normalization),
        cfg_truncation=1.0 if data.cfg_truncation is None else data.cfg_truncation,
        max_sequence_length=data.max_sequence_length or 512,
        loras=loras,
        variation_strength=variation_for(data, server),
        **edit_params,
    )
    described_as = ()
    if data.hires is not None:
        hires, described_as = openai_hires(data.hires, params, server)
        params = dataclasses.replace(params, hires=hires)
    spec = GenerationSpec(
        prompt=prompt,
        negative_prompt=data.negative_prompt or None,
        seeds=seeds_for(data.seed, data.n),
        params=params,
        hires_described_as=described_as,
    )
    options = OutputOptions(
        output_format=data.output_format or "png",
        compression=data.output_compression,
        response_format=response_format,
        store=data.store is not False,
    )
    return spec, options


def variation_for(data: GenerationRequest, server: ServerState) -> float:
    """The request's seed variation, or the server's; Omni encodes prompts inside its pipeline call,
    with its reference images, so there is no embedding to vary there: asked for, a 400."""
    if server.variant.edit_method != "omni":
        return server.settings.variation_strength if data.variation_strength is None else data.variation_strength
    if data.variation_strength:
        raise ApiError(
            400, f"variation_strength needs the turbo or base variant; this server runs {server.variant.name}.",
            param="variation_strength",
        )  # fmt: skip
    return 0.0


# Defaults of the OpenAI routes' hires fix. Not judged on the tiny test model (it draws noise):
# community Z-Image workflows upscale about 1.5-2x (2x "usually safe", beyond it artifacts) and
# refine with Turbo at low strength; docs/hires.md cites them.
HIRES_SCALE = 1.5
HIRES_UPSCALER = "Lanczos"
HIRES_DENOISING_STRENGTH = 0.4


def openai_hires(
    data: HiresRequest, params: CallParams, server: ServerState
) -> tuple[HiresParams, tuple[tuple[str, str | int | float], ...]]:
    """The `hires` object of a generation or edit: a target by scale or by size, in multiples of 16."""
    if (data.width is None) != (data.height is None):
        raise ApiError(400, "hires: give both width and height, or neither.", param="hires")
    if data.width is not None and data.scale is not None:
        raise ApiError(400, "hires: give scale, or width and height, not both.", param="hires")
    if data.width is not None:
        if data.width % 16 or data.height % 16:
            raise ApiError(400, f"hires: {data.width}x{data.height} must be multiples of 16.", param="hires")
        target = HiresTarget(data.width, data.height)
        described_as = ("Hires resize", f"{data.width}x{data.height}")
    else:
        scale = HIRES_SCALE if data.scale is None else data.scale
        target = HiresTarget(*(int(side * scale) // 16 * 16 for side in (params.width, params.height)))
        described_as = ("Hires upscale", float(scale))
    upscaler = data.upscaler or HIRES_UPSCALER
    hires = checked_hires(
        server,
        target,
        upscaler=upscaler,
        steps=data.steps or params.num_inference_steps,
        strength=HIRES_DENOISING_STRENGTH if data.denoising_strength is None else data.denoising_strength,
        guidance_scale=params.guidance_scale if data.guidance_scale is None else data.guidance_scale,
        param="hires",
    )
    keys = [described_as, ("Hires upscaler", upscaler)]
    if data.steps:
        keys.insert(1, ("Hires steps", data.steps))
    return hires, tuple(keys)


def checked_hires(server: ServerState, target: HiresTarget, *, param: str, **settings) -> HiresParams:
    """A hires fix this server and model can run, or the 400 that says why not."""
    if server.variant.edit_method != "img2img":
        raise ApiError(
            400, f"The hires fix needs the turbo or base variant; this server runs {server.variant.name}.", param=param
        )
    max_width, max_height = max_sides(server)
    try:
        return hires_params(
            target,
            upscaler_exists=server.runner.upscalers.exists,
            max_width=max_width,
            max_height=max_height,
            max_pixels=server.settings.max_pixels,
            param=param,
            **settings,
        )
    except (HiresError, UpscalerError) as exc:
        raise ApiError(400, str(exc), param=exc.param) from None


# OpenAI's own default for these models was `url`; clients naming them (LibreChat's DALL-E 3 tool)
# read data[0].url. Every other request gets b64_json when it names none (the Vercel AI SDK
# sends nothing and requires b64_json).
URL_BY_DEFAULT = ("dall-e-2", "dall-e-3")


def response_format_for(data: GenerationRequest, server: ServerState) -> str:
    """b64_json or url, checked now so that no GPU time goes into images the answer could not carry."""
    chosen = data.response_format or ("url" if data.model in URL_BY_DEFAULT else "b64_json")
    if chosen == "url":
        if data.store is False:
            raise ApiError(
                400, "response_format 'url' links to the stored image: drop store=false, or ask for b64_json.",
                param="store",
            )  # fmt: skip
        if server.gallery is None:
            raise store_unavailable(server.gallery_error or "the image store is not open yet")
    return chosen
