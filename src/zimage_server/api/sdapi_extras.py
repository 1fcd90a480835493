"""A1111's upscaling routes: what upscalers there are, and its "Extras" tab over the API
(/sdapi/v1/extra-single-image, /extra-batch-images), on the runner's upscaler library.

The upscaling itself (A1111's resize modes, the second upscaler blended in, models in tiles) is
upscalers.py's, on the model's thread and under its lock; this module decodes, checks, encodes.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any

import msgspec
from litestar import get, post
from litestar.datastructures import State
from msgspec import Meta
from PIL import Image

from ..hires import LATENT_MODES, UpscaleTooLarge, UpscalerError
from ..images import encode_image
from ..model_thread import model_thread
from .errors import ApiError
from .guards import require_json, require_ready
from .state import ServerState, server_state
from .uploads import decode_base64_image, decode_part

BUILTIN_SCALE = 4  # what A1111 lists for its non-model upscalers
MAX_BATCH_IMAGES = 16
FACE_RESTORATION = ("gfpgan_visibility", "codeformer_visibility")
UpscalerName = Annotated[str, Meta(max_length=256)]


class ExtrasRequest(msgspec.Struct, kw_only=True):
    """A1111's ExtrasBaseRequest: how to upscale. Other fields (show_extras_results, upscale_first,
    codeformer_weight) are accepted and change nothing here."""

    resize_mode: Annotated[int, Meta(ge=0, le=1)] = 0
    upscaling_resize: Annotated[float, Meta(gt=0, le=8)] = 2.0
    upscaling_resize_w: Annotated[int, Meta(ge=1, le=8192)] = 512
    upscaling_resize_h: Annotated[int, Meta(ge=1, le=8192)] = 512
    upscaling_crop: bool = True
    upscaler_1: UpscalerName | None = "None"
    upscaler_2: UpscalerName | None = "None"
    extras_upscaler_2_visibility: Annotated[float, Meta(ge=0, le=1)] = 0.0
    gfpgan_visibility: float = 0.0
    codeformer_visibility: float = 0.0
    codeformer_weight: Any = None
    show_extras_results: Any = None
    upscale_first: Any = None


class ExtraSingleImageRequest(ExtrasRequest, kw_only=True):
    image: str  # base64, data: prefix optional


class BatchImage(msgspec.Struct, kw_only=True):
    data: str
    name: str | None = None


class ExtraBatchImagesRequest(ExtrasRequest, kw_only=True):
    imageList: Annotated[list[BatchImage], Meta(min_length=1, max_length=MAX_BATCH_IMAGES)]  # noqa: N815 - A1111's name


class ExtraSingleImageResponse(msgspec.Struct, kw_only=True):
    html_info: str
    image: str


class ExtraBatchImagesResponse(msgspec.Struct, kw_only=True):
    html_info: str
    images: list[str]


@get("/upscalers", guards=[require_ready], summary="None, Lanczos, Nearest and every model in the upscaler folder.")
async def upscalers(state: State) -> list[dict[str, Any]]:
    library = server_state(state).runner.upscalers
    # Files read before answer at once, even while the model works; reading a new file's
    # architecture and scale loads it: on the model's thread, after what it is doing.
    cards = await asyncio.to_thread(library.list_upscalers, read_new=False)
    if cards is None:
        cards = await model_thread().run(library.list_upscalers)
    return [
        {
            "name": card.name,
            "model_name": card.architecture,
            "model_path": str(card.path) if card.path is not None else None,
            "model_url": None,
            "scale": card.scale or BUILTIN_SCALE,
        }
        for card in cards
    ]


@get("/latent-upscale-modes", summary="The hires fix's latent modes, with A1111's names.")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_MODES]


def decoded(text: str, param: str) -> Image.Image:
    """A base64 upload, decoded and checked: in a worker thread (megabytes of base64, then the image)."""
    return decode_part(decode_base64_image(text, param), param)


def check_extras(data: ExtrasRequest) -> None:
    for name in FACE_RESTORATION:
        if getattr(data, name):
            raise ApiError(400, f"'{name}' must be 0: face restoration is not served here.", param=name)


async def upscaled(server: ServerState, image: Image.Image, data: ExtrasRequest) -> bytes:
    try:
        result = await model_thread().run(
            server.runner.upscalers.extras_upscale,
            image,
            resize_mode=data.resize_mode,
            upscaling_resize=data.upscaling_resize,
            upscaling_resize_w=data.upscaling_resize_w,
            upscaling_resize_h=data.upscaling_resize_h,
            upscaling_crop=data.upscaling_crop,
            upscaler_1=data.upscaler_1,
            upscaler_2=data.upscaler_2,
            extras_upscaler_2_visibility=data.extras_upscaler_2_visibility,
        )
    except UpscalerError as exc:
        raise ApiError(400, str(exc), param=extras_param(exc, data)) from None
    # PNG encoding (Pillow's fallback takes 100-650 ms at 2048 px) stays off the event loop.
    return await asyncio.to_thread(encode_image, result, "png", None, parameters=None)


def extras_param(exc: UpscalerError, data: ExtrasRequest) -> str:
    """The field an extras error is about: the upscaler named (by name, or by its file), or the size."""
    if isinstance(exc, UpscaleTooLarge):
        return "upscaling_resize" if data.resize_mode == 0 else "upscaling_resize_w"
    failed = getattr(exc, "name", None) or getattr(getattr(exc, "path", None), "stem", None)
    return "upscaler_2" if failed is not None and failed == data.upscaler_2 != data.upscaler_1 else "upscaler_1"


def html_info(data: ExtrasRequest) -> str:
    """What A1111's extras report: how the image was upscaled."""
    how = (
        f"Postprocess upscale by: {data.upscaling_resize:g}"
        if data.resize_mode == 0
        else f"Postprocess upscale to: {data.upscaling_resize_w}x{data.upscaling_resize_h}"
    )
    parts = [how, f"Postprocess upscaler: {data.upscaler_1}"]
    if data.upscaler_2 not in (None, "None") and data.extras_upscaler_2_visibility > 0:
        parts += [f"Postprocess upscaler 2: {data.upscaler_2}", f"Postprocess upscaler 2 visibility: {data.extras_upscaler_2_visibility:g}"]
    return "<p>" + ", ".join(parts) + "</p>"


@post("/extra-single-image", guards=[require_json, require_ready], status_code=200,
      summary="Upscale one image (A1111's Extras tab).")  # fmt: skip
async def extra_single_image(data: ExtraSingleImageRequest, state: State) -> ExtraSingleImageResponse:
    check_extras(data)
    image = await asyncio.to_thread(decoded, data.image, "image")
    blob = await upscaled(server_state(state), image, data)
    return ExtraSingleImageResponse(html_info=html_info(data), image=base64.b64encode(blob).decode())


@post("/extra-batch-images", guards=[require_json, require_ready], status_code=200,
      summary="Upscale several images alike (A1111's Extras tab, batch).")  # fmt: skip
async def extra_batch_images(data: ExtraBatchImagesRequest, state: State) -> ExtraBatchImagesResponse:
    check_extras(data)
    server = server_state(state)
    images = [await asyncio.to_thread(decoded, item.data, "imageList") for item in data.imageList]
    blobs = [await upscaled(server, image, data) for image in images]
    return ExtraBatchImagesResponse(html_info=html_info(data), images=[base64.b64encode(b).decode() for b in blobs])


EXTRAS_ROUTES = [upscalers, latent_upscale_modes]
EXTRAS_UPLOAD_ROUTES = [extra_single_image, extra_batch_images]
