"""Metrics and request logs: what an operator watches.

- `ServerMetrics`: our Prometheus metrics, in a registry of their own per app (several apps in one
  process, as in the tests, never collide). Queue depth and GPU memory are read at scrape time.
  Litestar's Prometheus middleware adds the HTTP side (requests, durations, by route template).
- `RequestLog`: ASGI middleware around the whole app, 404s included. It takes the request id from
  `X-Request-ID` (or makes one), echoes it in the response, and writes one line per request:
  id, route, status, queue wait, batch size, pipeline time, total time.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from litestar import Request, Response, get
from litestar.datastructures import MutableScopeHeaders, State
from litestar.plugins.prometheus import PrometheusConfig
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .state import ServerState

from ..batcher import BatchReport, Job
from ..specs import GenerationCancelled

access_log = logging.getLogger("zimage_server.access")

REQUEST_ID_KEY = "zimage_request_id"
JOB_KEY = "zimage_job"
# Ids we accept from clients: short and printable, so they are safe to echo and to log.
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
# Probes and scrapes would drown the per-route HTTP metrics; they are counted nowhere.
UNMEASURED_PATHS = ["^/metrics$", "^/health$", "^/ready$"]


def http_metrics_config() -> PrometheusConfig:
    """Litestar's HTTP metrics, labelled by route template so paths do not explode cardinality."""
    return PrometheusConfig(app_name="zimage-server", prefix="zimage_http", group_path=True, exclude=UNMEASURED_PATHS)


class ServerMetrics:
    """zimage_* metrics for one app, fed by the batcher's reports and the request log."""

    def __init__(self, server: ServerState):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry

        def batcher_value(name: str):
            return lambda: getattr(server.batcher, name, 0)

        # The Kubernetes HPA scales on zimage_queue_images; keep the name.
        Gauge("zimage_queue_images", "Images waiting in the queue (not yet running)", registry=registry).set_function(
            batcher_value("queued_images")
        )
        Gauge("zimage_queue_requests", "Requests waiting in the queue", registry=registry).set_function(
            batcher_value("queued_jobs")
        )
        Gauge("zimage_running_images", "Images in the pipeline call now running", registry=registry).set_function(
            batcher_value("running_images")
        )
        Gauge(
            "zimage_requests_dropped",
            "Queued requests dropped unrun since start because their client left or they timed out",
            registry=registry,
        ).set_function(lambda: server.batcher.stats.dropped if server.batcher is not None else 0)
        Gauge("zimage_queue_capacity_images", "Z_IMAGE_MAX_QUEUE: queued images before 429", registry=registry).set(
            server.settings.max_queue
        )
        Gauge("zimage_ready", "1 while the server takes new work", registry=registry).set_function(
            lambda: float(server.taking_work)
        )

        def runner_value(name: str):
            return lambda: float(getattr(server.runner, name, None) or 0)

        Gauge(
            "zimage_model_resident", "1 while the model's weights are loaded, 0 while it sleeps", registry=registry
        ).set_function(runner_value("resident"))
        Gauge(
            "zimage_model_wakes", "Times the model was reloaded after sleeping, since start", registry=registry
        ).set_function(runner_value("wakes"))
        Gauge(
            "zimage_model_last_wake_seconds",
            "Seconds the last reload after sleeping took (0: none yet)",
            registry=registry,
        ).set_function(runner_value("last_wake_s"))
        self.batch_images = Histogram(
            "zimage_batch_size_images",
            "Images per pipeline call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
            registry=registry,
        )
        self.pipeline_seconds = Histogram(
            "zimage_pipeline_seconds",
            "Seconds per pipeline call (one batch), failed calls included",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300),
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "zimage_queue_wait_seconds",
            "Seconds a request waited in the queue before its batch started",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=registry,
        )
        self.images = Counter("zimage_images_generated", "Images generated and handed out", registry=registry)
        self.rejected = Counter(
            "zimage_requests_rejected",
            "Requests refused before queueing: queue full (429) or not taking work (503)",
            ["reason"],
            registry=registry,
        )
        self.timed_out = Counter(
            "zimage_requests_timed_out", "Requests that waited past Z_IMAGE_REQUEST_TIMEOUT_S (504)", registry=registry
        )
        self.errors = Counter(
            "zimage_errors",
            "Failures by exception type (pipeline calls, requests, handlers)",
            ["type"],
            registry=registry,
        )
        self.cancelled_batches = Counter(
            "zimage_batches_cancelled", "Pipeline calls stopped early because every client left", registry=registry
        )
        self.store_errors = Counter(
            "zimage_store_errors",
            "Failed image store or index operations (writes, reads, deletes); b64_json answers go out regardless",
            registry=registry,
        )
        Gauge(
            "zimage_store_pending_writes", "Requests whose images are still being written to the store", registry=registry
        ).set_function(lambda: server.gallery.pending_writes if server.gallery is not None else 0)
        Gauge(
            "zimage_jobs_queued",
            "Async jobs waiting in the shared queue (every replica's, as this one last saw it); scale on this",
            registry=registry,
        ).set_function(lambda: server.job_runner.queued if server.job_runner is not None else 0)
        registry.register(GpuMemoryCollector(server))
        registry.register(EnhancerFallbackCollector(server))

    def record_batch(self, report: BatchReport) -> None:
        """The batcher's listener: one call done (on the event loop thread)."""
        self.batch_images.observe(report.images)
        self.pipeline_seconds.observe(report.seconds)
        for job in report.jobs:
            if job.queue_wait_s is not None:
                self.queue_wait_seconds.observe(job.queue_wait_s)
        if report.quiet:
            self.cancelled_batches.inc()
            return
        if report.error is not None:
            self.errors.labels(type=type(report.error).__name__).inc()
            return
        for error in report.job_errors:
            if not isinstance(error, GenerationCancelled):
                self.errors.labels(type=type(error).__name__).inc()
        self.images.inc(report.images_made)

    def record_response(self, path: str, status: int) -> None:
        if not path.startswith("/v1/"):
            return
        if status == 429:
            self.rejected.labels(reason="queue_full").inc()
        elif status == 503:
            self.rejected.labels(reason="unavailable").inc()
        elif status == 504:
            self.timed_out.inc()

    def record_unhandled(self, exc: BaseException) -> None:
        self.errors.labels(type=type(exc).__name__).inc()

    def exposition(self) -> bytes:
        # The global registry holds Litestar's HTTP metrics and the process collector (RSS, CPU).
        return generate_latest(REGISTRY) + generate_latest(self.registry)


class GpuMemoryCollector:
    """GPU memory gauges, read from the runner at scrape time; absent when not on CUDA."""

    def __init__(self, server: ServerState):
        self.server = server

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runner = self.server.runner
        stats = runner.memory_stats() if runner is not None else None
        if not stats:
            return
        for key, help_text in (
            ("allocated", "GPU memory in use by tensors"),
            ("reserved", "GPU memory held by the caching allocator"),
            ("peak", "Peak GPU memory in use by tensors since start"),
        ):
            yield GaugeMetricFamily(f"zimage_gpu_memory_{key}_bytes", help_text, value=stats[key])


class EnhancerFallbackCollector:
    """The prompt enhancer's fallbacks by reason (prompt_enhancer.py counts them as they happen)."""

    def __init__(self, server: ServerState):
        self.server = server

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        enhancer = self.server.enhancer
        if enhancer is None:
            return
        family = CounterMetricFamily(
            "zimage_prompt_enhancer_fallbacks",
            "Prompts generated as written because the enhancer's answer was unusable (empty, refusal, "
            "lost_quotes, backend_error, timeout) or skipped (skipped_prefix)",
            labels=["reason"],
        )
        for reason, count in sorted(enhancer.fallbacks.items()):
            family.add_metric([reason], count)
        yield family


@get("/metrics", summary="Prometheus metrics.", include_in_schema=False, sync_to_thread=False)
def metrics_endpoint(state: State) -> Response[bytes]:
    return Response(state.server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


def request_id_of(scope: Scope) -> str | None:
    return scope.get("state", {}).get(REQUEST_ID_KEY)


# Request ids: a random per-process prefix and a counter, unique across restarts without a call
# to the OS's random source per request (0.5 ms each in a gVisor sandbox, on the event loop).
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_numbers = itertools.count()


def new_request_id() -> str:
    return f"req_{_REQUEST_ID_PREFIX}{next(_request_numbers) % 2**48:012x}"


class RequestLog:
    """ASGI middleware: request id in and out, one access line per request, status counts for metrics."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        incoming = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        incoming_id = incoming.decode("latin-1")
        request_id = incoming_id if CLIENT_REQUEST_ID.match(incoming_id) else new_request_id()
        scope.setdefault("state", {})[REQUEST_ID_KEY] = request_id
        status = 500  # what the client sees if the app dies before it answers

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableScopeHeaders.from_message(message)["x-request-id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.record_response(scope["path"], status)
            job: Job | None = scope["state"].get(JOB_KEY)
            fields = {
                "request_id": request_id,
                "method": scope.get("method", "-"),
                "route": scope.get("path_template") or _short(scope["path"]),
                "status": status,
                "queue_wait_ms": _ms(job.queue_wait_s if job else None),
                "batch_size": job.batch_images if job else None,
                "pipeline_ms": _ms(job.run_s if job else None),
                "total_ms": _ms(time.monotonic() - started),
            }
            # key=value text for people; the same fields as record attributes for the JSON log.
            text = " ".join(f"{key}={'-' if value is None else value}" for key, value in fields.items())
            access_log.info(text, extra=fields)


def remember_job(request: Request, job: Job) -> None:
    """Let the request log report this request's queue wait, batch and pipeline time."""
    request.scope["state"][JOB_KEY] = job


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _short(path: str) -> str:
    # Unrouted paths are client-chosen: keep the log line bounded and on one line.
    return path[:80].encode("unicode_escape").decode("ascii")


def install_request_log(app: Any, metrics: ServerMetrics) -> None:
    """Wrap the app's whole ASGI handler (routing and exception handling included), so 404s are logged too."""
    app.asgi_handler = RequestLog(app.asgi_handler, metrics)
