"""The Litestar app factory. uvicorn, the tests and the Dockerfile all build the app here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from .. import __version__
from ..batcher import Batcher
from ..pipelines import GenerationCancelled, ZImageEngine, load_engine
from ..settings import Settings
from .auth import require_api_key
from .edits import edits_router
from .errors import EXCEPTION_HANDLERS
from .observability import ServerMetrics, http_metrics_config, install_request_log, metrics_endpoint
from .page import PAGE_ROUTES
from .routes import ROUTES

log = logging.getLogger("zimage_server.api")

# Fetches the model the settings name (fetch-on-start); raises if it cannot.
FetchModel = Callable[[Settings], Awaitable[None]]


async def start_serving(state: State) -> None:
    """Load the model (unless one was handed in) and start the batcher; the app is ready after this."""
    settings: Settings = state.settings
    if state.engine is None:
        # Off the event loop: loading takes seconds to minutes and must not block the loop.
        state.engine = await asyncio.to_thread(load_engine, settings)
    engine: ZImageEngine = state.engine
    batcher = Batcher(
        engine.recovering(engine.generate),
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        batch_wait_s=settings.batch_wait_ms / 1000,
        quiet_errors=(GenerationCancelled,),
        on_batch=state.metrics.record_batch,
    )
    batcher.start()
    state.batcher = batcher
    state.ready = True
    log.info("ready: z-image-%s on %s", settings.variant, engine.device)


async def fetch_then_serve(state: State, fetch_model: FetchModel) -> None:
    """Fetch-on-start: download the missing model while /health answers, then load it. A failure stops the server."""
    try:
        await fetch_model(state.settings)
        await start_serving(state)
    except Exception as exc:
        log.error("cannot serve: %s; stopping", exc)
        state.fatal_error = str(exc)
        if state.stop_server is not None:
            state.stop_server()


@asynccontextmanager
async def model_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Load the model before accepting requests (or, to fetch it first, in the background), and stop on the way out."""
    state = app.state
    starting = None
    if state.fetch_model is None:
        await start_serving(state)
    else:
        starting = asyncio.create_task(fetch_then_serve(state, state.fetch_model))
    try:
        yield
    finally:
        # Usually already drained by the signal handler (api/shutdown.py); if not, drain here.
        state.ready = False
        if starting is not None:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        if state.get("batcher") is not None:
            await state.batcher.stop(state.settings.drain_timeout_s)


def cors_config(settings: Settings) -> CORSConfig | None:
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=["X-Request-ID", "X-Seed", "Retry-After"],
    )


def create_app(
    settings: Settings, engine: ZImageEngine | None = None, *, fetch_model: FetchModel | None = None
) -> Litestar:
    """The app for these settings. Pass an already loaded engine to share one across apps (tests).

    fetch_model: download the missing model after the server starts (fetch-on-start); until it is
    loaded /health answers and /ready and the generation routes answer 503. If it fails, the app
    records `fatal_error` and calls `state.stop_server`, which the CLI points at uvicorn.
    """
    state = State(
        {
            "settings": settings,
            "engine": engine,
            "fetch_model": fetch_model,
            "stop_server": None,
            "fatal_error": None,
            "ready": False,
            "draining": False,
            "started_at": time.time(),
        }
    )
    state.metrics = ServerMetrics(state)
    app = Litestar(
        route_handlers=[*ROUTES, edits_router(settings), *PAGE_ROUTES, metrics_endpoint],
        lifespan=[model_lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        guards=[require_api_key],
        middleware=[http_metrics_config().middleware],
        cors_config=cors_config(settings),
        state=state,
        openapi_config=OpenAPIConfig(title="zimage-server", version=__version__),
        # Litestar's default logging config replaces the root handler; logs.py's serves the whole process.
        logging_config=None,
    )
    install_request_log(app, state.metrics)
    return app
