"""The Litestar app factory. uvicorn, the tests and the Dockerfile all build the app here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from .. import __version__
from ..batcher import Batcher
from ..pipelines import ZImageEngine, load_engine
from ..settings import Settings
from .errors import EXCEPTION_HANDLERS
from .routes import ROUTES

log = logging.getLogger("zimage_server.api")


@asynccontextmanager
async def model_lifespan(app: Litestar) -> AsyncIterator[None]:
    """Load the model (unless one was handed in), start the batcher, and stop it on the way out."""
    state = app.state
    settings: Settings = state.settings
    if state.engine is None:
        # Off the event loop: loading takes seconds to minutes and must not block the loop.
        state.engine = await asyncio.to_thread(load_engine, settings)
    engine: ZImageEngine = state.engine
    batcher = Batcher(
        engine.generate,
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        batch_wait_s=settings.batch_wait_ms / 1000,
    )
    batcher.start()
    state.batcher = batcher
    state.ready = True
    log.info("ready: z-image-%s on %s", settings.variant, engine.device)
    try:
        yield
    finally:
        state.ready = False
        await batcher.stop()


def create_app(settings: Settings, engine: ZImageEngine | None = None) -> Litestar:
    """The app for these settings. Pass an already loaded engine to share one across apps (tests)."""
    return Litestar(
        route_handlers=ROUTES,
        lifespan=[model_lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        state=State({"settings": settings, "engine": engine, "ready": False, "started_at": time.time()}),
        openapi_config=OpenAPIConfig(title="zimage-server", version=__version__),
    )
