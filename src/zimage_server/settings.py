"""One frozen settings object, read from env vars and CLI flags and validated before anything loads.

Each setting is declared once in `SETTINGS`: its env var, its CLI flag, its default, its parser and
its help text. The CLI builds its flags from that table and `zimage-server serve --help` prints it.
A bad value raises `SettingsError` with one line that names the setting; the CLI prints it and
exits non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VARIANTS = ("turbo", "base", "edit")
DOWNLOAD_SOURCES = ("huggingface", "modelscope")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message is one line naming it."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    models_dir: Path = Path("./models")
    variant: str = "turbo"
    model_id: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 4
    batch_wait_ms: float = 0.0
    max_queue: int = 32
    request_timeout_s: float = 300.0
    max_pixels: int = 2048 * 2048
    max_n: int = 4
    download_source: str = "huggingface"
    offline: bool = False
    max_upload_bytes: int = 20 * 1024 * 1024
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    drain_timeout_s: float = 120.0
    offload: str = "auto"
    attention: str = "auto"
    compile: str = "off"
    prompt_cache: int = 64
    host: str = "127.0.0.1"
    port: int = 8000

    def __repr__(self) -> str:
        # Settings get logged; the API key must never reach a log line.
        fields = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({fields})"

    def redacted(self) -> dict[str, Any]:
        """Every setting, with secrets masked: what may be logged or shown."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        for spec in SETTINGS:
            if spec.secret and values.get(spec.field) is not None:
                values[spec.field] = MASK
        return values

    @property
    def model_dir(self) -> Path:
        """Where the weights live: a local folder named by Z_IMAGE_MODEL_ID, else MODELS_DIR/z-image-<variant>."""
        if self.model_id and Path(self.model_id).is_dir():
            return Path(self.model_id)
        return self.models_dir / f"z-image-{self.variant}"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _choice(*options: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return value

    return parse


def _int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("must be an integer") from None
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be between {low} and {high}" if high is not None else f"must be >= {low}")
        return value

    return parse


def _float_min(low: float, *, strict: bool = False) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError("must be a number") from None
        if value != value or value < low or (strict and value == low):
            raise ValueError(f"must be {'>' if strict else '>='} {low:g}")
        return value

    return parse


def _backend_name(raw: str) -> str:
    # Only the spelling is checked here (no torch import before start-up); whether the backend
    # runs on the chosen device is checked by pipelines.preflight before anything loads.
    value = raw.strip().lower()
    if not re.fullmatch(r"[a-z0-9_]+", value):
        raise ValueError("must be auto or a diffusers attention backend name such as native, _native_cudnn, flash")
    return value


def _optional_str(raw: str) -> str | None:
    return raw.strip() or None


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be 1/0, true/false, yes/no or on/off")


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(origin.strip().rstrip("/") for origin in raw.split(",") if origin.strip())
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"origin {origin!r} must be * or start with http:// or https://")
    return origins


MASK = "***"


@dataclass(frozen=True)
class SettingSpec:
    field: str
    env: str
    parse: Callable[[str], Any]
    help: str
    # Further env vars that set it too, read when `env` is unset (other tools' conventions).
    also_env: tuple[str, ...] = ()
    # Shorter flag spellings; a switch is a flag without a value that means "1".
    aliases: tuple[str, ...] = ()
    switch: bool = False
    secret: bool = False  # masked wherever settings are shown (logs, --help, errors)

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec("models_dir", "MODELS_DIR", Path, "folder holding z-image-<variant>/ model folders"),
    SettingSpec("variant", "Z_IMAGE_VARIANT", _choice(*VARIANTS), "which model to serve: turbo, base or edit"),
    SettingSpec(
        "model_id",
        "Z_IMAGE_MODEL_ID",
        _optional_str,
        "hub repo id to fetch instead of the default; an existing local folder is loaded directly",
    ),
    SettingSpec("device", "Z_IMAGE_DEVICE", _choice("auto", "cuda", "mps", "cpu"), "auto picks cuda, then mps, then cpu"),
    SettingSpec("dtype", "Z_IMAGE_DTYPE", _choice("auto", "bf16", "fp16", "fp32"), "auto: bf16 on cuda, fp32 on cpu"),
    SettingSpec("max_batch_size", "Z_IMAGE_MAX_BATCH_SIZE", _int_range(1, 64), "images per pipeline call"),
    SettingSpec(
        "batch_wait_ms",
        "Z_IMAGE_BATCH_WAIT_MS",
        _float_min(0),
        "how long a lone request may be held for companions (0: start at once)",
    ),
    SettingSpec("max_queue", "Z_IMAGE_MAX_QUEUE", _int_range(1), "queued images before new requests get 429"),
    SettingSpec(
        "request_timeout_s", "Z_IMAGE_REQUEST_TIMEOUT_S", _float_min(0, strict=True), "seconds before a request gets 504"
    ),
    SettingSpec("max_pixels", "Z_IMAGE_MAX_PIXELS", _int_range(64 * 64), "largest width*height accepted"),
    SettingSpec("max_n", "Z_IMAGE_MAX_N", _int_range(1, 16), "largest n (images per request)"),
    SettingSpec(
        "download_source",
        "Z_IMAGE_DOWNLOAD_SOURCE",
        _choice(*DOWNLOAD_SOURCES),
        "hub to fetch missing weights from: huggingface or modelscope",
        aliases=("--source",),
    ),
    SettingSpec(
        "offline",
        "Z_IMAGE_OFFLINE",
        _bool,
        "never fetch weights; a missing model folder stops the server",
        also_env=("HF_HUB_OFFLINE",),
        switch=True,
    ),
    SettingSpec(
        "max_upload_bytes",
        "Z_IMAGE_MAX_UPLOAD_BYTES",
        _int_range(1024),
        "largest /v1/images/edits request body (images, mask and fields), in bytes; larger gets 413",
    ),
    SettingSpec(
        "api_key",
        "Z_IMAGE_API_KEY",
        _optional_str,
        "when set, every /v1/* route requires 'Authorization: Bearer <key>'",
        secret=True,
    ),
    SettingSpec(
        "cors_origins",
        "Z_IMAGE_CORS_ORIGINS",
        _origins,
        "comma-separated origins browsers may call from (none by default; * for any)",
    ),
    SettingSpec(
        "drain_timeout_s",
        "Z_IMAGE_DRAIN_TIMEOUT_S",
        _float_min(0),
        "on SIGTERM/SIGINT, seconds to let accepted work finish before exiting",
    ),
    SettingSpec(
        "offload",
        "Z_IMAGE_OFFLOAD",
        _choice("auto", "none", "text_encoder", "model"),
        "GPU memory mode: none (all resident), text_encoder (streamed in to encode), model (each component "
        "moved in turn); auto picks none when everything fits, else the lightest mode that does",
    ),
    SettingSpec(
        "attention",
        "Z_IMAGE_ATTENTION",
        _backend_name,
        "diffusers attention backend (native, _native_cudnn, flash, _flash_3, ...); auto picks the fastest that works",
    ),
    SettingSpec(
        "compile",
        "Z_IMAGE_COMPILE",
        _choice("off", "regional", "full"),
        "torch.compile the transformer's repeated blocks (regional) or all of it (full), during warm-up",
    ),
    SettingSpec(
        "prompt_cache",
        "Z_IMAGE_PROMPT_CACHE",
        _int_range(0, 100_000),
        "prompt embeddings kept in an LRU cache so repeated prompts skip the text encoder (0 disables)",
    ),
)


def load_settings(env: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
    """Settings from env vars, then CLI overrides (raw strings, as typed), each parsed and validated."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for spec in SETTINGS:
        raw = (overrides or {}).get(spec.field)
        source = spec.flag
        for name in (spec.env, *spec.also_env):
            if raw is None:
                raw, source = env.get(name), name
        if raw is None or (isinstance(raw, str) and raw.strip() == "" and spec.field != "model_id"):
            continue
        try:
            values[spec.field] = spec.parse(raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            shown = MASK if spec.secret else repr(raw)
            raise SettingsError(f"invalid {source}={shown}: {exc}") from None
    for key in ("host", "port"):
        if overrides and overrides.get(key) is not None:
            values[key] = overrides[key]
    settings = Settings(**values)
    if settings.max_n > settings.max_queue:
        raise SettingsError(
            f"Z_IMAGE_MAX_N={settings.max_n} exceeds Z_IMAGE_MAX_QUEUE={settings.max_queue}: "
            "a request of n images could never be queued"
        )
    if settings.variant == "edit" and settings.dtype not in ("auto", "bf16"):
        # diffusers' ZImageOmniPipeline casts input images with .bfloat16(), so other dtypes fail mid-request.
        raise SettingsError(f"Z_IMAGE_DTYPE={settings.dtype} cannot run Z_IMAGE_VARIANT=edit: it runs in bf16 only")
    return settings
