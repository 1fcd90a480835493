"""What an operator sees: request ids, the request log, 500s that keep their details in the log, metrics."""

from __future__ import annotations

from conftest import Captured, assert_envelope, serving
from test_auth import EDITS, SMALL, URL, edit_form
from zimage_server.runner import ModelRunner


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
    replaced = client.get("/health", headers={"X-Request-ID": "bad id\x7f"}).headers["x-request-id"]
    assert replaced.startswith("req_") and replaced != made  # every made id is new


class ExplodingRunner(ModelRunner):
    """The real runner, with a bug injected into every call."""

    def run_call(self, params, rows):
        raise KeyError("secret internal detail at 0xdeadbeef")


def test_a_500_names_the_request_id_and_keeps_the_traceback_in_the_log(settings, runner):
    exploding = ExplodingRunner(runner.pipeline, settings, runner.device, runner.dtype)
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


def test_metrics_report_queue_batches_images_and_http_and_apps_do_not_collide(settings, runner):
    with serving(settings, runner) as first, serving(settings, runner, max_queue=7) as second:
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


def test_rejections_and_timeouts_are_counted(settings, runner):
    with serving(settings, runner, request_timeout_s=0.3, max_queue=1) as client:
        runner.lock.acquire()
        try:
            assert client.post(URL, json={"prompt": "slow", **SMALL}).status_code == 504
        finally:
            runner.lock.release()
        assert client.post(URL, json={"prompt": "a", "n": 2, **SMALL}).status_code == 429  # more than the queue holds
        text = client.get("/metrics").text
        assert sample(text, "zimage_requests_timed_out_total") == 1
        assert sample(text, 'zimage_requests_rejected_total{reason="queue_full"}') == 1
