"""The Litestar app factory. uvicorn, the tests and the Dockerfile all build the app here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from .. import __version__
from ..batcher import Batcher
from ..content_credentials import ContentCredentials
from ..faults import FaultInjector
from ..gallery import Gallery, keep_tidy
from ..idle import AllIdle, unload_when_idle
from ..index import INDEX_FAILURES, IndexUnavailable, open_index
from ..job_queue import JobQueue
from ..keys import ApiKeys
from ..model_layout import checkpoint_sha256
from ..model_thread import model_thread
from ..policy import BatchPolicy
from ..settings import Settings
from ..signed_urls import UrlSigner
from ..specs import GenerationCancelled
from ..store import ImageStore, first_line
from .async_jobs import JobRunner
from .auth import require_api_key
from .errors import EXCEPTION_HANDLERS
from .observability import ServerMetrics, http_metrics_config, install_request_log, metrics_endpoint
from .page import PAGE_ROUTES
from .edits import create_edit
from .history import HISTORY_ROUTES
from .job_routes import JOB_ROUTES
from .mcp_tools import build_mcp, mcp_endpoint
from .prompts import build_enhancer, enhance_prompt
from .shutdown import SEND_GRACE_S
from .webhook_targets import WebhookTargets
from .routes import ROUTES, create_images
from .sdapi import controlnet_router, sdapi_router
from .state import FetchModel, ServerState

if TYPE_CHECKING:
    from ..runner import ModelRunner

log = logging.getLogger("zimage_server.api")


def load_model(server: ServerState) -> ModelRunner:
    # Imported here: the runner brings torch, which the rest of the API never needs.
    from ..runner import load_runner

    return load_runner(server.settings, server.faults)


async def start_serving(server: ServerState) -> None:
    """Load the model (unless one was handed in) and start the batcher; the app is ready after this."""
    settings = server.settings
    if server.runner is None:
        # On the model's thread, where all its torch work runs: off the event loop, which loading
        # (seconds to minutes) must not block.
        server.runner = await model_thread().run(load_model, server)
    server.checkpoint_sha256 = await asyncio.to_thread(checkpoint_sha256, settings.model_dir)
    server.enhancer = build_enhancer(settings, server.runner)
    batcher = Batcher(
        BatchPolicy(server.runner, settings.max_batch_size),
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        max_queue_per_owner=settings.max_queue_per_key,
        batch_wait_s=settings.batch_wait_ms / 1000,
        quiet_errors=(GenerationCancelled,),
        on_batch=server.metrics.record_batch,
        on_worker_died=lambda _: worker_died(server),
        executor=model_thread().executor,
    )
    batcher.start()
    server.batcher = batcher
    # The resident enhancer's turns are model work the batcher does not see: the model must not
    # sleep between them.
    backend = getattr(server.enhancer, "backend", None)
    idle_sources = [batcher] + ([backend] if hasattr(backend, "idle_for") else [])
    if settings.idle_unload_s > 0:
        server.idle_watch = asyncio.create_task(
            unload_when_idle(AllIdle(*idle_sources), server.runner, settings.idle_unload_s, model_thread().run),
            name="idle-unload",
        )
    if server.job_runner is not None:
        server.job_runner.start_taking()
    server.ready = True
    log.info("ready: %s on %s", server.variant.model_name, server.runner.device)


def worker_died(server: ServerState) -> None:
    """No queued job can run any more: /ready turns 503 and the process exits non-zero, so an
    orchestrator restarts it instead of routing requests to a server that never answers them."""
    server.worker_died = True
    server.stop("the batcher's worker stopped")


async def fetch_then_serve(server: ServerState, fetch_model: FetchModel) -> None:
    """Fetch-on-start: download the missing model while /health answers, then load it. A failure stops the server."""
    try:
        await fetch_model(server.settings)
        await start_serving(server)
    except Exception as exc:
        log.error("cannot serve: %s; stopping", exc)
        server.stop(str(exc))


async def open_gallery(server: ServerState) -> None:
    """Open the image store and index, then repair and sweep them in the background. A store or
    index that cannot be opened leaves the server serving without one (b64_json works; url answers
    503 with the reason), as `zimage-server serve` has checked both before starting."""
    settings = server.settings
    index = None
    try:
        store = ImageStore.from_setting(settings.store)
        if store is None:
            server.gallery_error = "this server keeps no images (Z_IMAGE_STORE=none)"
            return
        index = await open_index(settings.index_url)
        secret = settings.url_secret or await index.url_secret()
    except (IndexUnavailable, ValueError, RuntimeError, *INDEX_FAILURES) as exc:
        server.gallery_error = f"the image store is unavailable ({first_line(exc)})"
        log.error("%s; serving without it", server.gallery_error)
        if index is not None:
            await index.close()
        return
    server.signer = UrlSigner(secret.encode(), settings.url_ttl_s)
    server.gallery = Gallery(store, index, on_store_error=server.metrics.store_errors.inc)
    server.job_queue = JobQueue(index)
    # From now, not from when the model is ready: the job routes answer while it loads.
    server.job_runner = JobRunner(server, server.job_queue)
    server.upkeep = asyncio.create_task(
        keep_tidy(
            server.gallery, settings.store_max_age_s, settings.store_max_bytes_count, also=server.job_queue.prune
        ),
        name="store-upkeep",
    )
    log.info("keeping images in %s, indexed in %s", store.description, index.description)


async def close_gallery(server: ServerState) -> None:
    """After the drain: the writes still pending finish (bounded), then the index closes."""
    if server.upkeep is not None:
        server.upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await server.upkeep
    if server.gallery is not None:
        await server.gallery.drain(server.settings.drain_timeout_s)
        await server.gallery.index.close()


@asynccontextmanager
async def model_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Load the model before accepting requests (or, to fetch it first, in the background), and stop on the way out."""
    server: ServerState = app.state.server
    await open_gallery(server)  # first: the history answers while the model loads
    async with contextlib.AsyncExitStack() as stack:
        if server.mcp is not None:  # a mounted app's own lifespan never runs: its session manager runs here
            await stack.enter_async_context(server.mcp.session_manager.run())
        async with serving_model(app, server):
            yield


@asynccontextmanager
async def serving_model(app: Litestar, server: ServerState) -> AsyncIterator[None]:
    """The model and everything that runs it: loaded (or fetched) now, drained and stopped after."""
    starting = None
    if server.fetch_model is None:
        await start_serving(server)
    else:
        starting = asyncio.create_task(fetch_then_serve(server, server.fetch_model))
    try:
        yield
    finally:
        # Usually already drained by the signal handler (api/shutdown.py); if not, drain here.
        server.ready = False
        if server.idle_watch is not None:
            server.idle_watch.cancel()
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        if server.job_runner is not None:
            server.job_runner.pause()
        if server.batcher is not None:
            await server.batcher.stop(server.settings.drain_timeout_s)
        if server.job_runner is not None:
            await server.job_runner.stop(SEND_GRACE_S)
        close_enhancer = getattr(getattr(server.enhancer, "backend", None), "aclose", None)
        if close_enhancer is not None:  # a chat endpoint's connection pool
            await close_enhancer()
        await close_gallery(server)


def uploads_router(settings: Settings) -> Router:
    """The routes that take images (an edit's uploads, a generation's base64 control image) under this
    server's upload limit, which Litestar enforces while the body streams in."""
    return Router(
        path="/", route_handlers=[create_images, create_edit], request_max_body_size=settings.max_upload_bytes
    )


def cors_config(settings: Settings) -> CORSConfig | None:
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["X-Request-ID", "X-Seed", "Retry-After"],
    )


def create_app(
    settings: Settings,
    runner: ModelRunner | None = None,
    *,
    fetch_model: FetchModel | None = None,
    faults: FaultInjector | None = None,
) -> Litestar:
    """The app for these settings. Pass an already loaded runner to share one across apps (tests).

    fetch_model: download the missing model after the server starts (fetch-on-start); until it is
    loaded /health answers and /ready and the generation routes answer 503. If it fails, the app
    records `fatal_error` and calls `stop_server`, which the CLI points at uvicorn.
    faults: test-only fault injection, handed to the runner this app loads.
    """
    server = ServerState(settings=settings, runner=runner, fetch_model=fetch_model, faults=faults)
    server.api_keys = ApiKeys.load(settings.api_key, settings.api_keys_file)
    server.webhooks = WebhookTargets(settings)
    if settings.mcp == "on":
        server.mcp, server.mcp_app = build_mcp(server)
    server.credentials = ContentCredentials.from_settings(settings)
    server.metrics = ServerMetrics(server)
    app = Litestar(
        route_handlers=[
            *ROUTES,
            *JOB_ROUTES,
            enhance_prompt,
            *([mcp_endpoint] if settings.mcp == "on" else []),
            *HISTORY_ROUTES,
            uploads_router(settings),
            sdapi_router(settings),
            controlnet_router(),
            *PAGE_ROUTES,
            metrics_endpoint,
        ],
        lifespan=[model_lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        guards=[require_api_key],
        middleware=[http_metrics_config().middleware],
        cors_config=cors_config(settings),
        state=State({"server": server}),
        openapi_config=OpenAPIConfig(title="zimage-server", version=__version__),
        # Litestar's default logging config replaces the root handler; logs.py's serves the whole process.
        logging_config=None,
    )
    install_request_log(app, server.metrics)
    return app
