"""Request and response structs: the OpenAI Images API shape plus Z-Image's own top-level fields.

msgspec validates these before a handler runs; limits that depend on settings or on the loaded
model (n, size) are checked in `requests.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

# JavaScript clients (the browser page, the JS SDK) read JSON numbers as doubles.
MAX_SEED = 2**53 - 1
MAX_PROMPT_CHARS = 32_000  # OpenAI's own limit for image prompts.

Prompt = Annotated[str, Meta(max_length=MAX_PROMPT_CHARS, description="What to draw (required, non-empty).")]
Seed = Annotated[int, Meta(ge=0, le=MAX_SEED, description="Seed of the first image; image i uses seed + i.")]
Steps = Annotated[int, Meta(ge=1, le=200, description="Denoising steps (default: turbo 8, base 50).")]
Guidance = Annotated[float, Meta(ge=0, le=30, description="Classifier-free guidance (default: turbo 0, base 4).")]
StreamFlag = Annotated[bool, Meta(description="Answer with server-sent events: progress, previews, then the images.")]
PartialImages = Annotated[int, Meta(ge=0, le=3, description="Previews per image while streaming, 0-3 (default 0).")]
Compression = Annotated[int, Meta(ge=0, le=100, description="JPEG/WebP quality, 0-100 (default 90).")]


class LoraRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One LoRA to apply: its name in the LoRA folder (GET /v1/loras) and how strongly."""

    name: Annotated[str, Meta(min_length=1, max_length=512)]
    scale: Annotated[float, Meta(ge=-4, le=4)] = 1.0


Loras = Annotated[
    list[LoraRequest],
    Meta(max_length=64, description="LoRAs to apply, [{name, scale}]; prompt tags <lora:name:scale> add to these."),
]


class HiresRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A hires fix: the image made at `size`, upscaled, then refined by a second img2img pass."""

    scale: Annotated[float, Meta(ge=1, le=4, description="Times the first pass's size (default 1.5).")] | None = None
    width: Annotated[int, Meta(ge=64, le=4096, description="Target width, a multiple of 16 (with height).")] | None = None
    height: Annotated[int, Meta(ge=64, le=4096, description="Target height, a multiple of 16 (with width).")] | None = None
    upscaler: (
        Annotated[
            str,
            Meta(max_length=256, description="Latent, Latent (bicubic), ..., Lanczos (default), Nearest, or an "
                 "upscaler model's name (GET /sdapi/v1/upscalers)."),
        ]
        | None
    ) = None  # fmt: skip
    steps: Annotated[int, Meta(ge=1, le=200, description="Second pass steps (default: the first pass's).")] | None = None
    denoising_strength: (
        Annotated[float, Meta(gt=0, le=1, description="How much the second pass repaints, 0..1 (default 0.4).")] | None
    ) = None
    guidance_scale: Guidance | None = None


# What enhance_prompt takes: true (one expansion for every image), "per_image" (one each, sampled
# with the image's seed), or false; api/prompts.py runs it.
EnhanceField = Annotated[
    bool | Literal["per_image"],
    Meta(description='Expand the prompt with the server\'s LLM first: true, "per_image" or false (default: the server\'s).'),
]


Variation = Annotated[
    float, Meta(ge=0, le=1, description="Seed variation: noise from each image's seed on its prompt, 0..1 (default 0).")
]


class GenerationRequest(msgspec.Struct, kw_only=True):
    """POST /v1/images/generations. Unknown fields are ignored, as OpenAI clients send extras."""

    prompt: Prompt
    model: str | None = None
    n: Annotated[int, Meta(ge=1, description="Images to generate (1..Z_IMAGE_MAX_N).")] = 1
    size: Annotated[str, Meta(max_length=32, description="WxH, multiples of 16, or auto (1024x1024).")] | None = None
    response_format: Literal["b64_json", "url"] | None = None
    store: Annotated[bool, Meta(description="Keep the images in the server's store (default true).")] | None = None
    webhook_url: (
        Annotated[
            str, Meta(max_length=2048, description="With Prefer: respond-async, called when the job finishes.")
        ]
        | None
    ) = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    output_compression: Compression | None = None
    # OpenAI fields we accept and cannot honour.
    quality: Any = None
    style: Any = None
    background: Any = None
    moderation: Any = None
    user: Any = None
    stream: StreamFlag | None = None
    partial_images: PartialImages | None = None
    # Z-Image extras.
    seed: Seed | None = None
    negative_prompt: Annotated[str, Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    num_inference_steps: Steps | None = None
    guidance_scale: Guidance | None = None
    cfg_normalization: bool | None = None
    cfg_truncation: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_sequence_length: Annotated[int, Meta(ge=16, le=512)] | None = None
    loras: Loras | None = None
    # ControlNet (a server started with Z_IMAGE_CONTROLNET); on edits control_image is a file part.
    control_image: (
        Annotated[
            str,
            Meta(
                description="A control map (pose, depth, edges, lines) or, with control_preprocess, a photo: "
                "base64 or a data: URL."
            ),
        ]
        | None
    ) = None
    control_scale: (
        Annotated[float, Meta(ge=0, le=2, description="How strongly it steers, 0..2 (default 0.75).")] | None
    ) = None
    control_preprocess: Literal["none", "canny"] | None = None
    hires: HiresRequest | None = None
    variation_strength: Variation | None = None
    enhance_prompt: EnhanceField | None = None


class LoraCard(msgspec.Struct, kw_only=True):
    name: str  # what requests send
    size_bytes: int
    rank: int
    modules: list[str]  # the kinds of module it changes, e.g. attention.to_q
    sha256: str  # the file's SHA-256, first 12 hex digits (A1111's "Lora hashes" short hash)
    object: str = "lora"


class LoraList(msgspec.Struct, kw_only=True):
    data: list[LoraCard]
    object: str = "list"


class ImageData(msgspec.Struct, kw_only=True):
    """One image of a response: `b64_json` or a signed `url` (with `expires_at`), as response_format asked;
    `id` names it in the store (GET /v1/images/{id}) when it was kept."""

    b64_json: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    expires_at: int | UnsetType = UNSET
    id: str | UnsetType = UNSET
    seed: int
    revised_prompt: str | None = None  # the prompt enhancer's expansion it was made from


class ImagesResponse(msgspec.Struct, kw_only=True):
    created: int
    data: list[ImageData]
    output_format: str
    size: str


class ModelDefaults(msgspec.Struct, kw_only=True):
    """What a request gets for the fields it leaves out (our extension of OpenAI's model object)."""

    num_inference_steps: int
    guidance_scale: float
    takes_mask: bool  # whether /v1/images/edits accepts a mask


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int
    defaults: ModelDefaults
    object: str = "model"
    owned_by: str = "zimage-server"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct, kw_only=True, omit_defaults=True):
    error: ErrorDetail
    # The message again, on /sdapi routes only: AUTOMATIC1111 clients read `detail`, as FastAPI sends it.
    detail: str | None = None


# Server-sent events of `stream: true` (api/streaming.py); `type` repeats the event name, as OpenAI's do.


class ProgressEvent(msgspec.Struct, kw_only=True):
    """Our extension: after every denoising step of the running pass."""

    type: str
    created_at: int
    step: int
    total: int
    progress: float  # of the whole request, 0..1
    image_indices: list[int]  # the images the running pass covers


class CompletedEvent(msgspec.Struct, kw_only=True):
    """A final image (`<kind>.completed`); previews add their own index (`<kind>.partial_image`)."""

    type: str
    created_at: int
    b64_json: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    expires_at: int | UnsetType = UNSET
    id: str | UnsetType = UNSET
    index: int
    seed: int
    size: str
    output_format: str
    quality: str = "auto"
    background: str = "opaque"


class PartialImageEvent(CompletedEvent, kw_only=True):
    partial_image_index: int


class ErrorEvent(msgspec.Struct, kw_only=True):
    error: ErrorDetail
    type: str = "error"


# The image store's routes (api/history.py).


class StoredImage(msgspec.Struct, kw_only=True):
    """A kept image's record, with a fresh signed link."""

    id: str
    created_at: int
    owner: str
    route: str
    request_id: str
    prompt: str
    negative_prompt: str | None
    parameters: dict[str, Any]
    model: str
    checkpoint_sha256: str | None
    output_format: str
    bytes: int
    url: str
    expires_at: int
    object: str = "image"


class StoredImageList(msgspec.Struct, kw_only=True):
    data: list[StoredImage]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: str = "list"


class DeletedImage(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool = True
    object: str = "image"
