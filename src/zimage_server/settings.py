"""One frozen settings object, read from env vars and CLI flags and validated before anything loads.

Each setting is declared once, as a field of `Settings`: its type and default, and in its
`setting(...)` annotation its env var, help text, constraints (msgspec's own `Meta`) and whether it
is secret. The CLI builds its flags from those fields (`zimage-server serve --help` prints them),
and msgspec parses and checks the raw strings. A bad value raises `SettingsError` with one line
that names the setting; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import ipaddress
import os
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .variants import VARIANTS

MASK = "***"
# Spellings of yes and no that env vars use, beyond the true/false/1/0 msgspec reads itself.
BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false", "": "false"}


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message is one line naming it."""


def setting(
    env: str,
    help: str,
    *,
    also_env: tuple[str, ...] = (),
    aliases: tuple[str, ...] = (),
    switch: bool = False,
    secret: bool = False,
    **constraints: Any,
) -> Meta:
    """A setting's declaration: msgspec constraints plus what the env and CLI layers need.

    also_env: further env vars that set it, read when `env` is unset (other tools' conventions);
    aliases: shorter flag spellings; switch: a flag without a value that means "1"; secret: masked
    wherever settings are shown (logs, --help, errors)."""
    extra = {"env": env, "also_env": also_env, "aliases": aliases, "switch": switch, "secret": secret}
    return Meta(description=help, extra=extra, **constraints)


Variant = Literal[tuple(VARIANTS)]  # type: ignore[valid-type]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    models_dir: Annotated[Path, setting("MODELS_DIR", "folder holding z-image-<variant>/ model folders")] = Path(
        "./models"
    )
    variant: Annotated[Variant, setting("Z_IMAGE_VARIANT", "which model to serve: turbo, base or edit")] = "turbo"
    model_id: Annotated[
        str | None,
        setting("Z_IMAGE_MODEL_ID", "hub repo id to fetch instead of the default; an existing local folder is loaded directly"),
    ] = None
    transformer: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_TRANSFORMER",
            "a single-file transformer to load instead of the model folder's: .safetensors (original/ComfyUI "
            "or diffusers layout) or .gguf; a relative path is under MODELS_DIR/transformers",
        ),
    ] = None
    quantize: Annotated[
        str,
        setting(
            "Z_IMAGE_QUANTIZE",
            "quantize on load with torchao: none, int8 or fp8 (transformer and text encoder), or per component, "
            "e.g. transformer=int8,text_encoder=none",
            pattern=r"^[a-z0-9_=,]+$",
        ),
    ] = "none"
    device: Annotated[
        Literal["auto", "cuda", "mps", "cpu"], setting("Z_IMAGE_DEVICE", "auto picks cuda, then mps, then cpu")
    ] = "auto"
    dtype: Annotated[
        Literal["auto", "bf16", "fp16", "fp32"], setting("Z_IMAGE_DTYPE", "auto: bf16 on cuda, fp32 on cpu")
    ] = "auto"
    max_batch_size: Annotated[int, setting("Z_IMAGE_MAX_BATCH_SIZE", "images per pipeline call", ge=1, le=64)] = 4
    batch_wait_ms: Annotated[
        float,
        setting("Z_IMAGE_BATCH_WAIT_MS", "how long a lone request may be held for companions (0: start at once)", ge=0),
    ] = 0.0
    max_queue: Annotated[int, setting("Z_IMAGE_MAX_QUEUE", "queued images before new requests get 429", ge=1)] = 32
    request_timeout_s: Annotated[
        float, setting("Z_IMAGE_REQUEST_TIMEOUT_S", "seconds before a request gets 504", gt=0)
    ] = 300.0
    max_pixels: Annotated[int, setting("Z_IMAGE_MAX_PIXELS", "largest width*height accepted", ge=64 * 64)] = 2048 * 2048
    variation_strength: Annotated[
        float,
        setting(
            "Z_IMAGE_VARIATION_STRENGTH",
            "seed variation for requests that send none: noise from each image's seed on its prompt embedding, 0..1",
            ge=0,
            le=1,
        ),
    ] = 0.0
    max_n: Annotated[int, setting("Z_IMAGE_MAX_N", "largest n (images per request)", ge=1, le=16)] = 4
    download_source: Annotated[
        Literal["huggingface", "modelscope"],
        setting(
            "Z_IMAGE_DOWNLOAD_SOURCE", "hub to fetch missing weights from: huggingface or modelscope", aliases=("--source",)
        ),
    ] = "huggingface"
    offline: Annotated[
        bool,
        setting(
            "Z_IMAGE_OFFLINE",
            "never fetch weights; a missing model folder stops the server",
            also_env=("HF_HUB_OFFLINE",),
            switch=True,
        ),
    ] = False
    max_upload_bytes: Annotated[
        int,
        setting(
            "Z_IMAGE_MAX_UPLOAD_BYTES",
            "largest /v1/images/edits request body (images, mask and fields), in bytes; larger gets 413",
            ge=1024,
        ),
    ] = 20 * 1024 * 1024
    api_key: Annotated[
        str | None,
        setting("Z_IMAGE_API_KEY", "when set, every /v1/* route requires 'Authorization: Bearer <key>'", secret=True),
    ] = None
    cors_origins: Annotated[
        tuple[Annotated[str, Meta(pattern=r"^(\*|https?://\S+)$")], ...],
        setting("Z_IMAGE_CORS_ORIGINS", "comma-separated origins browsers may call from (none by default; * for any)"),
    ] = ()
    drain_timeout_s: Annotated[
        float,
        setting("Z_IMAGE_DRAIN_TIMEOUT_S", "on SIGTERM/SIGINT, seconds to let accepted work finish before exiting", ge=0),
    ] = 120.0
    provenance: Annotated[
        Literal["on", "off"],
        setting(
            "Z_IMAGE_PROVENANCE",
            "on: every output carries XMP marking it as made by a model (IPTC digital source type, creator tool, "
            "model); off: no marks",
        ),
    ] = "on"
    c2pa_cert: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_C2PA_CERT",
            "PEM certificate chain (signing certificate first): with Z_IMAGE_C2PA_KEY, every output embeds a signed "
            "C2PA manifest",
        ),
    ] = None
    c2pa_key: Annotated[
        Path | None, setting("Z_IMAGE_C2PA_KEY", "PEM private key of the Z_IMAGE_C2PA_CERT signing certificate")
    ] = None
    c2pa_tsa_url: Annotated[
        str | None,
        setting(
            "Z_IMAGE_C2PA_TSA_URL", "an RFC 3161 time-stamping service (http or https URL) for the C2PA signatures"
        ),
    ] = None
    c2pa_include_prompt: Annotated[
        bool,
        setting(
            "Z_IMAGE_C2PA_INCLUDE_PROMPT", "write the prompt into the C2PA manifest (off: prompts can be private)", switch=True
        ),
    ] = False
    idle_unload_s: Annotated[
        float,
        setting(
            "Z_IMAGE_IDLE_UNLOAD_S",
            "after this many seconds with nothing queued or running, free the model's memory (device and host); "
            "the next request reloads it from disk (0: never)",
            ge=0,
        ),
    ] = 0.0
    offload: Annotated[
        Literal["auto", "none", "text_encoder", "model"],
        setting(
            "Z_IMAGE_OFFLOAD",
            "GPU memory mode: none (all resident), text_encoder (streamed in to encode), model (each component "
            "moved in turn); auto picks the lightest mode the memory plan predicts fits (`zimage-server plan`), "
            "VAE slicing included",
        ),
    ] = "auto"
    attention: Annotated[
        str,
        # Only the spelling is checked here (no torch import before start-up); whether the backend
        # runs on the chosen device is checked by runner.preflight before anything loads.
        setting(
            "Z_IMAGE_ATTENTION",
            "diffusers attention backend (native, _native_cudnn, flash, _flash_3, ...); auto picks the fastest that works",
            pattern=r"^[a-z0-9_]+$",
        ),
    ] = "auto"
    compile: Annotated[
        Literal["off", "regional", "full"],
        setting(
            "Z_IMAGE_COMPILE",
            "torch.compile the transformer's repeated blocks (regional) or all of it (full), during warm-up",
        ),
    ] = "off"
    prompt_cache: Annotated[
        int,
        setting(
            "Z_IMAGE_PROMPT_CACHE",
            "prompt embeddings kept in an LRU cache so repeated prompts skip the text encoder (0 disables)",
            ge=0,
            le=100_000,
        ),
    ] = 64
    controlnet: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_CONTROLNET",
            "a Z-Image ControlNet (Fun ControlNet Union .safetensors file or diffusers folder), loaded beside the "
            "model; a relative path is under MODELS_DIR/controlnets",
        ),
    ] = None
    log_format: Annotated[
        Literal["text", "json"],
        setting("Z_IMAGE_LOG_FORMAT", "text: one readable line per event; json: one JSON object per line"),
    ] = "text"
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], setting("Z_IMAGE_LOG_LEVEL", "lowest level logged")
    ] = "info"
    lora_dir: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_LORA_DIR",
            "folder of LoRA .safetensors files, subfolders allowed (default MODELS_DIR/loras); "
            "LoRA is on when it exists at start-up",
        ),
    ] = None
    max_loras: Annotated[int, setting("Z_IMAGE_MAX_LORAS", "LoRAs one request may apply at once", ge=0, le=16)] = 4
    lora_max_rank: Annotated[
        int,
        setting(
            "Z_IMAGE_LORA_MAX_RANK",
            "rank of the resident LoRA slot, which a request's LoRAs share (their ranks add up); 0 turns LoRA off",
            ge=0,
            le=1024,
        ),
    ] = 64
    lora_cache: Annotated[
        int, setting("Z_IMAGE_LORA_CACHE", "LoRA files kept loaded on the CPU, least recently used first out", ge=1, le=1000)
    ] = 8
    upscaler_dir: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_UPSCALER_DIR",
            "folder of upscaler models (.safetensors or .pth; ESRGAN, Compact, SPAN, SwinIR... as spandrel reads "
            "them), each named by its file name without the extension (default MODELS_DIR/upscalers)",
        ),
    ] = None
    upscaler_cache: Annotated[
        int,
        setting(
            "Z_IMAGE_UPSCALER_CACHE", "upscaler models kept loaded on the device, least recently used first out", ge=1, le=16
        ),
    ] = 2
    sdapi_sampling: Annotated[
        Literal["model", "client"],
        setting(
            "Z_IMAGE_SDAPI_SAMPLING",
            "steps and CFG on /sdapi routes: model (the variant's recommended ones replace what A1111 clients "
            "send) or client (run what was sent)",
        ),
    ] = "model"
    model_aliases: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=128)], ...],
        setting(
            "Z_IMAGE_MODEL_ALIASES",
            "comma-separated model names also served by the loaded model, for clients that cannot change "
            "theirs (empty: only the model's own names)",
        ),
    ] = ("dall-e-2", "dall-e-3", "gpt-image-1")
    store: Annotated[
        str,
        setting(
            "Z_IMAGE_STORE",
            "where images are kept: a folder, s3://bucket/prefix (endpoint, region and credentials from the AWS_* "
            "variables) or none",
            min_length=1,
        ),
    ] = "./outputs"
    database_url: Annotated[
        str | None,
        setting(
            "Z_IMAGE_DATABASE_URL",
            "the image index: sqlite:///FILE or postgresql://... (replicas share one); default "
            "sqlite:///<store folder>/index.db",
            secret=True,
        ),
    ] = None
    public_url: Annotated[
        Annotated[str, Meta(pattern=r"^https?://[^\s?#]+$")] | None,
        setting(
            "Z_IMAGE_PUBLIC_URL",
            "the server's address as clients reach it, for image URLs (default: the request's own scheme and host)",
        ),
    ] = None
    trusted_proxies: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=64)], ...],
        setting(
            "Z_IMAGE_TRUSTED_PROXIES",
            "comma-separated addresses or networks (CIDR) whose X-Forwarded-Proto/-Host/-Prefix headers "
            "image URLs follow",
        ),
    ] = ()
    url_ttl_s: Annotated[
        int, setting("Z_IMAGE_URL_TTL_S", "seconds an image URL stays valid", ge=1, le=7 * 24 * 3600)
    ] = 3600
    url_secret: Annotated[
        Annotated[str, Meta(min_length=16)] | None,
        setting(
            "Z_IMAGE_URL_SECRET",
            "the key that signs image URLs (default: one generated at first start and kept in the index)",
            secret=True,
        ),
    ] = None
    api_keys_file: Annotated[
        Path | None,
        setting(
            "Z_IMAGE_API_KEYS_FILE",
            "a file of 'NAME ROLE SECRET' lines (ROLE admin or user; SECRET the key or sha256:HEX); re-read on SIGHUP",
        ),
    ] = None
    store_max_age: Annotated[
        str,
        setting(
            "Z_IMAGE_STORE_MAX_AGE", "images older than this are deleted, e.g. 30d, 12h, 0 (keep forever)",
            pattern=r"^\s*\d+(\.\d+)?\s*[smhdw]?\s*$",
        ),
    ] = "30d"
    store_max_bytes: Annotated[
        str,
        setting(
            "Z_IMAGE_STORE_MAX_BYTES",
            "oldest images are deleted while the store holds more, e.g. 20GiB, 500MB, 0 (no limit)",
            pattern=r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?)?[bB]?\s*$",
        ),
    ] = "20GiB"
    max_queue_per_key: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        setting(
            "Z_IMAGE_MAX_QUEUE_PER_KEY",
            "queued images one key (owner) may have before its new requests get 429 while other keys still get "
            "in (default: the whole queue)",
        ),
    ] = None
    webhook_url: Annotated[
        Annotated[str, Meta(pattern=r"^https?://\S+$", max_length=2048)] | None,
        setting("Z_IMAGE_WEBHOOK_URL", "called when any async job finishes, besides a request's own webhook_url"),
    ] = None
    webhook_secret: Annotated[
        Annotated[str, Meta(min_length=16)] | None,
        setting(
            "Z_IMAGE_WEBHOOK_SECRET",
            "signs webhook calls the Standard Webhooks way (whsec_BASE64, or any string of 16+ characters); "
            "webhooks need it",
            secret=True,
        ),
    ] = None
    webhook_allow: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=253)], ...],
        setting(
            "Z_IMAGE_WEBHOOK_ALLOW",
            "comma-separated hosts or networks (CIDR) webhooks may call even when private, loopback or link-local "
            "(refused by default)",
        ),
    ] = ()
    max_jobs_queued: Annotated[
        int,
        setting(
            "Z_IMAGE_MAX_JOBS_QUEUED",
            "images the shared queue of async jobs may hold before new jobs get 429 (every replica's together)",
            ge=1,
        ),
    ] = 1000
    job_lease_s: Annotated[
        float,
        setting(
            "Z_IMAGE_JOB_LEASE_S",
            "an async job's runner renews its claim this often (x3); a replica silent for longer loses its jobs "
            "to the others, which run them again",
            ge=1,
            le=3600,
        ),
    ] = 30.0
    mcp: Annotated[
        Literal["on", "off"],
        setting("Z_IMAGE_MCP", "on: POST /mcp serves the image tools to agents (Model Context Protocol); off: no route"),
    ] = "on"
    mcp_allowed_hosts: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=253)], ...],
        setting(
            "Z_IMAGE_MCP_ALLOWED_HOSTS",
            "comma-separated Host values /mcp answers besides the bind address and Z_IMAGE_PUBLIC_URL's host "
            "(HOST, HOST:PORT or HOST:*; DNS-rebinding protection refuses others)",
        ),
    ] = ()
    mcp_wait_s: Annotated[
        float,
        setting(
            "Z_IMAGE_MCP_WAIT_S",
            "how long an MCP tool call waits for its images before answering with the job's id to poll",
            gt=0,
            le=3600,
        ),
    ] = 60.0
    mcp_fetch_allow: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=253)], ...],
        setting(
            "Z_IMAGE_MCP_FETCH_ALLOW",
            "comma-separated hosts whose https:// image URLs edit_image may fetch (none by default: only this "
            "server's own image links and base64)",
        ),
    ] = ()
    prompt_enhancer: Annotated[
        str,
        setting(
            "Z_IMAGE_PROMPT_ENHANCER",
            "what rewrites short prompts into detailed captions: resident (the loaded text encoder, Qwen3-4B, "
            "as a chat model), off, or the http(s)://HOST:PORT/v1 base URL of an OpenAI-compatible chat endpoint",
        ),
    ] = "resident"
    prompt_enhancer_model: Annotated[
        str | None,
        setting("Z_IMAGE_PROMPT_ENHANCER_MODEL", "the model a Z_IMAGE_PROMPT_ENHANCER URL serves (required with one)"),
    ] = None
    prompt_enhancer_api_key: Annotated[
        str | None,
        setting("Z_IMAGE_PROMPT_ENHANCER_API_KEY", "Bearer key for the Z_IMAGE_PROMPT_ENHANCER URL", secret=True),
    ] = None
    enhance_max_tokens: Annotated[
        int, setting("Z_IMAGE_ENHANCE_MAX_TOKENS", "most tokens an enhanced prompt may take to write", ge=1, le=4096)
    ] = 400
    enhance_prompt: Annotated[
        bool,
        setting("Z_IMAGE_ENHANCE_PROMPT", "enhance every request's prompt unless the request says otherwise", switch=True),
    ] = False
    enhance_timeout_s: Annotated[
        float,
        setting(
            "Z_IMAGE_ENHANCE_TIMEOUT_S", "seconds to wait for an enhanced prompt before using the original", gt=0, le=3600
        ),
    ] = 60.0
    host: Annotated[str, setting("Z_IMAGE_HOST", "address to bind")] = "127.0.0.1"
    port: Annotated[int, setting("Z_IMAGE_PORT", "port to bind", ge=0, le=65535)] = 8000

    def __repr__(self) -> str:
        # Settings get logged; the API key must never reach a log line.
        fields = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({fields})"

    def redacted(self) -> dict[str, Any]:
        """Every setting, with secrets masked: what may be logged or shown."""
        return {
            spec.field: MASK if spec.secret and getattr(self, spec.field) is not None else getattr(self, spec.field)
            for spec in SETTINGS
        }

    @property
    def model_dir(self) -> Path:
        """Where the weights live: a local folder named by Z_IMAGE_MODEL_ID, else MODELS_DIR/z-image-<variant>."""
        if self.model_id and Path(self.model_id).is_dir():
            return Path(self.model_id)
        return Path(self.models_dir) / VARIANTS[self.variant].model_name

    @property
    def transformer_file(self) -> Path | None:
        """Z_IMAGE_TRANSFORMER as a path: absolute as given, relative under MODELS_DIR/transformers."""
        if self.transformer is None:
            return None
        return Path(self.transformer) if Path(self.transformer).is_absolute() else self.transformers_dir / self.transformer

    @property
    def transformers_dir(self) -> Path:
        return Path(self.models_dir) / "transformers"

    @property
    def quantization(self) -> dict[str, str]:
        """Z_IMAGE_QUANTIZE as component -> "int8" or "fp8"; components left unquantized are absent."""
        return parse_quantize(self.quantize)

    @property
    def loras_dir(self) -> Path:
        return Path(self.lora_dir) if self.lora_dir is not None else Path(self.models_dir) / "loras"

    @property
    def upscalers_dir(self) -> Path:
        return Path(self.upscaler_dir) if self.upscaler_dir is not None else Path(self.models_dir) / "upscalers"

    @property
    def controlnet_path(self) -> Path | None:
        if self.controlnet is None:
            return None
        path = Path(self.controlnet)
        return path if path.is_absolute() else Path(self.models_dir) / "controlnets" / path

    @property
    def store_folder(self) -> Path | None:
        """The store's folder, when the store is one (not S3, not none)."""
        if self.store.lower() == "none" or self.store.startswith("s3://"):
            return None
        return Path(self.store)

    @property
    def index_url(self) -> str | None:
        """Z_IMAGE_DATABASE_URL, or the SQLite file beside a folder store; None when nothing is kept."""
        if self.database_url is not None:
            return self.database_url
        folder = self.store_folder
        return f"sqlite:///{folder / 'index.db'}" if folder is not None else None

    @property
    def store_max_age_s(self) -> float:
        return parse_duration(self.store_max_age)

    @property
    def store_max_bytes_count(self) -> int:
        return parse_byte_size(self.store_max_bytes)

    def replace(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)


@dataclass(frozen=True)
class SettingSpec:
    """One field of Settings as the env and CLI layers see it; read off the field's declaration."""

    field: str
    env: str
    help: str
    default: Any
    also_env: tuple[str, ...]
    aliases: tuple[str, ...]
    switch: bool
    secret: bool
    choices: tuple[str, ...]  # a Literal field's values
    lowercase: bool  # names (choices, backends) are matched in any case

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _declared_settings() -> tuple[SettingSpec, ...]:
    hints = typing.get_type_hints(Settings, include_extras=True)
    specs = []
    for field in msgspec.structs.fields(Settings):
        hint = hints[field.name]
        meta = next(m for m in hint.__metadata__ if isinstance(m, Meta) and m.extra)
        choices = typing.get_args(hint.__origin__) if typing.get_origin(hint.__origin__) is Literal else ()
        specs.append(
            SettingSpec(
                field=field.name,
                help=meta.description,
                default=field.default,
                choices=choices,
                lowercase=bool(choices) or field.name in ("attention", "quantize"),
                **meta.extra,
            )
        )
    return tuple(specs)


SETTINGS: tuple[SettingSpec, ...] = _declared_settings()


def _raw_value(spec: SettingSpec, raw: str) -> Any:
    """A raw string shaped for msgspec: trimmed, lists split, yes/no words as booleans, names lowercased."""
    value = raw.strip()
    if isinstance(spec.default, tuple):
        return [item.strip().rstrip("/") for item in value.split(",") if item.strip()]
    if isinstance(spec.default, bool):
        return BOOL_WORDS.get(value.lower(), value)
    return value.lower() if spec.lowercase else value


def load_settings(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from env vars, then CLI overrides (raw strings, as typed), each parsed and validated."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in SETTINGS:
        raw, source = (overrides or {}).get(spec.field), spec.flag
        for name in (spec.env, *spec.also_env):
            if raw is None:
                raw, source = env.get(name), name
        if raw is None:
            continue
        if isinstance(raw, str):
            # Set but empty: the default, as an unset variable would give; for a list, the empty list.
            if raw.strip() == "" and not isinstance(spec.default, tuple):
                continue
            raw = _raw_value(spec, raw)
        values[spec.field], sources[spec.field] = raw, source
    try:
        settings = msgspec.convert(values, Settings, strict=False, dec_hook=_decode_path)
    except msgspec.ValidationError as exc:
        raise _named_error(exc, values, sources) from None
    if settings.max_n > settings.max_queue:
        raise SettingsError(
            f"Z_IMAGE_MAX_N={settings.max_n} exceeds Z_IMAGE_MAX_QUEUE={settings.max_queue}: "
            "a request of n images could never be queued"
        )
    if settings.controlnet is not None and (settings.offload == "model" or VARIANTS[settings.variant].edit_method == "omni"):
        raise SettingsError(
            "Z_IMAGE_CONTROLNET needs Z_IMAGE_OFFLOAD=none, text_encoder or auto, and the turbo or base variant"
        )
    if VARIANTS[settings.variant].bf16_only and settings.dtype not in ("auto", "bf16"):
        raise SettingsError(
            f"Z_IMAGE_DTYPE={settings.dtype} cannot run Z_IMAGE_VARIANT={settings.variant}: it runs in bf16 only"
        )
    parse_quantize(settings.quantize)
    check_store_settings(settings)
    if settings.max_queue_per_key is not None and settings.max_n > settings.max_queue_per_key:
        raise SettingsError(
            f"Z_IMAGE_MAX_N={settings.max_n} exceeds Z_IMAGE_MAX_QUEUE_PER_KEY={settings.max_queue_per_key}: "
            "a request of n images could never be queued"
        )
    if settings.webhook_url is not None and settings.webhook_secret is None:
        raise SettingsError("Z_IMAGE_WEBHOOK_URL needs Z_IMAGE_WEBHOOK_SECRET: every webhook call is signed with it")
    check_prompt_enhancer_settings(settings)
    return settings


PROMPT_ENHANCER_URL = re.compile(r"^https?://[^\s/?#@]+(/[^\s?#]*)?$")


def check_prompt_enhancer_settings(settings: Settings) -> None:
    """Z_IMAGE_PROMPT_ENHANCER is resident, off or a chat endpoint's URL, which needs a model name."""
    enhancer = settings.prompt_enhancer
    if enhancer not in ("resident", "off") and not PROMPT_ENHANCER_URL.match(enhancer):
        raise SettingsError(
            f"invalid Z_IMAGE_PROMPT_ENHANCER={enhancer!r}: expected resident, off, or the http(s)://HOST:PORT/v1 "
            "base URL of an OpenAI-compatible chat endpoint"
        )
    if enhancer not in ("resident", "off") and not settings.prompt_enhancer_model:
        raise SettingsError(
            "Z_IMAGE_PROMPT_ENHANCER set to a URL needs Z_IMAGE_PROMPT_ENHANCER_MODEL: the model name its endpoint serves"
        )
    if enhancer == "off" and settings.enhance_prompt:
        raise SettingsError("Z_IMAGE_ENHANCE_PROMPT needs a prompt enhancer, but Z_IMAGE_PROMPT_ENHANCER=off")


def check_store_settings(settings: Settings) -> None:
    """The store, index and proxy settings make sense together (their format is checked by msgspec)."""
    store = settings.store
    if store.startswith("s3://"):
        if not store[len("s3://") :].split("/")[0]:
            raise SettingsError(f"invalid Z_IMAGE_STORE={store!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
        if settings.database_url is None:
            raise SettingsError(
                "Z_IMAGE_STORE=s3://... needs Z_IMAGE_DATABASE_URL (sqlite:///FILE, or postgresql://... for replicas "
                "sharing the bucket)"
            )
    elif "://" in store:
        raise SettingsError(f"invalid Z_IMAGE_STORE={store!r}: expected a folder, s3://BUCKET/PREFIX or none")
    url = settings.database_url
    if url is not None and not url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise SettingsError("invalid Z_IMAGE_DATABASE_URL: expected sqlite:///FILE or postgresql://USER@HOST/DB")
    for proxy in settings.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise SettingsError(
                f"invalid Z_IMAGE_TRUSTED_PROXIES entry {proxy!r}: expected an IP address or network (10.0.0.0/8)"
            ) from None


DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
BYTE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4}


def parse_duration(text: str) -> float:
    """"30d" -> seconds; a bare number is seconds. 0 means forever."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None:
        raise SettingsError(f"invalid duration {text!r}: expected a number and s, m, h, d or w (30d)")
    return float(match.group(1)) * DURATION_UNITS[match.group(2)]


def parse_byte_size(text: str) -> int:
    """"20GiB" -> bytes (binary with i, decimal without); a bare number is bytes. 0 means no limit."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?))?b?\s*", text.lower())
    if match is None:
        raise SettingsError(f"invalid size {text!r}: expected a number and KiB, MiB, GiB, MB, GB... (20GiB)")
    number, unit, binary = match.groups()
    factor = 1024 ** "kmgt".index(unit) * 1024 if unit and binary else BYTE_UNITS[unit or ""]
    return int(float(number) * factor)


QUANTIZE_KINDS = ("none", "int8", "fp8")
# Components worth quantizing: the two that hold nearly all the weights (the VAE is 0.16 GiB of convolutions).
QUANTIZABLE = ("transformer", "text_encoder")


def parse_quantize(text: str) -> dict[str, str]:
    """"int8" -> both components in int8; "transformer=int8,text_encoder=none" -> per component."""
    choices: dict[str, str] = {}
    for part in text.split(","):
        component, _, kind = part.rpartition("=")
        targets = (component,) if component else QUANTIZABLE
        if kind not in QUANTIZE_KINDS or not set(targets) <= set(QUANTIZABLE):
            raise SettingsError(
                f"invalid Z_IMAGE_QUANTIZE={text!r}: expected one of {', '.join(QUANTIZE_KINDS)}, or "
                f"comma-separated COMPONENT=KIND with COMPONENT one of {', '.join(QUANTIZABLE)}"
            )
        for target in targets:
            choices[target] = kind
    return {component: kind for component, kind in choices.items() if kind != "none"}


def _decode_path(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError


def _named_error(exc: msgspec.ValidationError, values: dict[str, Any], sources: dict[str, str]) -> SettingsError:
    """msgspec's "Expected `int` >= 1, got `0` - at `$.max_queue`" as "invalid --max-queue='0': expected ..."."""
    message, _, where = str(exc).rpartition(" - at `$.")
    field = where.split("`")[0].split("[")[0]
    spec = next((s for s in SETTINGS if s.field == field), None)
    if spec is None:
        return SettingsError(f"invalid setting: {exc}")
    shown = MASK if spec.secret else repr(values.get(field))
    if spec.choices:
        message = f"must be one of {', '.join(spec.choices)}"
    return SettingsError(f"invalid {sources.get(field, spec.env)}={shown}: {message[:1].lower()}{message[1:]}")
