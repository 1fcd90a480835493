"""POST /v1/images/edits: the OpenAI multipart edit request, run as image-to-image, inpainting or Omni.

Multipart values arrive as strings ("2", "true", and "" for an omitted value). They are converted
into the generations struct plus `strength`, so every shared field is checked the same way. The
uploads are decoded off the event loop and refused before anything is queued; the response, the
batcher and the errors are the generations route's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.datastructures import FormMultiDict, State, UploadFile
from litestar.exceptions import ClientException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from msgspec import Meta
from PIL import Image

from ..images import edit_area, fit_size, fit_to, to_rgb
from ..settings import Settings
from ..specs import CallMode, GenerationSpec
from .errors import MISSING_FIELD, ApiError, ClientGoneError
from .guards import require_multipart, require_ready
from .async_jobs import REPLAYS, accept_job, check_async_fields, check_sync_fields, wants_async
from .jobs import submit_job
from .prompts import enhanced
from .requests import MIN_SIDE, generation_spec, max_sides
from .responses import OutputOptions, check_raw_image_count, images_response
from .schemas import GenerationRequest
from .state import ServerState, server_state
from .control import controlled
from .uploads import decode_part
from .streaming import EDIT_EVENTS, stream_images

MAX_INPUT_IMAGES = 16  # OpenAI's own limit for image[]
# The default, for img2img and inpainting alike: 40% of the input survives. OpenAI's edits
# repaint a masked area from scratch; clients that want that send strength=1.
DEFAULT_STRENGTH = 0.6
IMAGE_FIELDS = ("image", "image[]")
FILE_FIELDS = (*IMAGE_FIELDS, "mask", "control_image")


Strength = Annotated[float, Meta(gt=0, le=1, description="How much of the input to redraw, 0 < s <= 1.")]


class EditRequest(GenerationRequest, kw_only=True):
    """The form fields of POST /v1/images/edits: the generations fields plus `strength`."""

    strength: Strength | None = None
    input_fidelity: Any = None  # OpenAI's, accepted and ignored


async def read_form(request: Request, settings: Settings) -> FormMultiDict:
    """The parsed multipart body; Litestar stops reading (413) as soon as it passes the upload limit."""
    try:
        return await request.form()
    except RequestEntityTooLarge:
        raise ApiError(
            413,
            f"The request body exceeds this server's limit of {settings.max_upload_bytes} bytes "
            "(Z_IMAGE_MAX_UPLOAD_BYTES).",
            code="request_too_large",
        ) from None
    except ClientException as exc:
        raise ApiError(
            400, f"The body is not valid multipart/form-data ({exc.detail}).", code="invalid_multipart"
        ) from None
    except UnicodeDecodeError:
        # A part without a filename is a text field; binary data there is usually `-F image=<file` for `=@file`.
        raise ApiError(
            400,
            "A text field holds bytes that are not UTF-8: send images as file parts (curl -F image=@photo.png).",
            code="invalid_multipart",
        ) from None
    except InternalServerException as exc:
        # Litestar's word for a client that hung up mid-upload: nobody is left to answer, nothing to log.
        if "disconnected" in str(exc.detail):
            raise ClientGoneError() from None
        raise


def form_values(form: FormMultiDict) -> dict[str, str]:
    """The text fields, each sent at most once; empty strings mean omitted, as the OpenAI SDK sends them."""
    values: dict[str, str] = {}
    for name in dict.fromkeys(form.keys()):
        if name in FILE_FIELDS:
            continue
        texts = [value for value in form.getall(name) if isinstance(value, str)]
        if len(texts) > 1:
            raise ApiError(400, f"'{name}' was sent {len(texts)} times; send it once.", param=name)
        if texts and texts[0] != "":
            values[name] = texts[0]
    return values


# The structured fields: the same JSON the generations route takes, as text.
JSON_FIELDS = {
    "loras": """a list like [{"name": "pixel-art", "scale": 0.8}]""",
    "hires": """an object like {"scale": 1.5, "upscaler": "Lanczos"}""",
}


def parse_edit_request(values: dict[str, str]) -> EditRequest:
    for name, example in JSON_FIELDS.items():
        if name not in values:
            continue
        try:
            values = values | {name: msgspec.json.decode(values[name])}
        except msgspec.DecodeError:
            raise ApiError(
                400, f"'{name}' must be JSON text: {example}.", param=name, code="invalid_value"
            ) from None
    try:
        # strict=False converts the strings: "2" -> 2, "0.5" -> 0.5, "true"/"false" -> booleans.
        return msgspec.convert(values, EditRequest, strict=False)
    except msgspec.ValidationError as exc:
        detail = str(exc)
        if missing := MISSING_FIELD.search(detail):
            raise ApiError(400, f"'{missing.group(1)}' is required.", param=missing.group(1)) from None
        field = re.search(r"at `\$\.([^`]+)`", detail)
        param = field.group(1) if field else None
        reason = re.sub(r"(, got `[^`]+`)? - at `[^`]+`$", "", detail)
        raw = f" {values[param]!r}" if param in values else ""
        raise ApiError(400, f"Invalid value{raw} for '{param}': {reason}.", param=param, code="invalid_value") from None


def uploads(form: FormMultiDict) -> tuple[list[UploadFile], UploadFile | None, UploadFile | None]:
    """The image file parts (`image` or repeated `image[]`), the optional mask and control image."""
    images = [value for name in IMAGE_FIELDS for value in form.getall(name, [])]
    masks = [value for value in form.getall("mask", []) if value != ""]
    controls = [value for value in form.getall("control_image", []) if value != ""]
    if not images:
        raise ApiError(400, "'image' is required: attach the image to edit as a file part.", param="image")
    for name, parts in (("image", images), ("mask", masks), ("control_image", controls)):
        if any(not isinstance(part, UploadFile) for part in parts):
            message = f"'{name}' must be a file part (curl -F {name}=@file.png), not a text field."
            raise ApiError(400, message, param=name)
    if len(images) > MAX_INPUT_IMAGES:
        raise ApiError(400, f"At most {MAX_INPUT_IMAGES} images per edit; got {len(images)}.", param="image")
    for name, parts in (("mask", masks), ("control_image", controls)):
        if len(parts) > 1:
            raise ApiError(400, f"Send at most one '{name}'.", param=name)
    return images, masks[0] if masks else None, controls[0] if controls else None


@dataclass(frozen=True)
class UploadDialect:
    """How an API names its edit inputs and reads its masks; the checks on them are shared."""

    image_param: str
    mask_param: str
    repaint_area: Callable[[Image.Image], Image.Image]  # the mask as "L", 255 where the model may repaint
    mask_rule: str  # said when a mask marks nothing to repaint


OPENAI_UPLOADS = UploadDialect(
    "image",
    "mask",
    edit_area,
    "with an alpha channel, fully transparent pixels mark the area to edit; without one, white pixels do",
)


def edit_mode(
    server: ServerState, image_count: int, has_mask: bool, dialect: UploadDialect = OPENAI_UPLOADS
) -> CallMode:
    """Which pipeline runs this edit: the variant's Omni pipeline, else inpaint with a mask and img2img without."""
    variant = server.variant
    if has_mask and not variant.takes_mask:
        raise ApiError(
            400,
            f"{variant.model_name} does not take a mask: it edits the whole image as the prompt says. "
            "Masks work with the turbo and base variants.",
            param=dialect.mask_param,
        )
    if variant.edit_method == "omni":
        return "omni"
    if image_count > 1:
        raise ApiError(
            400,
            f"{variant.model_name} edits one image at a time; several reference images need the edit variant.",
            param=dialect.image_param,
        )
    return "inpaint" if has_mask else "img2img"


def image_digest(images: list[Image.Image]) -> str:
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def decode_mask(data: bytes, image: Image.Image, dialect: UploadDialect) -> Image.Image:
    """The mask's repaint area; refused unless it matches the image's size and marks something."""
    mask = decode_part(data, dialect.mask_param)
    if mask.size != image.size:
        raise ApiError(
            400,
            f"The mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}: they must match.",
            param=dialect.mask_param,
        )
    area = dialect.repaint_area(mask)
    if area.getextrema()[1] == 0:
        raise ApiError(400, f"The mask marks nothing to edit: {dialect.mask_rule}.", param=dialect.mask_param)
    return area


def prepare_edit(
    data: EditRequest,
    mode: CallMode,
    image_bytes: list[bytes],
    mask_bytes: bytes | None,
    server: ServerState,
    dialect: UploadDialect = OPENAI_UPLOADS,
) -> tuple[GenerationSpec, OutputOptions]:
    """Decode and check the uploads, resolve the size, build the spec. Runs in a worker thread."""
    settings = server.settings
    max_side = min(max_sides(server))

    def fitted(size: tuple[int, int]) -> tuple[int, int]:
        return fit_size(*size, max_pixels=settings.max_pixels, max_side=max_side, min_side=MIN_SIDE)

    first = decode_part(image_bytes[0], dialect.image_param)
    mask = decode_mask(mask_bytes, first, dialect) if mask_bytes is not None else None
    if mode == "omni":

        def reference(image: Image.Image) -> Image.Image:
            rgb = to_rgb(image)
            return fit_to(rgb, fitted(rgb.size))

        # References keep their own aspect. The generator decodes and shrinks one at a time, so at
        # most one full-size upload is in memory. Omni shares its references across a call, so
        # only edits of identical images batch together: their digest joins the call parameters.
        images = (
            reference(first),
            *(reference(decode_part(blob, dialect.image_param)) for blob in image_bytes[1:]),
        )
        base, options = generation_spec(
            data, server, mode=mode, default_size=fitted(first.size), references_digest=image_digest(list(images))
        )
        return dataclasses.replace(base, images=images, uploads=tuple(image_bytes)), options
    strength = DEFAULT_STRENGTH if data.strength is None else data.strength
    base, options = generation_spec(data, server, mode=mode, default_size=fitted(first.size), strength=strength)
    size = (base.params.width, base.params.height)
    fitted_mask = fit_to(mask, size, nearest=True) if mask is not None else None
    spec = dataclasses.replace(base, images=(fit_to(to_rgb(first), size),), mask=fitted_mask, uploads=(image_bytes[0],))
    return spec, options


@post(
    "/v1/images/edits",
    guards=[require_multipart, require_ready],
    status_code=200,
    summary="Edit an image from a prompt, optionally within a mask (OpenAI Images API, multipart).",
)
async def create_edit(request: Request, state: State) -> Response:
    server = server_state(state)
    form = await read_form(request, server.settings)
    try:
        values = form_values(form)
        data = parse_edit_request(values)
        image_parts, mask_part, control_part = uploads(form)
        edit_mode(server, len(image_parts), mask_part is not None)  # before reading the uploads
        if not wants_async(request):
            check_sync_fields(data.webhook_url)
            check_raw_image_count(request, data.n)
        image_bytes = [await part.read() for part in image_parts]
        mask_bytes = await mask_part.read() if mask_part is not None else None
        control_bytes = await control_part.read() if control_part is not None else None
    finally:
        await form.close()
    files = {"image": image_bytes, "mask": [mask_bytes] if mask_bytes else [],
             "control_image": [control_bytes] if control_bytes else []}  # fmt: skip
    spec, options = await prepare_edit_request(server, values, files)
    if wants_async(request):
        check_async_fields(data.stream, data.store)
        body = values | {"seed": str(spec.seeds[0])}
        return await accept_job(request, server, "edits", body, spec, files, webhook_url=data.webhook_url)
    if data.stream:
        return stream_images(
            server, spec, options, partial_images=data.partial_images or 0, events=EDIT_EVENTS, request=request
        )
    images = await submit_job(server, spec, request).result()
    return await images_response(request, server, spec, options, images)


async def prepare_edit_request(
    server: ServerState, values: dict[str, str], files: dict[str, list[bytes]]
) -> tuple[GenerationSpec, OutputOptions]:
    """The spec an edit runs, from its form fields and uploads: for the route and for its async job."""
    data = parse_edit_request(values)
    masks, controls = files.get("mask") or [], files.get("control_image") or []
    mode = edit_mode(server, len(files["image"]), bool(masks))
    if controls and mode != "inpaint":
        raise ApiError(
            400,
            "A control image on an edit needs a mask (ControlNet inpainting); for a controlled image "
            "from a prompt, send control_image to /v1/images/generations.",
            param="control_image",
        )
    # Decoding and resizing take a while for big photos: off the event loop.
    spec, options = await asyncio.to_thread(
        prepare_edit, data, mode, files["image"], masks[0] if masks else None, server
    )
    if controls:
        spec = await asyncio.to_thread(
            controlled, spec, server, controls[0], data.control_preprocess or "none", data.control_scale
        )
    return await enhanced(server, spec, data.enhance_prompt), options


REPLAYS["edits"] = prepare_edit_request
