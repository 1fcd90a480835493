"""Graceful shutdown: on SIGTERM or SIGINT, finish what was accepted, refuse the rest, exit 0.

uvicorn on its own stops listening at the first signal and then re-raises the signal once it is
done, so the process dies "killed by SIGTERM" and load balancers see connection refusals instead
of a 503. `DrainingServer` handles the signal itself instead:

1. `/ready` turns 503 and new work gets 503 with Retry-After, while the port stays open so probes
   and load balancers can see it;
2. the batcher runs everything already queued, bounded by Z_IMAGE_DRAIN_TIMEOUT_S (what is left
   then fails with 503, and a running pipeline call stops at its next step);
3. uvicorn's own shutdown follows: it waits for in-flight responses to be sent, runs the
   lifespan shutdown, and `serve` returns, so the process exits 0.

A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import FrameType

import uvicorn
from litestar import Litestar

from ..keys import ApiKeys, KeysFileError
from ..settings import Settings
from .state import ServerState

log = logging.getLogger("zimage_server.shutdown")

# Time to send the answers once the batcher has drained: encoding and writing, nothing more.
SEND_GRACE_S = 5.0


async def drain(app: Litestar, timeout: float) -> None:
    """Stop taking work and wait (at most `timeout` s) for every accepted job to get its answer."""
    server = app.state.server
    if server.draining:
        return
    server.draining = True
    if server.job_runner is not None:
        server.job_runner.pause()  # queued async jobs stay queued: the next start or another replica runs them
    batcher = server.batcher
    if batcher is None:  # still loading: nothing was accepted
        return
    log.info(
        "draining: refusing new work; waiting up to %g s for %d queued and %d running images",
        timeout,
        batcher.queued_images,
        batcher.running_images,
    )
    started = time.monotonic()
    await batcher.stop(timeout)
    if server.gallery is not None:  # the images of answers already sent are still being written
        await server.gallery.drain(max(0.0, timeout - (time.monotonic() - started)) + SEND_GRACE_S)
    log.info("drained in %.1f s", time.monotonic() - started)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain between the signal and uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, app: Litestar, drain_timeout_s: float):
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGHUP, reload_api_keys, self.app.state.server)
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Deliberately not recorded in self._captured_signals: uvicorn would re-raise it after the
        # shutdown, and the process would die by the signal instead of exiting 0.
        if self._signalled or self._loop is None:
            log.warning("second %s: exiting without waiting", signal.Signals(sig).name)
            self.force_exit = True
            self.should_exit = True
            return
        self._signalled = True
        log.info("%s received: draining before exit", signal.Signals(sig).name)
        # Signal handlers run between bytecodes of whatever the loop was doing; hand over safely.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit(), name="drain")

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.app, self.drain_timeout_s)
        finally:
            self.config.timeout_graceful_shutdown = SEND_GRACE_S
            self.should_exit = True


def reload_api_keys(server: ServerState) -> None:
    """SIGHUP: read the keys file again. A file that no longer parses keeps the keys in force."""
    settings = server.settings
    try:
        server.api_keys = ApiKeys.load(settings.api_key, settings.api_keys_file)
    except KeysFileError as exc:
        log.error("SIGHUP: keeping the current API keys: %s", exc)
        return
    log.info("SIGHUP: API keys reloaded (%d keys)", len(server.api_keys.by_digest))


def draining_server(app: Litestar, settings: Settings) -> DrainingServer:
    """uvicorn for this app on the settings' host and port; `.run()` returns after a signal and a drain."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # No formatter of uvicorn's own: its loggers propagate to the root handler of logs.py.
        log_config=None,
        # Our request log (zimage_server.access) has the request id and timings; one line is enough.
        access_log=False,
        # X-Forwarded-* count only from Z_IMAGE_TRUSTED_PROXIES (api/links.py); uvicorn's own handling
        # would trust any loopback peer and rewrite the client address before we could check it.
        proxy_headers=False,
    )
    return DrainingServer(config, app, settings.drain_timeout_s)
