"""One accepted request's life: queued on the batcher, watched while it runs, answered or given up.

`submit_job` returns a `JobHandle` that owns the job's future, its deadline and its cancellation,
and is the step observer the runner reports to. Both ways of answering go through it: `await
handle.result()` (plain responses) and `async for report in handle.events()` (event streams), so a
timeout, a client that left and a failed batch end the same way, with the same status and message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar import Request

from ..batcher import BatcherClosedError, QueueFullError
from ..keys import ANONYMOUS
from ..hires import UpscalerError
from ..lora_library import LoraError
from ..specs import GenerationSpec, ModelUnavailable, OutOfMemoryForRequest
from .auth import principal_of
from .errors import ApiError, ClientGoneError, lora_error
from .guards import RETRY_AFTER_S, shutting_down
from .observability import remember_job, request_id_of
from .state import ServerState

# While a streamed job waits in the queue no events flow; a comment line now and then keeps
# proxies and load balancers from closing the idle connection.
KEEP_ALIVE_S = 15.0


@dataclass(frozen=True)
class StepReport:
    """What the worker thread hands the event loop after one step of one request."""

    step: int
    total: int
    first_image: int  # index, within the request, of the first image this pass covers
    images: int
    previews: list[Any] | None  # PIL images at latent size, when asked for at this step


KEEP_ALIVE = object()  # yielded by `events()` after a quiet spell


@functools.cache  # asked on every step of every request, for a handful of (total, partial_images) pairs
def partial_image_steps(total: int, partial_images: int) -> frozenset[int]:
    """The steps (1-based) after which to send a preview: evenly spread, never the last (the final image follows)."""
    return frozenset(
        step for i in range(1, partial_images + 1) if 1 <= (step := round(total * i / (partial_images + 1))) < total
    )


class JobHandle:
    """A queued request: its future, deadline and step reports. The runner calls the observer methods
    from its worker thread; everything else runs on the event loop."""

    def __init__(
        self, server: ServerState, spec: GenerationSpec, request: Request | None, *, stream: bool, partial_images: int
    ):
        self.server = server
        self.spec = dataclasses.replace(spec, observer=self)
        self.request = request
        self._loop = asyncio.get_running_loop()
        self.deadline = self._loop.time() + server.settings.request_timeout_s
        self._partial_images = partial_images
        # Step reports only matter to a stream; plain requests just wait for the future.
        self._reports: asyncio.Queue[StepReport | None] | None = asyncio.Queue() if stream else None
        self._first_image = 0
        self._pass_images = 0
        # The running pass's last step and its total (0, 0 until the first step), for /sdapi/v1/progress.
        # Written by the worker thread, read on the loop: two plain attribute writes, nothing to lock.
        self.step = 0
        self.total = 0
        self.future: asyncio.Future = None  # type: ignore[assignment]  # the batcher's, set by submit_job

    # -- the runner's side (worker thread) ----------------------------------------------------

    @property
    def cancelled(self) -> bool:
        # A done future before its batch ends means the client left, the request timed out, or a
        # drain ran out of time; the runner stops a call whose every request is cancelled.
        return self.future.done()

    def wants_previews(self, step: int, total: int) -> bool:
        return step in partial_image_steps(total, self._partial_images)

    def on_step(self, step: int, total: int, latents: Any, previews: list[Any] | None) -> None:
        self.step, self.total = step, total
        if self._reports is None:
            return
        images = len(latents)
        # A request bigger than one pipeline call runs in several passes, one after another; step
        # 1 again means the next pass, over the next images.
        if step == 1 and self._pass_images:
            self._first_image += self._pass_images
        self._pass_images = images
        report = StepReport(step, total, self._first_image, images, previews)
        self._loop.call_soon_threadsafe(self._reports.put_nowait, report)

    # -- the route's side (event loop) ---------------------------------------------------------

    def cancel(self) -> None:
        """Nobody waits for this job any more: the batcher drops it if it has not started."""
        self.future.cancel()

    async def result(self) -> list[Any]:
        """The images, once the job is done; ApiError for a failure or timeout, ClientGoneError if the client left."""
        watcher = asyncio.ensure_future(wait_for_disconnect(self.request)) if self.request is not None else None
        waiting = {self.future, watcher} if watcher is not None else {self.future}
        try:
            done, _ = await asyncio.wait(waiting, timeout=self._remaining(), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.cancel()  # the server is going away under us: do not compute for nobody
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if self.future in done:
            return self.outcome()
        self.cancel()
        if watcher in done:
            raise ClientGoneError()
        raise job_timeout(self.server)

    async def events(self) -> AsyncIterator[StepReport | object]:
        """Step reports as they come (KEEP_ALIVE after quiet spells), until the job is done.

        Then `outcome()` gives the images or raises. ApiError on timeout. Closing the iterator
        early (the client hung up) cancels the job."""
        assert self._reports is not None, "events() needs a handle submitted with stream=True"
        self.future.add_done_callback(lambda _: self._reports.put_nowait(None))
        try:
            while True:
                remaining = self._remaining()
                if remaining <= 0:
                    raise job_timeout(self.server)
                try:
                    report = await asyncio.wait_for(self._reports.get(), min(remaining, KEEP_ALIVE_S))
                except TimeoutError:
                    if remaining <= KEEP_ALIVE_S:
                        raise job_timeout(self.server) from None
                    yield KEEP_ALIVE
                    continue
                if report is None:
                    return
                yield report
        finally:
            if not self.future.done():
                self.cancel()

    def outcome(self) -> list[Any]:
        """The finished job's images, or its failure as the ApiError the client gets."""
        exc = self.future.exception()
        if exc is not None:
            raise job_failure(exc)
        return self.future.result()

    def _remaining(self) -> float:
        return self.deadline - self._loop.time()


def submit_job(
    server: ServerState,
    spec: GenerationSpec,
    request: Request | None = None,
    *,
    stream: bool = False,
    partial_images: int = 0,
    owner: str | None = None,
    tag: str | None = None,
) -> JobHandle:
    """Queue the request's job, or fail at once with 429 (queue full) or 503 (shutting down).

    With the request, the job is tagged with its id, its owner is the request's key, and its
    timings reach the request log; an async job (no request) names its owner and tag itself."""
    handle = JobHandle(server, spec, request, stream=stream, partial_images=partial_images)
    if request is not None:
        owner, tag = principal_of(request).name, request_id_of(request.scope)
    try:
        job = server.batcher.enqueue(handle.spec.params, spec.n, handle.spec, tag=tag, owner=owner or ANONYMOUS.name)
    except QueueFullError as exc:
        message = f"The server is busy ({exc}); retry shortly."
        raise ApiError(429, message, code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
    except BatcherClosedError:
        raise shutting_down() from None
    handle.future = job.future
    if request is not None:
        remember_job(request, job)
    return handle


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up. The body is already read, so the next ASGI message is the hang-up."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def job_failure(exc: BaseException) -> ApiError:
    """The client-facing error for a job whose future raised."""
    if isinstance(exc, BatcherClosedError):
        return shutting_down()
    if isinstance(exc, LoraError):  # its file turned out unusable when the call was about to run
        return lora_error(exc)
    if isinstance(exc, UpscalerError):  # a hires upscaler's file, read when its call ran
        return ApiError(400, str(exc), param=exc.param, code="invalid_upscaler")
    if isinstance(exc, OutOfMemoryForRequest):
        # Retrying the same request would run out of memory again; tell the SDKs not to.
        return ApiError(500, str(exc), code="out_of_memory", headers={"x-should-retry": "false"})
    if isinstance(exc, ModelUnavailable):  # the details (paths, device errors) stay in the log
        return ApiError(
            503, "The model could not be loaded again after sleeping; retry shortly.", code="model_unavailable",
            headers={"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    # A BatchFailedError: the details (device errors, addresses) stay in the log.
    return ApiError(500, "Image generation failed; the server is still running, retry the request.")


def job_timeout(server: ServerState) -> ApiError:
    return ApiError(
        504,
        f"The request waited longer than {server.settings.request_timeout_s:g} s (Z_IMAGE_REQUEST_TIMEOUT_S).",
        code="timeout",
    )
