"""One log for the whole process: every line, ours, uvicorn's and the model libraries', in one format.

`text` (the default) is one readable line per record; `json` is one object per line for log
pipelines. Both go through a single handler on the root logger; the libraries that bring their
own handlers (diffusers, transformers, torch) are made to propagate to it instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Start-up warnings that say nothing about this server, each as (logger, words in the message, why).
# Anything else from these libraries still reaches the log.
HARMLESS_WARNINGS = (
    (
        "transformers",
        "requires torchvision (not installed); falling back to",
        (
            "the PIL image processor it falls back to is the one we want; torchvision would add a large "
            "dependency for nothing, and transformers says so even for variants without SigLIP"
        ),
    ),
    (
        "diffusers",
        "Unable to import `torchao` Tensor objects",
        "only torchao-serialized checkpoints need them; the server quantizes on load (Z_IMAGE_QUANTIZE) instead",
    ),
    (
        "torchao",
        "Failed to load",
        (
            "torchao's optional fused kernels (mxfp8, cutlass), built for other Python or GPU versions; "
            "int8 and fp8 weight-only quantization (Z_IMAGE_QUANTIZE) do not use them"
        ),
    ),
    ("torchao", "Detected no triton", "the same: kernels of torchao that we never call"),
    (
        "py.warnings",
        "TorchaoLoraLinear was instantiated without `get_apply_tensor_subclass`",
        "peft says merging a LoRA into a torchao layer would fail; the LoRA slot is never merged (loras.py)",
    ),
    (
        "torch.utils._pytree",
        "is an Enum subclass and is now natively supported by torch.compile",
        "a deprecation notice addressed to torchao, which registers its enums the old way on import",
    ),
)

# LogRecord's own attributes: whatever else a record carries came from `extra=` and is a field.
RECORD_ATTRIBUTES = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# uvicorn adds an ANSI-coloured copy of some messages, for its own formatter only.
DROPPED_EXTRAS = frozenset({"color_message"})


def iso_time(record: logging.LogRecord) -> str:
    """ISO-8601 in UTC with milliseconds, e.g. 2026-12-01T09:01:02.123Z."""
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """`2026-12-01T09:01:02.123Z INFO zimage_server.api: message`; a traceback follows, indented."""

    def format(self, record: logging.LogRecord) -> str:
        # What takes several lines (a traceback, a Python warning with its source line) is indented
        # under its record's line, so a reader still sees where each record starts.
        first, *rest = record.getMessage().splitlines() or [""]
        if record.exc_info:
            rest += self.formatException(record.exc_info).splitlines()
        if record.stack_info:
            rest += record.stack_info.splitlines()
        head = f"{iso_time(record)} {record.levelname} {record.name}: {first}"
        return "\n".join([head, *("    " + line for line in rest)])


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, any `extra=` fields, and the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": iso_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in RECORD_ATTRIBUTES and key not in DROPPED_EXTRAS:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: an extra that JSON cannot hold is still logged, as its text.
        return json.dumps(entry, ensure_ascii=False, default=str)


class HarmlessWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(
            (record.name == name or record.name.startswith(name + ".")) and words in message
            for name, words, _why in HARMLESS_WARNINGS
        )


def first_line(exc: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def configured() -> bool:
    """Whether `configure_logging` has installed its handler in this process."""
    return any(isinstance(h.formatter, TextFormatter | JsonFormatter) for h in logging.getLogger().handlers)


def configure_logging(log_format: str = "text", level: str = "info") -> None:
    """One handler on the root logger, in `log_format` (text|json), at `level`, for our loggers and
    Python's warnings; uvicorn's join it when its Config gets `log_config=None`, and Litestar's when
    the app gets `logging_config=None`. Raises ValueError for an unknown format or level."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    if level.lower() not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(HarmlessWarningFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)


def route_model_library_logs() -> None:
    """Make diffusers, transformers, torch and huggingface_hub log through the root handler instead
    of their own, and show their progress bars only on a terminal. Imports diffusers (and so torch):
    call it where the server is about to load the model anyway."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    # Each gave its loggers a handler of its own on import (torch several: torch, torch._dynamo, ...).
    propagate_to_root("diffusers", "transformers", "torch", "huggingface_hub")
    if not sys.stderr.isatty():
        # Bars written to a log are carriage-return noise; `logged_step` lines take their place.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # for hub code that reads it later


def propagate_to_root(*names: str) -> None:
    """Drop the handlers a library put on its loggers (named, or below one named), so that their
    records reach the root handler alone. Call it after the library is imported: that is when
    they add them. diffusers and transformers add theirs only once, so they do not come back."""
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and any(name == n or name.startswith(n + ".") for n in names):
            logger.handlers.clear()
            logger.propagate = True


@contextmanager
def logged_step(logger: logging.Logger, what: str, size_bytes: int | None = None) -> Iterator[None]:
    """`loading WHAT (1.2 GB)...` before the block and `loaded WHAT in 3.4 s` after it succeeds."""
    size = f" ({human_size(size_bytes)})" if size_bytes is not None else ""
    logger.info("loading %s%s...", what, size, extra={"step": what, "size_bytes": size_bytes})
    started = time.monotonic()
    yield
    seconds = time.monotonic() - started
    logger.info("loaded %s in %.1f s", what, seconds, extra={"step": what, "seconds": round(seconds, 3)})


def human_size(n: float) -> str:
    units = ("B", "kB", "MB", "GB")
    power = 0
    while n >= 1000 and power < len(units) - 1:
        n, power = n / 1000, power + 1
    return f"{n:.0f} B" if power == 0 else f"{n:.1f} {units[power]}"
