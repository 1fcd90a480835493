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
from datetime import datetime, timezone

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Start-up warnings that say nothing about this server, each as (logger, words in the message, why).
# Anything else from these libraries still reaches the log.
HARMLESS_WARNINGS = (
    (
        "transformers",
        "requires torchvision (not installed); falling back to",
        "the PIL image processor it falls back to is the one we want; torchvision would add a large "
        "dependency for nothing, and transformers says so even for variants without SigLIP",
    ),
    (
        "diffusers",
        "Unable to import `torchao` Tensor objects",
        "only torchao-serialized checkpoints need them; Z-Image weights are plain safetensors",
    ),
    (
        "torchao",
        "Failed to load",
        "torchao's optional fused kernels, built for other Python or GPU versions; diffusers imports "
        "torchao for its quantizer, which we never use",
    ),
    ("torchao", "Detected no triton", "the same: kernels of torchao that we never call"),
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
    moment = datetime.fromtimestamp(record.created, timezone.utc)
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
        entry = {"time": iso_time(record), "level": record.levelname, "logger": record.name, "message": record.getMessage()}
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
        for logger_name, words, _why in HARMLESS_WARNINGS:
            if (record.name == logger_name or record.name.startswith(logger_name + ".")) and words in record.getMessage():
                return False
        return True


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
    """Make diffusers, transformers and torch log through the root handler instead of their own,
    and show their progress bars only on a terminal. Imports diffusers (and so torch): call it
    where the server is about to load the model anyway."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    # torch gives its top-level loggers (torch, torch._dynamo, ...) handlers of its own at import.
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if (name == "torch" or name.startswith("torch.")) and isinstance(logger, logging.Logger) and logger.handlers:
            logger.handlers.clear()
            logger.propagate = True
    if not sys.stderr.isatty():
        # Bars written to a log are carriage-return noise; `logged_step` lines take their place.
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # for hub code that reads it later


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
