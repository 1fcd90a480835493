"""Operating the server, in process: API key, CORS, request ids and logs, metrics, draining,
out-of-memory recovery in the engine, and the settings that drive them."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest
import torch
from litestar.testing import TestClient

from conftest import serving
from test_images import encoded, picture
from zimage_server.api import create_app
from zimage_server.api.shutdown import drain
from zimage_server.cli import build_parser
from zimage_server.faults import FaultInjector
from zimage_server.pipelines import GenerationCancelled, GenerationSpec, OutOfMemoryForRequest, ZImageEngine
from zimage_server.settings import SettingsError, load_settings

URL = "/v1/images/generations"
EDITS = "/v1/images/edits"
SMALL = {"size": "64x64", "num_inference_steps": 2}
KEY = "sk-test-0123456789"


class Captured(logging.Handler):
    """Records of one logger, captured directly: Litestar's logging set-up replaces the root
    handlers (caplog's among them) whenever an app is created inside a test."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        self.logger.addHandler(self)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def assert_envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- settings ----------------------------------------------------------------------------------


def test_operations_settings_parse_and_the_api_key_is_never_shown():
    settings = load_settings(
        {
            "Z_IMAGE_API_KEY": KEY,
            "Z_IMAGE_CORS_ORIGINS": "https://a.example, http://localhost:3000/",
            "Z_IMAGE_DRAIN_TIMEOUT_S": "5",
        }
    )
    assert settings.api_key == KEY and settings.drain_timeout_s == 5
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
    assert KEY not in repr(settings) and "api_key='***'" in repr(settings)
    assert load_settings({}).api_key is None and load_settings({}).cors_origins == ()
    with pytest.raises(SettingsError, match="Z_IMAGE_CORS_ORIGINS"):
        load_settings({"Z_IMAGE_CORS_ORIGINS": "a.example"})
    with pytest.raises(SettingsError, match="Z_IMAGE_DRAIN_TIMEOUT_S"):
        load_settings({"Z_IMAGE_DRAIN_TIMEOUT_S": "-1"})


def test_serve_help_masks_the_api_key_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("Z_IMAGE_API_KEY", KEY)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "Z_IMAGE_API_KEY" in out and KEY not in out


def edit_form() -> list:
    return [
        ("prompt", (None, "a cat")),
        ("num_inference_steps", (None, "2")),
        ("image", ("image.png", encoded(picture()), "image/png")),
    ]


# --- API key and CORS --------------------------------------------------------------------------


def test_api_key_guards_v1_routes_and_leaves_probes_and_metrics_open(settings, engine):
    with serving(settings, engine, api_key=KEY) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Basic x"}):
            error = assert_envelope(client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key" and KEY not in str(error)
        # Refused before the body is read or validated.
        assert_envelope(client.post(URL, content=b"not json", headers={"content-type": "text/plain"}), 401)
        assert_envelope(client.post(EDITS, files=edit_form()), 401)
        authorised = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=authorised).status_code == 200
        assert client.post(URL, json={"prompt": "a", **SMALL}, headers=authorised).status_code == 200
        assert client.post(EDITS, files=edit_form(), headers=authorised).status_code == 200
        for open_path in ("/", "/health", "/ready", "/metrics", "/schema/openapi.json"):
            assert client.get(open_path).status_code == 200, open_path


def test_cors_is_off_by_default_and_allows_only_the_configured_origins(settings, engine):
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with serving(settings, engine) as client:
        response = client.options(URL, headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with serving(settings, engine, cors_origins=("https://app.example",)) as client:
        response = client.options(URL, headers=preflight)
        assert response.status_code in (200, 204)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        simple = client.get("/health", headers={"Origin": "https://app.example"})
        assert simple.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        other = client.get("/health", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# --- request ids and the request log -----------------------------------------------------------


def test_request_id_is_echoed_or_made_and_each_request_logs_one_line_with_its_timings(client):
    with Captured("zimage_server.access") as captured:
        exchange_a_few_requests(client)
    lines = [record.getMessage() for record in captured.records]
    (generation,) = [line for line in lines if "trace-42" in line]
    assert "route=/v1/images/generations status=200" in generation
    fields = dict(part.split("=", 1) for part in generation.split())
    assert fields["batch_size"] == "1"
    assert float(fields["queue_wait_ms"]) >= 0 and float(fields["pipeline_ms"]) > 0
    assert float(fields["total_ms"]) >= float(fields["pipeline_ms"])
    (missing,) = [line for line in lines if "route=/v1/nothing" in line]
    assert "status=404" in missing and "batch_size=-" in missing


def exchange_a_few_requests(client) -> None:
    response = client.post(URL, json={"prompt": "a", **SMALL}, headers={"X-Request-ID": "trace-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-42"
    made = client.get("/v1/nothing").headers["x-request-id"]
    assert made.startswith("req_") and len(made) > 10
    assert client.get("/health", headers={"X-Request-ID": "bad id\x7f"}).headers["x-request-id"].startswith("req_")


class ExplodingEngine(ZImageEngine):
    """The real engine, with a bug injected into every call."""

    def generate(self, specs):
        raise KeyError("secret internal detail at 0xdeadbeef")


def test_a_500_names_the_request_id_and_keeps_the_traceback_in_the_log(settings, engine):
    exploding = ExplodingEngine(engine.pipeline, settings, engine.device, engine.dtype)
    with serving(settings, exploding) as client, Captured("zimage_server") as captured:
        response = client.post(URL, json={"prompt": "a", **SMALL}, headers={"X-Request-ID": "boom-1"})
        error = assert_envelope(response, 500)
        assert "boom-1" in error["message"] and "0xdeadbeef" not in response.text and "KeyError" not in response.text
        failure = [record for record in captured.records if "boom-1" in record.getMessage() and record.exc_info]
        assert failure and failure[0].levelname == "ERROR"
        metrics = client.get("/metrics").text
        assert 'zimage_errors_total{type="KeyError"} 1.0' in metrics
        assert client.get("/ready").status_code == 200


# --- metrics -----------------------------------------------------------------------------------


def sample(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_metrics_report_queue_batches_images_and_http_and_apps_do_not_collide(settings, engine):
    with serving(settings, engine) as first, serving(settings, engine, max_queue=7) as second:
        assert first.post(URL, json={"prompt": "a", "n": 2, **SMALL}).status_code == 200
        assert first.post(EDITS, files=edit_form()).status_code == 200
        text = first.get("/metrics").text
        assert first.get("/metrics").headers["content-type"].startswith("text/plain")
        for name in (
            "zimage_queue_images", "zimage_queue_requests", "zimage_running_images", "zimage_batch_size_images_count",
            "zimage_pipeline_seconds_count", "zimage_images_generated_total", "zimage_queue_wait_seconds_count",
        ):
            assert name in text, name
        assert sample(text, "zimage_images_generated_total") == 3
        assert sample(text, "zimage_batch_size_images_sum") == 3
        assert sample(text, "zimage_batch_size_images_count") == 2
        assert sample(text, "zimage_queue_capacity_images") == settings.max_queue
        assert 'path="/v1/images/generations"' in text  # Litestar's HTTP metrics, by route
        assert 'path="/v1/images/edits"' in text
        assert 'path="/health"' not in text
        other = second.get("/metrics").text
        assert sample(other, "zimage_images_generated_total") == 0
        assert sample(other, "zimage_queue_capacity_images") == 7
        assert "zimage_gpu_memory_allocated_bytes" not in text  # CPU here: no GPU gauges


def test_rejections_and_timeouts_are_counted(settings, engine):
    with serving(settings, engine, request_timeout_s=0.3, max_queue=1) as client:
        engine.lock.acquire()
        try:
            assert client.post(URL, json={"prompt": "slow", **SMALL}).status_code == 504
        finally:
            engine.lock.release()
        assert client.post(URL, json={"prompt": "a", "n": 2, **SMALL}).status_code == 429  # more than the queue holds
        text = client.get("/metrics").text
        assert sample(text, "zimage_requests_timed_out_total") == 1
        assert sample(text, 'zimage_requests_rejected_total{reason="queue_full"}') == 1


# --- draining ----------------------------------------------------------------------------------


def test_a_draining_server_is_not_ready_and_refuses_new_work_with_retry_after(settings, engine):
    with serving(settings, engine) as client:
        assert client.get("/ready").status_code == 200
        client.blocking_portal.call(drain, client.app, 5.0)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        response = client.post(URL, json={"prompt": "a", **SMALL})
        assert assert_envelope(response, 503)["code"] == "shutting_down"
        assert response.headers["retry-after"]
        assert client.get("/health").status_code == 200
        assert "zimage_ready 0.0" in client.get("/metrics").text


def test_draining_lets_running_and_queued_work_finish(settings, engine):
    app = create_app(settings, engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        results: list[int] = []

        def send(size: str) -> None:
            results.append(client.post(URL, json={"prompt": "drain me", "size": size, "num_inference_steps": 2}).status_code)

        def until(text: str) -> None:
            for _ in range(500):
                if text in client.get("/metrics").text:
                    return
                time.sleep(0.01)
            raise AssertionError(f"never saw {text}")

        engine.lock.acquire()
        senders = [threading.Thread(target=send, args=("64x64",)), threading.Thread(target=send, args=("128x64",))]
        try:
            senders[0].start()
            until("zimage_running_images 1.0")
            senders[1].start()
            until("zimage_queue_requests 1.0")
            draining = client.blocking_portal.start_task_soon(drain, app, 30.0)
            until("zimage_ready 0.0")
        finally:
            engine.lock.release()
        draining.result(timeout=30)
        for sender in senders:
            sender.join(timeout=30)
        assert results == [200, 200]


# --- out of memory, in the engine --------------------------------------------------------------


def spec(prompt: str, n: int = 1, size: int = 64) -> GenerationSpec:
    return GenerationSpec(
        prompt=prompt, negative_prompt=None, seeds=tuple(range(n)), width=size, height=size, num_inference_steps=2,
        guidance_scale=0.0, cfg_normalization=False, cfg_truncation=1.0, max_sequence_length=64,
    )


@pytest.mark.parametrize("oom_error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_retries_requests_one_by_one_and_fails_only_the_one_that_cannot_fit(engine, oom_error):
    calls = []

    def run(specs):
        calls.append([s.prompt for s in specs])
        if len(specs) > 1 or specs[0].prompt == "huge":
            raise oom_error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [[f"image of {specs[0].prompt}"] * len(specs[0].seeds)]

    results = engine.recovering(run)([spec("a"), spec("huge", n=2, size=128), spec("b")])
    assert calls == [["a", "huge", "b"], ["a"], ["huge"], ["b"]]
    assert results[0] == ["image of a"] and results[2] == ["image of b"]
    assert isinstance(results[1], OutOfMemoryForRequest)
    assert "2 images of 128x128" in str(results[1])
    # A lone request is not retried: PyTorch already freed its cache and retried once.
    calls.clear()
    (lone,) = engine.recovering(run)([spec("huge")])
    assert calls == [["huge"]] and isinstance(lone, OutOfMemoryForRequest)


def test_other_errors_are_not_swallowed_by_the_recovery(engine):
    def run(specs):
        raise RuntimeError("device on fire")

    with pytest.raises(RuntimeError):
        engine.recovering(run)([spec("a"), spec("b")])


def test_injected_faults_fire_inside_the_real_pipeline_call(settings, engine):
    faulty = ZImageEngine(engine.pipeline, settings, engine.device, engine.dtype)
    faulty.faults = FaultInjector()
    results = faulty.recovering(faulty.generate)(
        [spec("a cat"), spec("a big cat [[fault:oom]]"), spec("shared [[fault:oom-shared]]")]
    )
    assert len(results[0]) == 1 and len(results[2]) == 1
    assert isinstance(results[1], OutOfMemoryForRequest)


def test_fault_injection_is_off_unless_the_env_var_turns_it_on(monkeypatch, engine):
    monkeypatch.delenv("Z_IMAGE_FAULT_INJECTION", raising=False)
    assert FaultInjector.from_env() is None and engine.faults is None
    monkeypatch.setenv("Z_IMAGE_FAULT_INJECTION", "1")
    assert FaultInjector.from_env() is not None


def test_a_cancelled_request_is_skipped_in_the_one_by_one_retry(engine):
    class Gone:
        cancelled = True

        def on_step(self, *args):
            pass

    def run(specs):
        if len(specs) > 1:
            raise MemoryError()
        return [["ok"]]

    gone = GenerationSpec(**{**spec("gone").__dict__, "observer": Gone()})
    results = engine.recovering(run)([spec("a"), gone])
    assert results[0] == ["ok"] and isinstance(results[1], GenerationCancelled)


def test_the_job_observer_follows_its_future():
    from zimage_server.api.jobs import JobObserver, observed

    async def check():
        payload, observer = observed(spec("a"))
        assert payload.observer is observer and not observer.cancelled
        observer.future = asyncio.get_running_loop().create_future()
        assert not observer.cancelled
        observer.future.cancel()
        assert observer.cancelled
        assert observed("not a spec") == ("not a spec", None)
        assert isinstance(observer, JobObserver)

    asyncio.run(check())
