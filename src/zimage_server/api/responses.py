"""Turning a finished job's images into what the client asked for: JSON with base64 data or signed
links, or raw bytes; and handing them to the gallery to keep.

Shared by the generations and edits routes, their event streams and the A1111 routes.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from dataclasses import dataclass

from litestar import Request, Response
from PIL import Image

from ..content_credentials import SigningError
from ..gallery import GalleryUnavailable, NewImages
from ..images import FORMAT_FOR_MEDIA_TYPE, MEDIA_TYPES, ImageParameters, encode_images
from ..index import ImageRecord
from ..provenance import xmp_packet
from ..specs import GenerationSpec
from .auth import principal_of
from .errors import ApiError
from .links import image_link
from .observability import request_id_of
from .schemas import ImageData, ImagesResponse
from .state import ServerState

INLINE_ENCODE_MAX_PIXELS = 128 * 128  # responses this small encode on the event loop


@dataclass(frozen=True)
class OutputOptions:
    output_format: str
    compression: int | None
    response_format: str = "b64_json"  # or "url": a signed link to the stored image
    store: bool = True  # keep the images (when the server has a store)


def wants_raw_image(request: Request) -> str | None:
    """The image media type the client asked for with Accept, if it prefers one over JSON."""
    accept = request.headers.get("accept", "")
    if not accept or "image/" not in accept:
        return None
    best = request.accept.best_match(["application/json", *MEDIA_TYPES.values()], default="application/json")
    return best if best in FORMAT_FOR_MEDIA_TYPE else None


def check_raw_image_count(request: Request, n: int) -> None:
    if wants_raw_image(request) and n > 1:
        raise ApiError(400, "A raw image response holds one image: send n=1, or Accept: application/json.", param="n")


def image_parameters(
    server: ServerState, spec: GenerationSpec, seed: int, lora_hashes: dict[str, str]
) -> ImageParameters:
    params = spec.params
    revised = spec.revised_prompt_of(seed)
    return ImageParameters(
        prompt=spec.prompt_of(seed),
        negative_prompt=spec.negative_prompt,
        steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        seed=seed,
        width=params.width,
        height=params.height,
        variant=server.variant.name,
        strength=params.strength if params.hires is None else params.hires.strength,
        loras=tuple((name, scale, lora_hashes[name]) for name, scale in params.loras),
        extra=hires_infotext(spec)
        + ((("Variation strength", f"{params.variation_strength:g}"),) if params.variation_strength else ())
        + ((("Original prompt", spec.prompt),) if revised is not None else ()),
    )


def hires_infotext(spec: GenerationSpec) -> tuple[tuple[str, str | int | float], ...]:
    """A1111's hires keys, after Denoising strength: how the target was asked for (the adapter's
    words), Hires steps (only when not zero), Hires upscaler, and Hires prompt when it differs."""
    hires = spec.params.hires
    if hires is None:
        return ()
    keys = list(spec.hires_described_as)
    if spec.hires_prompt and spec.hires_prompt != spec.prompt:
        keys.append(("Hires prompt", spec.hires_prompt))
    if spec.hires_negative_prompt and spec.hires_negative_prompt != spec.negative_prompt:
        keys.append(("Hires negative prompt", spec.hires_negative_prompt))
    return tuple(keys)


def lora_hashes(server: ServerState, spec: GenerationSpec) -> dict[str, str]:
    """Short hashes of the request's LoRA files, for the PNG parameters (cached by file identity)."""
    library = server.runner.lora_library
    return {name: library.info(name).sha256_short for name, _ in spec.params.loras}


def request_parameters(server: ServerState, spec: GenerationSpec) -> list[ImageParameters]:
    """What made each image of the request, as its PNG parameters chunk says. Reads the LoRA files'
    hashes (once per file, then cached): not on the event loop the first time."""
    hashes = lora_hashes(server, spec)
    return [image_parameters(server, spec, seed, hashes) for seed in spec.seeds]


async def encode_for_response(
    server: ServerState, spec: GenerationSpec, images: list[Image.Image], output_format: str, compression: int | None
) -> list[bytes]:
    """One request's images, encoded, each with its own seed in the PNG parameters chunk.

    Off the event loop, except for small images: a 64x64 PNG encodes faster than a round trip to a
    worker thread (the A/B is in docs/benchmarks.md, benchmark 1)."""

    model_name = server.variant.model_name
    xmp = xmp_packet(spec.params.mode, model_name) if server.settings.provenance == "on" else None
    credentials = server.credentials
    finish = None
    if credentials is not None:

        def finish(blob: bytes) -> bytes:
            try:
                return sign(blob)
            except SigningError as exc:
                raise ApiError(502, f"Signing the image's Content Credentials failed: {exc}", code="signing_failed")

        def sign(blob: bytes) -> bytes:
            return credentials.sign(
                blob,
                output_format,
                mode=spec.params.mode,
                model_name=model_name,
                prompt=spec.prompt,
                uploads=spec.uploads,
            )

    def encode_all() -> list[bytes]:
        return encode_images(images, request_parameters(server, spec), output_format, compression, xmp, finish)

    width, height = spec.params.output_size
    small = width * height * len(images) <= INLINE_ENCODE_MAX_PIXELS
    if small and not spec.params.loras and credentials is None:
        return encode_all()
    return await asyncio.to_thread(encode_all)


def stored_parameters(spec: GenerationSpec, parameters: ImageParameters) -> dict:
    """Every generation parameter of one image, as its index row keeps it ("use these settings")."""
    params = spec.params
    image_width, image_height = params.output_size
    return {
        "mode": params.mode,
        "width": params.width,
        "height": params.height,
        "image_width": image_width,
        "image_height": image_height,
        "revised_prompt": spec.revised_prompt_of(parameters.seed),
        "seed": parameters.seed,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "cfg_normalization": params.cfg_normalization,
        "cfg_truncation": params.cfg_truncation,
        "max_sequence_length": params.max_sequence_length,
        "strength": params.strength,
        "loras": [{"name": name, "scale": scale, "sha256": digest} for name, scale, digest in parameters.loras],
        "control_scale": params.control_scale,
        "variation_strength": params.variation_strength,
        "hires": dataclasses.asdict(params.hires) if params.hires else None,
        "hires_prompt": spec.hires_prompt,
        "hires_negative_prompt": spec.hires_negative_prompt,
        "infotext": parameters.as_text(),
    }


@dataclass(frozen=True)
class Origin:
    """Who asked for images, and through which route and request: what their records say."""

    owner: str
    route: str
    request_id: str


def origin_of(request: Request) -> Origin:
    return Origin(principal_of(request).name, request.scope["path"], request_id_of(request.scope) or "")


async def keep_images(
    origin: Origin,
    server: ServerState,
    spec: GenerationSpec,
    encoded: list[bytes],
    output_format: str,
    options: OutputOptions,
    *,
    wait: bool = False,
) -> list[ImageRecord] | None:
    """Hand the images to the gallery; None when they are not kept (store: false, or no store).

    A `url` answer (or `wait`) waits until the images are kept (503 if they cannot be); any other
    answer leaves while they are written: a store that fails never costs a client its images."""
    gallery = server.gallery
    if not options.store or gallery is None:
        return None
    records, written = gallery.keep(
        NewImages(
            owner=origin.owner,
            route=origin.route,
            request_id=origin.request_id,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            parameters=[stored_parameters(spec, p) for p in request_parameters(server, spec)],
            model=server.variant.model_name,
            checkpoint_sha256=server.checkpoint_sha256,
            format=output_format,
            blobs=encoded,
        )
    )
    if options.response_format == "url" or wait:
        try:
            await asyncio.shield(written)  # a client that leaves does not stop the write
        except GalleryUnavailable as exc:
            raise store_unavailable(str(exc)) from None
    return records


def store_unavailable(reason: str) -> ApiError:
    return ApiError(
        503,
        f"response_format 'url' needs the image store, and {reason}; ask for b64_json instead.",
        param="response_format",
        code="store_unavailable",
    )


def image_items(
    request: Request,
    server: ServerState,
    spec: GenerationSpec,
    encoded: list[bytes],
    records: list[ImageRecord] | None,
    response_format: str,
) -> list[ImageData]:
    items = []
    for i, (blob, seed) in enumerate(zip(encoded, spec.seeds, strict=True)):
        item = ImageData(seed=seed, revised_prompt=spec.revised_prompt_of(seed))
        if records is not None:
            item.id = records[i].id
        if response_format == "url" and records is not None:
            item.url, item.expires_at = image_link(request, server, records[i])
        else:
            item.b64_json = base64.b64encode(blob).decode()
        items.append(item)
    return items


async def images_response(
    request: Request, server: ServerState, spec: GenerationSpec, options: OutputOptions, images: list
) -> Response:
    """Encode the images (off the event loop), keep them, and answer with JSON (b64 data or links), or
    with raw bytes when Accept asks for that."""
    raw_type = wants_raw_image(request)
    output_format = FORMAT_FOR_MEDIA_TYPE[raw_type] if raw_type else options.output_format

    encoded = await encode_for_response(server, spec, images, output_format, options.compression)
    records = await keep_images(origin_of(request), server, spec, encoded, output_format, options)
    if raw_type:
        headers = {"X-Seed": str(spec.seeds[0])}
        if records is not None:
            headers["X-Image-Id"] = records[0].id
        return Response(encoded[0], media_type=raw_type, headers=headers)
    body = ImagesResponse(
        created=int(time.time()),
        data=image_items(request, server, spec, encoded, records, options.response_format),
        output_format=output_format,
        size="{}x{}".format(*spec.params.output_size),
    )
    return Response(body)
