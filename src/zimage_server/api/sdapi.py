"""The AUTOMATIC1111 API (/sdapi/v1), so SillyTavern, Open WebUI's A1111 engine and webuiapi scripts
work unchanged: txt2img, img2img, and the discovery routes those clients call before they generate.

A request is translated into the OpenAI routes' request structs and runs through their code:
the same checks, batcher, model, limits, errors and metrics; the hires fix is A1111's own
(a1111_hires). Fields A1111 has and this model cannot honour (face restoration, subseeds,
scripts, ...) are ignored, as are fields no
A1111 struct has (SillyTavern sends its own `url` and `auth`): unknown fields never fail a request.
docs/sdapi.md says what is honoured, and how.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from msgspec import Meta

from .. import __version__
from ..images import a1111_repaint_area
from ..lora_library import LORA_SUFFIX
from ..model_layout import checkpoint_sha256
from ..settings import Settings
from ..hires import a1111_target
from ..specs import GenerationSpec
from .control import CONTROL_PREPROCESSES, controlled_from_base64
from .edits import EditRequest, Strength, UploadDialect, edit_mode, prepare_edit
from .errors import ApiError
from .guards import require_json, require_ready
from .async_jobs import REPLAYS, accept_job, wants_async
from .jobs import JobHandle, submit_job
from .requests import MAX_SIDE, MIN_SIDE, checked_hires, generation_spec, served_model_ids
from .responses import (
    OutputOptions,
    encode_for_response,
    hires_infotext,
    keep_images,
    origin_of,
    request_parameters,
)
from .prompts import enhanced
from .sdapi_extras import EXTRAS_ROUTES, EXTRAS_UPLOAD_ROUTES
from .schemas import MAX_PROMPT_CHARS, MAX_SEED, EnhanceField, GenerationRequest, Guidance, Steps, Variation
from .state import ServerState, server_state
from .uploads import decode_base64_image

# Z-Image's scheduler is flow-matching Euler; there is no other sampler to choose.
SAMPLER = "Euler"
SCHEDULER = "automatic"  # the model's own sigma schedule
# A1111 sizes are multiples of 8, the model's of 16: a multiple of 8 is snapped down (520 -> 512).
A1111_SIZE_STEP, MODEL_SIZE_STEP = 8, 16
MAX_HIRES_SIDE = 8192  # hr_resize_x/_y's own bound; the server's pixel limit is checked after
A1111_DENOISING_STRENGTH = 0.75
SAME_CHECKPOINT = "Use same checkpoint"
HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # A1111 titles end in " [<short hash>]"
MAX_INIT_IMAGES = 16
OPTIONS_BODY_LIMIT = 1024 * 1024  # a whole options dict, as clients post it back

PromptText = Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)]
Side = Annotated[int, Meta(ge=MIN_SIDE, le=MAX_SIDE, description="Pixels, a multiple of 8; snapped down to 16.")]
A1111Seed = Annotated[int, Meta(ge=-1, le=MAX_SEED, description="Seed of the first image, -1 for random.")]
Count = Annotated[int, Meta(ge=1, le=1024)]


class Txt2ImgRequest(msgspec.Struct, kw_only=True):
    """POST /sdapi/v1/txt2img, as A1111's StableDiffusionTxt2ImgProcessingAPI; other fields are ignored.

    Images: batch_size x n_iter, image i with seed + i. Steps and cfg_scale run only with
    Z_IMAGE_SDAPI_SAMPLING=client; by default the model's recommended ones replace them."""

    prompt: PromptText = ""
    negative_prompt: PromptText = ""
    width: Side = 512
    height: Side = 512
    steps: Steps = 50
    cfg_scale: Guidance = 7.0
    seed: A1111Seed = -1
    batch_size: Count = 1
    n_iter: Count = 1
    # Accepted; the model has one sampler and one schedule.
    sampler_name: str | None = None
    scheduler: str | None = None
    # Only sd_model_checkpoint is read: it must name the served model.
    override_settings: dict[str, Any] | None = None
    send_images: bool = True
    save_images: bool = False  # accepted: the server keeps no image store
    # Only the ControlNet extension's units are read (control_unit); other scripts are ignored.
    alwayson_scripts: dict[str, Any] | None = None
    # The hires fix (a1111_hires). Clients send every field, nulls included (webuiapi), so each
    # takes null as its A1111 default; values are checked only when enable_hr asks for the fix
    # (as before it was served, a client's leftovers never fail a plain request).
    enable_hr: bool | None = False
    denoising_strength: float | None = A1111_DENOISING_STRENGTH  # null: the same
    hr_scale: float | None = None
    hr_upscaler: Annotated[str, Meta(max_length=256)] | None = None  # null: "Latent"; "None": Lanczos
    hr_second_pass_steps: int | None = None
    hr_resize_x: int | None = None
    hr_resize_y: int | None = None
    firstphase_width: int | None = None  # legacy: width/height are the target
    firstphase_height: int | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_cfg: float | None = None  # Forge; null: the first pass's guidance
    hr_checkpoint_name: Any = None  # "Use same checkpoint", null, or the served model
    # Accepted and ignored: one sampler, one schedule, no distilled guidance or extra modules here.
    hr_sampler_name: Any = None
    hr_scheduler: Any = None
    hr_distilled_cfg: Any = None
    hr_additional_modules: Any = None
    # Our extensions (A1111 has no such fields): the prompt enhancer and seed variation.
    enhance_prompt: EnhanceField | None = None
    variation_strength: Variation | None = None


class Img2ImgRequest(Txt2ImgRequest, kw_only=True):
    """POST /sdapi/v1/img2img: txt2img's fields plus the image to edit and an optional mask."""

    init_images: Annotated[list[str], Meta(max_length=MAX_INIT_IMAGES)] | None = None  # base64, data: prefix optional
    denoising_strength: Strength | None = A1111_DENOISING_STRENGTH  # null: the same
    mask: str | None = None  # base64; white (or opaque, with alpha) = repaint
    inpainting_mask_invert: Annotated[int, Meta(ge=0, le=1)] = 0
    mask_blur: Any = 4  # accepted and ignored (docs/sdapi.md)
    resize_mode: Any = 0  # accepted; the image is always scaled to cover the size and centre-cropped


class A1111ImagesResponse(msgspec.Struct, kw_only=True):
    images: list[str]  # base64 PNGs, no data: prefix
    parameters: dict[str, Any]  # the request as understood
    info: str  # a JSON object, as text


class CheckpointCard(msgspec.Struct, kw_only=True):
    title: str
    model_name: str
    hash: str
    sha256: str
    filename: str
    config: str | None = None


class ProgressState(msgspec.Struct, kw_only=True):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(msgspec.Struct, kw_only=True):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


A1111_UPLOADS = UploadDialect(
    "init_images", "mask", a1111_repaint_area, "white pixels (or opaque ones, in a mask with alpha) mark it"
)
A1111_INVERTED_UPLOADS = UploadDialect(
    "init_images",
    "mask",
    lambda mask: a1111_repaint_area(mask).point(lambda value: 255 - value),
    "with inpainting_mask_invert=1, black pixels (or transparent ones, in a mask with alpha) mark it",
)


# -- translation into the OpenAI routes' requests ---------------------------------------------


# Bounds of the hires fields, checked when enable_hr is on: (low, high).
HIRES_BOUNDS = {
    "hr_scale": (1, 8),
    "hr_second_pass_steps": (0, 200),
    "hr_resize_x": (0, MAX_HIRES_SIDE),
    "hr_resize_y": (0, MAX_HIRES_SIDE),
    "firstphase_width": (0, MAX_SIDE),
    "firstphase_height": (0, MAX_SIDE),
    "hr_cfg": (0, 30),
}


def check_hires_fields(data: Txt2ImgRequest) -> None:
    for name, (low, high) in HIRES_BOUNDS.items():
        value = getattr(data, name)
        if value is not None and not low <= value <= high:
            raise ApiError(400, f"Invalid {name} {value}: it must be {low}..{high}.", param=name)
    for name in ("hr_prompt", "hr_negative_prompt"):
        if len(getattr(data, name) or "") > MAX_PROMPT_CHARS:
            raise ApiError(400, f"'{name}' is longer than {MAX_PROMPT_CHARS} characters.", param=name)
    if bool(data.firstphase_width) != bool(data.firstphase_height):
        missing = "firstphase_height" if data.firstphase_width else "firstphase_width"
        raise ApiError(400, "Give both firstphase_width and firstphase_height, or neither.", param=missing)


def hires_on(data: Txt2ImgRequest) -> bool:
    """Whether the request asks for txt2img's hires fix (img2img ignores enable_hr, as A1111's does)."""
    return bool(data.enable_hr) and not isinstance(data, Img2ImgRequest)


def a1111_strength(data: Txt2ImgRequest) -> float:
    """denoising_strength, null read as A1111's default."""
    return A1111_DENOISING_STRENGTH if data.denoising_strength is None else data.denoising_strength


def first_pass_size(data: Txt2ImgRequest) -> tuple[int, int]:
    """The (first pass's) size as sent: width x height, or with the legacy firstphase fields those."""
    if hires_on(data) and data.firstphase_width:
        return data.firstphase_width, data.firstphase_height
    return data.width, data.height


def model_size(data: Txt2ImgRequest) -> str:
    """The size for the model, "WxH": multiples of 8 snapped down to 16; anything else is refused."""
    if hires_on(data):  # before its fields are read
        check_hires_fields(data)
    width, height = first_pass_size(data)
    for name, side in (("width", width), ("height", height)):
        if side % A1111_SIZE_STEP:
            raise ApiError(400, f"Invalid {name} {side}: sizes are multiples of {A1111_SIZE_STEP}.", param=name)
    width, height = (side - side % MODEL_SIZE_STEP for side in (width, height))
    return f"{width}x{height}"


def check_checkpoint(name: Any, server: ServerState, param: str = "sd_model_checkpoint") -> None:
    """A checkpoint a client names must be the served model: one model per process."""
    if name is None or (isinstance(name, str) and HASH_SUFFIX.sub("", name) in served_model_ids(server)):
        return
    raise ApiError(
        400,
        f"Checkpoint {name!r} is not served here: this server runs one model per process, "
        f"'{server.variant.model_name}'. Start another server for another model.",
        param=param,
        code="model_not_found",
    )


def openai_request(
    data: Txt2ImgRequest, server: ServerState, request_type: type[GenerationRequest] = GenerationRequest, **extra: Any
) -> GenerationRequest:
    """The A1111 body as the OpenAI routes' struct, so it is checked and run as theirs are."""
    n = data.batch_size * data.n_iter
    if n > server.settings.max_n:
        raise ApiError(
            400,
            f"batch_size x n_iter = {n} images: this server makes at most {server.settings.max_n} per request "
            "(Z_IMAGE_MAX_N).",
            param="batch_size",
        )
    check_checkpoint((data.override_settings or {}).get("sd_model_checkpoint"), server)
    # A1111 clients send their own defaults (cfg 7, 20-50 steps), which on a distilled model turn
    # CFG on (twice the compute) for more steps and worse images: by default the model's win.
    honour_client = server.settings.sdapi_sampling == "client"
    return request_type(
        prompt=data.prompt,
        n=n,
        size=model_size(data),
        seed=None if data.seed == -1 else data.seed,
        negative_prompt=data.negative_prompt or None,
        num_inference_steps=data.steps if honour_client else None,
        guidance_scale=data.cfg_scale if honour_client else None,
        variation_strength=data.variation_strength,
        **extra,
    )


def prepare_img2img(data: Img2ImgRequest, server: ServerState) -> GenerationSpec:
    """Decode and check the images as /v1/images/edits does, build the spec. Runs in a worker thread."""
    strength = a1111_strength(data)
    edit = openai_request(data, server, EditRequest, strength=strength)
    # An empty mask is no mask, as A1111 reads it.
    mode = edit_mode(server, len(data.init_images), bool(data.mask), A1111_UPLOADS)
    dialect = A1111_INVERTED_UPLOADS if data.inpainting_mask_invert else A1111_UPLOADS
    images = [decode_base64_image(text, "init_images") for text in data.init_images]
    mask = decode_base64_image(data.mask, "mask") if data.mask else None
    spec, _ = prepare_edit(edit, mode, images, mask, server, dialect)
    return spec


@dataclass(frozen=True)
class ControlUnit:
    """The one enabled unit of the A1111 ControlNet extension's request: its image (base64), module and weight."""

    image: str
    preprocess: str
    weight: float


CONTROLNET_API_VERSION = 2  # what webuiapi's ControlNetInterface reads from /controlnet/version


def control_unit(data: Txt2ImgRequest) -> ControlUnit | None:
    """`alwayson_scripts.controlnet.args[i]` as the extension (and webuiapi's ControlNetUnit) sends it."""
    scripts = {name.lower(): script for name, script in (data.alwayson_scripts or {}).items()}
    args = (scripts.get("controlnet") or {}).get("args") if isinstance(scripts.get("controlnet"), dict) else None
    units = []
    for unit in args if isinstance(args, list) else []:
        if not isinstance(unit, dict) or unit.get("enabled") is False:
            continue
        image = unit.get("image") or unit.get("input_image")
        if isinstance(image, dict):  # the extension's {"image": ..., "mask": ...} form
            image = image.get("image")
        if image:
            units.append((unit, image))
    if not units:
        return None
    if len(units) > 1:
        raise ApiError(
            400,
            f"{len(units)} ControlNet units are enabled; this server runs one ControlNet, send one.",
            param="alwayson_scripts",
        )
    unit, image = units[0]
    module = str(unit.get("module") or "none").lower()
    if module not in CONTROL_PREPROCESSES:  # the extension's module names for what this server runs
        raise ApiError(
            400,
            f"ControlNet module {module!r} is not available here; use one of "
            f"{', '.join(CONTROL_PREPROCESSES)} (send a ready-made control map with none).",
            param="alwayson_scripts",
        )
    weight = unit.get("weight", 1.0)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight <= 2:
        raise ApiError(400, f"ControlNet weight {weight!r} must be a number in 0..2.", param="alwayson_scripts")
    if not isinstance(image, str):
        raise ApiError(400, "The ControlNet unit's image must be base64 text.", param="alwayson_scripts")
    return ControlUnit(image, module, float(weight))


async def with_control(spec: GenerationSpec, unit: ControlUnit | None, server: ServerState) -> GenerationSpec:
    if unit is None:
        return spec
    return await controlled_from_base64(spec, server, unit.image, "alwayson_scripts", unit.preprocess, unit.weight)


# -- the answer ---------------------------------------------------------------------------------

A1111_OUTPUT = OutputOptions(output_format="png", compression=None)  # base64 PNGs, always


async def served_checkpoint_sha256(server: ServerState) -> str:
    """The served folder's hash, computed once when the model is loaded; before that (these discovery
    routes answer while a fetch-on-start runs) from the folder as it stands, and not kept."""
    if server.checkpoint_sha256 is not None:
        return server.checkpoint_sha256
    return await asyncio.to_thread(checkpoint_sha256, server.settings.model_dir)


def info_text(data: Txt2ImgRequest, spec: GenerationSpec, server: ServerState, sha256: str) -> str:
    """A1111's `info`: what ran, as a JSON string. After encoding, so the LoRA hashes are cached."""
    params, n = spec.params, spec.n
    info = {
        "prompt": data.prompt,
        "all_prompts": [spec.prompt_of(seed) for seed in spec.seeds],  # an enhanced prompt is what ran
        "negative_prompt": data.negative_prompt,
        "all_negative_prompts": [data.negative_prompt] * n,
        "seed": spec.seeds[0],
        "all_seeds": list(spec.seeds),
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": params.width,
        "height": params.height,
        "sampler_name": SAMPLER,
        "scheduler": SCHEDULER,
        "cfg_scale": params.guidance_scale,
        "steps": params.num_inference_steps,
        "batch_size": data.batch_size,
        "n_iter": data.n_iter,
        "denoising_strength": params.strength if params.hires is None else params.hires.strength,
        "sampling_policy": server.settings.sdapi_sampling,
        "restore_faces": False,
        "sd_model_name": server.variant.model_name,
        "sd_model_hash": sha256[:10],
        "sd_vae_name": None,
        "clip_skip": 1,
        "index_of_first_image": 0,
        "infotexts": [parameters.as_text() for parameters in request_parameters(server, spec)],
        "styles": [],
        "extra_generation_params": dict(hires_infotext(spec)),
        "version": f"zimage-server {__version__}",
    }
    return msgspec.json.encode(info).decode()


async def answer(
    request: Request, server: ServerState, kind: str, spec: GenerationSpec, data: Txt2ImgRequest
) -> A1111ImagesResponse | Response:
    """Run the request and answer A1111's way, or (Prefer: respond-async) accept it as a job."""
    if wants_async(request):
        return await accept_job(request, server, kind, msgspec.to_builtins(data) | {"seed": spec.seeds[0]}, spec)
    return await run_and_answer(request, server, spec, data)


async def run_and_answer(
    request: Request, server: ServerState, spec: GenerationSpec, data: Txt2ImgRequest
) -> A1111ImagesResponse:
    images = await submit_job(server, spec, request).result()
    encoded = await encode_for_response(server, spec, images, "png", None)
    # Kept whatever save_images says: A1111 clients leave it false (its default), and their images
    # would never reach the history otherwise.
    await keep_images(origin_of(request), server, spec, encoded, "png", A1111_OUTPUT)
    return A1111ImagesResponse(
        images=[base64.b64encode(blob).decode() for blob in encoded] if data.send_images else [],
        parameters=without_images(data),
        info=info_text(data, spec, server, await served_checkpoint_sha256(server)),
    )


# -- generation routes --------------------------------------------------------------------------


@post(
    "/txt2img",
    guards=[require_json, require_ready],
    status_code=200,
    summary="Create images from a prompt (AUTOMATIC1111 API).",
)
async def txt2img(request: Request, data: Txt2ImgRequest, state: State) -> A1111ImagesResponse | Response:
    server = server_state(state)
    return await answer(request, server, "txt2img", await prepare_txt2img(server, data), data)


async def prepare_txt2img(server: ServerState, data: Txt2ImgRequest) -> GenerationSpec:
    spec, _ = generation_spec(openai_request(data, server), server)
    spec = await with_control(a1111_hires(data, spec, server), control_unit(data), server)
    return await enhanced(server, spec, data.enhance_prompt)


def a1111_hires(data: Txt2ImgRequest, spec: GenerationSpec, server: ServerState) -> GenerationSpec:
    """txt2img's hires fix, as A1111's StableDiffusionProcessingTxt2Img runs it (docs/hires.md)."""
    if not data.enable_hr:
        return spec
    checkpoint = data.hr_checkpoint_name
    if checkpoint != SAME_CHECKPOINT:
        check_checkpoint(checkpoint, server, param="hr_checkpoint_name")
    width, height = first_pass_size(data)
    if data.firstphase_width or data.firstphase_height:  # legacy: the target is width x height
        resize_x, resize_y, scale = data.width, data.height, 1.0
    else:
        resize_x, resize_y, scale = data.hr_resize_x or 0, data.hr_resize_y or 0, data.hr_scale or 2.0
    target = a1111_target(width, height, scale=scale, resize_x=resize_x, resize_y=resize_y)
    # Null means Latent (A1111's default); the string "None" means a plain Lanczos resize.
    upscaler = "Latent" if data.hr_upscaler is None else data.hr_upscaler
    honour_client = server.settings.sdapi_sampling == "client"
    params = spec.params
    hires = checked_hires(
        server,
        target,
        upscaler=upscaler,
        steps=(data.hr_second_pass_steps if honour_client else 0) or params.num_inference_steps,
        strength=a1111_strength(data),
        guidance_scale=data.hr_cfg if honour_client and data.hr_cfg is not None else params.guidance_scale,
        param="enable_hr",
        params={
            "upscaler": "hr_upscaler",
            "strength": "denoising_strength",
            "size": "hr_resize_x" if resize_x or resize_y else "hr_scale",
        },
    )
    # As A1111 records them: its hr_scale is a float (2.0), its steps an int.
    described = [("Hires upscale", float(scale))] if not (resize_x or resize_y) else [("Hires resize", f"{resize_x}x{resize_y}")]
    if data.hr_second_pass_steps:
        described.append(("Hires steps", hires.steps))
    if data.hr_upscaler is not None:
        described.append(("Hires upscaler", upscaler))
    return dataclasses.replace(
        spec,
        params=dataclasses.replace(params, hires=hires),
        # Equal to the main ones is the main ones: an enhanced prompt then runs in both passes.
        hires_prompt=data.hr_prompt if data.hr_prompt and data.hr_prompt != data.prompt else None,
        hires_negative_prompt=(
            data.hr_negative_prompt
            if data.hr_negative_prompt and data.hr_negative_prompt != data.negative_prompt
            else None
        ),
        hires_described_as=tuple(described),
    )


async def replay_txt2img(server: ServerState, body: dict, _: dict) -> tuple[GenerationSpec, OutputOptions]:
    return await prepare_txt2img(server, msgspec.convert(body, Txt2ImgRequest)), A1111_OUTPUT


@post(
    "/img2img",
    guards=[require_json, require_ready],
    status_code=200,
    summary="Edit an image from a prompt, optionally within a mask (AUTOMATIC1111 API).",
)
async def img2img(request: Request, data: Img2ImgRequest, state: State) -> A1111ImagesResponse | Response:
    server = server_state(state)
    return await answer(request, server, "img2img", await prepare_img2img_request(server, data), data)


async def prepare_img2img_request(server: ServerState, data: Img2ImgRequest) -> GenerationSpec:
    if not data.init_images:
        raise ApiError(400, "'init_images' is required: the image to edit, base64.", param="init_images")
    # Decoding and resizing take a while for big photos: off the event loop.
    spec = await asyncio.to_thread(prepare_img2img, data, server)
    unit = control_unit(data)
    if unit is not None and spec.params.mode != "inpaint":
        raise ApiError(
            400,
            "A ControlNet unit on img2img needs a mask (ControlNet inpainting); use txt2img "
            "for a controlled image from a prompt.",
            param="alwayson_scripts",
        )
    return await enhanced(server, await with_control(spec, unit, server), data.enhance_prompt)


async def replay_img2img(server: ServerState, body: dict, _: dict) -> tuple[GenerationSpec, OutputOptions]:
    return await prepare_img2img_request(server, msgspec.convert(body, Img2ImgRequest)), A1111_OUTPUT


REPLAYS["txt2img"] = replay_txt2img
REPLAYS["img2img"] = replay_img2img


def without_images(data: Txt2ImgRequest) -> dict[str, Any]:
    """The request as understood, for `parameters`: as A1111 answers without include_init_images, the
    images sent (init images, mask, ControlNet images) are not echoed back."""
    if isinstance(data, Img2ImgRequest):
        data = msgspec.structs.replace(data, init_images=None, mask=None)
    return msgspec.to_builtins(msgspec.structs.replace(data, alwayson_scripts=None))


# -- discovery routes ---------------------------------------------------------------------------


@get("/options", summary="Settings A1111 clients read: the served checkpoint, the output format.")
async def get_options(state: State) -> dict[str, Any]:
    server = server_state(state)
    return {
        "sd_model_checkpoint": server.variant.model_name,
        "sd_checkpoint_hash": await served_checkpoint_sha256(server),
        "sd_vae": "Automatic",
        "CLIP_stop_at_last_layers": 1,
        "samples_format": "png",
        "samples_save": False,
        "sd_checkpoints_limit": 1,
        "eta_noise_seed_delta": 0,
    }


@post(
    "/options",
    guards=[require_json],
    request_max_body_size=OPTIONS_BODY_LIMIT,
    status_code=200,
    summary="Accepted; naming another checkpoint is a 400 (one model per process).",
)
async def set_options(data: dict[str, Any], state: State) -> None:
    # Clients post the whole options dict back to switch models: every other key is accepted.
    check_checkpoint(data.get("sd_model_checkpoint"), server_state(state))


@get("/sd-models", summary="The one checkpoint this server runs.")
async def sd_models(state: State) -> list[CheckpointCard]:
    server = server_state(state)
    sha256 = await served_checkpoint_sha256(server)
    name = server.variant.model_name
    return [
        CheckpointCard(
            title=name, model_name=name, hash=sha256[:10], sha256=sha256, filename=str(server.settings.model_dir)
        )
    ]


@get("/samplers", summary="The model's one sampler.")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": SAMPLER, "aliases": ["flow_match_euler"], "options": {}}]


@get("/schedulers", summary="The model's one schedule.")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": SCHEDULER, "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False}]


@get("/sd-vae", summary="None: the checkpoint's own VAE always runs.")
async def sd_vae() -> list[dict[str, Any]]:
    return []


@get("/scripts", summary="None: A1111 scripts and extensions are not served.")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@get("/loras", guards=[require_ready], summary="The LoRA folder's files; <lora:name:weight> prompt tags apply them.")
async def loras(state: State) -> list[dict[str, Any]]:
    server = server_state(state)
    return [
        {
            "name": info.name,
            "alias": info.name,
            "path": str(server.runner.lora_library.folder / f"{info.name}{LORA_SUFFIX}"),
            "metadata": {},
        }
        for info in await server.usable_loras()
    ]


@get("/progress", summary="The running model call's step, and how many requests are running or queued.")
async def progress(state: State) -> ProgressResponse:
    batcher = server_state(state).batcher
    running = batcher.running_jobs if batcher is not None else ()
    queued = batcher.queued_jobs if batcher is not None else 0
    # Every request of a call shares its steps: the first one that has reported speaks for the call.
    handles = [job.payload.observer for job in running if isinstance(job.payload.observer, JobHandle)]
    step, total = next(((h.step, h.total) for h in handles if h.total), (0, 0))
    fraction = step / total if total else 0.0
    eta = 0.0
    if step and running[0].started_at is not None:
        elapsed = time.monotonic() - running[0].started_at
        eta = elapsed * (total - step) / step
    return ProgressResponse(
        progress=fraction,
        eta_relative=eta,
        state=ProgressState(job_count=len(running) + queued, sampling_step=step, sampling_steps=total),
    )


@post(
    "/interrupt", status_code=200, summary="Accepted; stops nothing (a client that disconnects cancels its own work)."
)
async def interrupt() -> None:
    # A1111 has one user; here an interrupt from one client must not cancel others' jobs, and a
    # client's own request is already cancelled when it hangs up, which is what clients do next.
    return None


@post("/skip", status_code=200, summary="Accepted; skips nothing, as /interrupt.")
async def skip() -> None:
    return None


# -- the ControlNet extension's discovery routes ----------------------------------------------------


@get("/model_list", summary="The ControlNet loaded beside the model (Z_IMAGE_CONTROLNET), if any.")
async def controlnet_models(state: State) -> dict[str, list[str]]:
    path = server_state(state).settings.controlnet_path
    return {"model_list": [path.stem] if path is not None else []}


@get("/module_list", summary="The preprocessors a ControlNet unit may name.")
async def controlnet_modules() -> dict[str, list[str]]:
    return {"module_list": list(CONTROL_PREPROCESSES)}


@get("/version", summary="The ControlNet extension API version this server answers as.")
async def controlnet_version() -> dict[str, int]:
    return {"version": CONTROLNET_API_VERSION}


def sdapi_router(settings: Settings) -> Router:
    """Every /sdapi/v1 route; the generation routes' base64 images (init images, control images)
    are under this server's upload limit."""
    uploads = Router(
        path="/",
        route_handlers=[txt2img, img2img, *EXTRAS_UPLOAD_ROUTES],
        request_max_body_size=settings.max_upload_bytes,
    )
    return Router(
        path="/sdapi/v1",
        route_handlers=[
            uploads,
            get_options,
            set_options,
            sd_models,
            samplers,
            schedulers,
            *EXTRAS_ROUTES,
            sd_vae,
            scripts,
            loras,
            progress,
            interrupt,
            skip,
        ],
        tags=["AUTOMATIC1111"],
    )


def controlnet_router() -> Router:
    """/controlnet/*, as the A1111 ControlNet extension serves it (webuiapi's ControlNetInterface)."""
    return Router(
        path="/controlnet",
        route_handlers=[controlnet_models, controlnet_modules, controlnet_version],
        guards=[require_ready],
        tags=["AUTOMATIC1111"],
    )
