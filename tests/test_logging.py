"""logs.py: one format for every line the process writes, the request fields in JSON, quiet libraries."""

from __future__ import annotations

import json
import logging
import re
import sys

import httpx
import pytest

from attack_support import GENERATIONS, ServerProcess
from zimage_server import logs
from zimage_server.logs import HarmlessWarningFilter, JsonFormatter, TextFormatter, logged_step

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
JSON_KEYS = {"time", "level", "logger", "message"}
ACCESS_FIELDS = {"request_id", "method", "route", "status", "queue_wait_ms", "batch_size", "pipeline_ms", "total_ms"}


def parsed(line: str, log_format: str) -> dict:
    """The line as a record {logger, message, ...}; fails the test if it is not in `log_format`."""
    if log_format == "text":
        assert TEXT_LINE.match(line), f"not a text log line: {line!r}"
        logger, message = line.split(" ", 2)[2].split(": ", 1)
        return {"logger": logger, "message": message}
    record = json.loads(line)
    assert JSON_KEYS <= set(record), f"missing keys: {line!r}"
    return record


def is_failure_line(line: str) -> bool:
    """A start-up or download failure as `serve` and `download` report it: one critical text log line."""
    return bool(TEXT_LINE.match(line)) and " CRITICAL zimage_server.cli: " in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_every_line_of_a_real_server_is_in_the_chosen_format(models_dir, tmp_path, log_format):
    server = ServerProcess(models_dir, tmp_path / "server.log", env={"Z_IMAGE_LOG_FORMAT": log_format}).start()
    try:
        generated = httpx.post(server.url + GENERATIONS, json={"prompt": "a cat", "size": "64x64"}, timeout=60)
        missing = httpx.get(server.url + "/no-such-page", timeout=10)
        assert (generated.status_code, missing.status_code) == (200, 404)
        server.signal()
        assert server.wait(timeout=60) == 0
    finally:
        server.stop()
    lines = server.log().splitlines()
    records = [parsed(line, log_format) for line in lines]
    loggers = {record["logger"] for record in records}
    assert {"zimage_server", "zimage_server.access", "zimage_server.runner", "uvicorn.error"} <= loggers
    assert not any("requires torchvision" in record["message"] for record in records)  # a known-harmless warning
    access = [record for record in records if record["logger"] == "zimage_server.access"]
    assert [("route=/v1/images/generations status=200" in r["message"]) for r in access] == [True, False]
    if log_format == "json":
        assert ACCESS_FIELDS <= set(access[0]) and access[0]["status"] == 200 and access[0]["batch_size"] == 1
        assert access[1]["status"] == 404 and access[1]["pipeline_ms"] is None
        assert access[0]["total_ms"] >= access[0]["pipeline_ms"] > 0


def record(
    message: str = "hello", name: str = "zimage_server.api", level: int = logging.INFO, **extra
) -> logging.LogRecord:
    made = logging.makeLogRecord(
        {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
    )
    made.__dict__.update(extra)
    return made


def failing_record() -> logging.LogRecord:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        return record("it failed", level=logging.ERROR, exc_info=sys.exc_info())


def test_text_lines_start_with_the_time_and_level_and_indent_what_follows():
    line = TextFormatter().format(record())
    assert TEXT_LINE.match(line) and line.endswith(" INFO zimage_server.api: hello")
    first, *rest = TextFormatter().format(failing_record()).splitlines()
    assert TEXT_LINE.match(first) and rest and all(part.startswith("    ") for part in rest)
    assert "RuntimeError: boom" in rest[-1]


def test_json_lines_carry_extra_fields_and_the_traceback_inside_the_object():
    entry = json.loads(JsonFormatter().format(record(request_id="req_1", status=200, color_message="\x1b[1mhello")))
    assert entry["message"] == "hello" and entry["request_id"] == "req_1" and entry["status"] == 200
    assert entry["time"].endswith("Z") and entry["level"] == "INFO" and "color_message" not in entry
    (line,) = JsonFormatter().format(failing_record()).splitlines()
    assert "RuntimeError: boom" in json.loads(line)["exception"]


def test_only_the_listed_harmless_warnings_are_dropped():
    keep = HarmlessWarningFilter().filter
    for logger_name, words, _why in logs.HARMLESS_WARNINGS:
        assert not keep(record(f"... {words} ...", name=f"{logger_name}.module", level=logging.WARNING))
    assert keep(record("`Siglip2ImageProcessor` requires torchvision", name="zimage_server.runner"))
    assert keep(record("CUDA out of memory", name="transformers.modeling_utils", level=logging.WARNING))


def test_a_logged_step_says_what_how_big_and_how_long(caplog):
    caplog.set_level(logging.INFO, logger="zimage_server.test")
    with logged_step(logging.getLogger("zimage_server.test"), "transformer", size_bytes=1_234_000_000):
        pass
    start, end = caplog.records
    assert start.getMessage() == "loading transformer (1.2 GB)..." and start.size_bytes == 1_234_000_000
    assert re.fullmatch(r"loaded transformer in \d+\.\d s", end.getMessage()) and end.seconds >= 0


@pytest.fixture
def restored_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def test_configure_logging_installs_one_handler_and_refuses_unknown_values(restored_root_logger):
    logs.configure_logging("json", "warning")
    (handler,) = restored_root_logger.handlers
    assert isinstance(handler.formatter, JsonFormatter) and restored_root_logger.level == logging.WARNING
    for bad in (("xml", "info"), ("text", "verbose")):
        with pytest.raises(ValueError):
            logs.configure_logging(*bad)


def test_model_libraries_log_through_the_root_handler(caplog, capfd):
    logs.route_model_library_logs()
    for name in ("diffusers.models", "transformers.modeling_utils", "torch._dynamo", "huggingface_hub.file_download"):
        logging.getLogger(name).warning("from %s", name)
        assert caplog.records[-1].getMessage() == f"from {name}"  # caplog listens on the root logger
    assert "from " not in capfd.readouterr().err  # and no handler of their own wrote it


def test_start_up_failures_are_one_line_in_the_chosen_format(tmp_path):
    from test_settings import run_cli

    env = {"MODELS_DIR": str(tmp_path), "Z_IMAGE_OFFLINE": "1", "Z_IMAGE_LOG_FORMAT": "json"}
    for args, code, words in (
        (("serve", "--max-queue", "-3"), 2, "--max-queue"),
        (("serve",), 3, "fetch it with: zimage-server download"),
        (("download",), 4, "offline mode is on"),
    ):
        result = run_cli(*args, env=env)
        [line] = result.stderr.strip().splitlines()
        record = parsed(line, "json")
        assert result.returncode == code and record["level"] == "CRITICAL" and words in record["message"], line
    # A log format that is itself the bad setting: the error comes in the default format.
    result = run_cli("serve", env=env | {"Z_IMAGE_LOG_FORMAT": "xml"})
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 2 and is_failure_line(line) and "Z_IMAGE_LOG_FORMAT" in line, line
