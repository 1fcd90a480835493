"""What the running server holds, as one typed object on `app.state.server`.

Routes, guards, metrics and the shutdown path all read it; nothing else is kept on Litestar's
string-keyed `State`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from litestar.connection import ASGIConnection
from litestar.datastructures import State

from ..faults import FaultInjector
from ..keys import ApiKeys
from ..lora_library import LoraInfo
from ..settings import Settings
from ..variants import VARIANTS, Variant

if TYPE_CHECKING:  # the runner imports torch; the API only holds it
    from ..batcher import Batcher
    from ..content_credentials import ContentCredentials
    from ..gallery import Gallery
    from ..job_queue import JobQueue
    from .async_jobs import JobRunner
    from .webhook_targets import WebhookTargets
    from ..runner import ModelRunner
    from ..signed_urls import UrlSigner
    from .observability import ServerMetrics

# Fetches the model the settings name (fetch-on-start); raises if it cannot.
FetchModel = Callable[[Settings], Awaitable[None]]


@dataclass(eq=False)
class ServerState:
    settings: Settings
    runner: ModelRunner | None = None  # set once the model is loaded (or handed in by a test)
    fetch_model: FetchModel | None = None
    faults: FaultInjector | None = None  # test-only: passed to the runner it loads
    batcher: Batcher | None = None
    credentials: ContentCredentials | None = None  # signs outputs with C2PA (Z_IMAGE_C2PA_CERT/_KEY)
    api_keys: ApiKeys = field(default_factory=lambda: ApiKeys({}))  # re-read on SIGHUP
    gallery: Gallery | None = None  # the image store and index, once open; None with Z_IMAGE_STORE=none
    gallery_error: str | None = None  # why there is no gallery: what a url response's 503 says
    signer: UrlSigner | None = None  # signs image links, with the gallery
    upkeep: asyncio.Task | None = None  # reconciles the store at start, then sweeps it (retention)
    job_queue: JobQueue | None = None  # the durable queue of async jobs, in the index
    job_runner: JobRunner | None = None  # takes async jobs from it while the batcher has room
    webhooks: WebhookTargets | None = None
    enhancer: Any = None  # the prompt enhancer (api/prompts.py), once the model is loaded; None when off
    mcp: Any = None  # the MCP server (api/mcp_tools.py), with Z_IMAGE_MCP=on
    mcp_app: Any = None  # its Streamable HTTP ASGI app, mounted at /mcp
    idle_watch: asyncio.Task | None = None  # unloads the model when idle (Z_IMAGE_IDLE_UNLOAD_S > 0)
    metrics: ServerMetrics | None = None
    ready: bool = False  # loaded, warmed up, taking work
    draining: bool = False  # a signal arrived: finishing accepted work, refusing new
    worker_died: bool = False  # the batcher's worker ended: not ready, the process exits
    fatal_error: str | None = None  # why serving could not start (fetch-on-start failed)
    stop_server: Callable[[], None] | None = None  # the CLI points this at uvicorn
    checkpoint_sha256: str | None = None  # the served model folder's id (model_layout), set once it is loaded
    started_at: float = field(default_factory=time.time)

    @property
    def variant(self) -> Variant:
        return VARIANTS[self.settings.variant]

    @property
    def taking_work(self) -> bool:
        return self.ready and not self.draining and not self.worker_died

    async def usable_loras(self) -> list[LoraInfo]:
        """The LoRA folder's usable files; none with LoRA off. Reading a new file for its rank and
        hash takes a while, so it runs off the event loop (and is cached by the file's identity)."""
        library = self.runner.lora_library
        return await asyncio.to_thread(library.list) if library is not None else []

    def stop(self, reason: str) -> None:
        """Serving cannot go on: stop saying ready and ask the server to exit."""
        self.ready = False
        self.fatal_error = self.fatal_error or reason
        if self.stop_server is not None:
            self.stop_server()


def server_state(source: State | ASGIConnection) -> ServerState:
    state = source.app.state if isinstance(source, ASGIConnection) else source
    return state.server
