"""`stream: true`: answer with server-sent events, the OpenAI way, while the batcher runs the job.

Events, in order, for a request of n images (`<kind>` is `image_generation` or `image_edit`):
- `<kind>.progress` after every denoising step (our extension): step and total of the running
  pass, the fraction of the whole request done, and which images the pass covers;
- `<kind>.partial_image` as many times per image as `partial_images` asks (0-3), spread over the
  steps: a cheap linear projection of the latents to RGB, never a VAE decode;
- `<kind>.completed` once per image with the final image, its seed and its index;
- or, if the job fails, times out or the server shuts down mid-stream, one `error` event in the
  OpenAI envelope (`{"error": {message, type, param, code}}`), and the stream closes.

Errors found before the stream starts (validation, a full queue) are ordinary HTTP errors.
A client that hangs up cancels its job: queued work is dropped by the batcher, and its observer
reports `cancelled`, so a running call whose clients all left stops at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.response import ServerSentEvent, ServerSentEventMessage
from PIL import Image

from ..images import encode_image
from ..pipelines import GenerationSpec, latent_previews
from .errors import ApiError, error_detail
from .jobs import encode_for_response, job_failure, job_timeout, submit_job
from .requests import OutputOptions

GENERATION_EVENTS = "image_generation"
EDIT_EVENTS = "image_edit"
# ServerSentEvent sets Cache-Control; nginx would otherwise buffer the stream until it ends.
SSE_HEADERS = {"X-Accel-Buffering": "no"}
# While a job waits in the queue no events flow; a comment line now and then keeps proxies and
# load balancers from closing the idle connection. SSE clients (the SDK included) skip comments.
KEEP_ALIVE_S = 15.0
KEEP_ALIVE = object()
KEEP_ALIVE_COMMENT = ServerSentEventMessage(comment="keep-alive", data=None, sep="\n")


def partial_image_steps(total: int, partial_images: int) -> frozenset[int]:
    """The steps (1-based) after which to send a preview: evenly spread, never the last (the final image follows)."""
    return frozenset(
        step for i in range(1, partial_images + 1) if 1 <= (step := round(total * i / (partial_images + 1))) < total
    )


@dataclass(frozen=True)
class StepReport:
    """What the worker thread hands the event loop after one step of one request."""

    step: int
    total: int
    first_image: int  # index, within the request, of the first image this pass covers
    images: int
    previews: list[Image.Image] | None


class StreamObserver:
    """The engine's per-request hook: turns steps into reports on the event loop's queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop, partial_images: int):
        self._loop = loop
        self._partial_images = partial_images
        self.reports: asyncio.Queue[StepReport | None] = asyncio.Queue()
        self.cancelled = False  # set on the loop when the client leaves; read by the worker thread
        self._first_image = 0
        self._pass_images = 0

    def on_step(self, step: int, total: int, latents) -> None:
        # Called from the worker thread. A request bigger than one pipeline call runs in several
        # passes, one after another; step 1 again means the next pass, over the next images.
        if step == 1 and self._pass_images:
            self._first_image += self._pass_images
        self._pass_images = latents.shape[0]
        previews = latent_previews(latents) if step in partial_image_steps(total, self._partial_images) else None
        report = StepReport(step, total, self._first_image, self._pass_images, previews)
        self._loop.call_soon_threadsafe(self.reports.put_nowait, report)


def encode_preview(preview: Image.Image, spec: GenerationSpec, options: OutputOptions) -> bytes:
    # Scaled up to the requested size, so a client can show it where the final image will go.
    scaled = preview.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    return encode_image(scaled, options.output_format, options.compression, parameters=None)


def sse(event: str, data: dict) -> ServerSentEventMessage:
    # "\n" line ends, as the OpenAI API sends them (Litestar's default is "\r\n").
    return ServerSentEventMessage(event=event, data=msgspec.json.encode(data).decode(), sep="\n")


def error_event(error: ApiError) -> ServerSentEventMessage:
    detail = error_detail(error.status_code, error.message, param=error.param, code=error.code)
    return sse("error", {"type": "error", "error": msgspec.to_builtins(detail)})


def stream_images(
    state: State,
    key: Hashable,
    spec: GenerationSpec,
    options: OutputOptions,
    *,
    partial_images: int,
    events: str,
    request: Request | None = None,
) -> ServerSentEvent:
    """Queue the job now (so a full queue is a plain 429) and answer with its event stream."""
    observer = StreamObserver(asyncio.get_running_loop(), partial_images)
    spec = dataclasses.replace(spec, observer=observer)
    future = submit_job(state, key, len(spec.seeds), spec, request=request)
    # Runs on the loop after every report the worker queued before the job finished.
    future.add_done_callback(lambda _: observer.reports.put_nowait(None))
    return ServerSentEvent(job_events(state, spec, options, events, observer, future), headers=SSE_HEADERS)


async def job_events(
    state: State,
    spec: GenerationSpec,
    options: OutputOptions,
    events: str,
    observer: StreamObserver,
    future: asyncio.Future,
) -> AsyncIterator[ServerSentEventMessage]:
    engine = state.engine
    size = f"{spec.width}x{spec.height}"
    common = {"size": size, "output_format": options.output_format, "quality": "auto", "background": "opaque"}
    n = len(spec.seeds)
    partials_sent = [0] * n
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.request_timeout_s
    try:
        while True:
            report = await _next_report(observer, deadline - loop.time())
            if report is KEEP_ALIVE:
                yield KEEP_ALIVE_COMMENT
                continue
            if report is None:
                break
            done = report.first_image * report.total + report.images * report.step
            yield sse(
                f"{events}.progress",
                {
                    "type": f"{events}.progress",
                    "created_at": int(time.time()),
                    "step": report.step,
                    "total": report.total,
                    "progress": round(done / (n * report.total), 4),
                    "image_indices": list(range(report.first_image, report.first_image + report.images)),
                },
            )
            for offset, preview in enumerate(report.previews or ()):
                index = report.first_image + offset
                blob = await asyncio.to_thread(encode_preview, preview, spec, options)
                yield sse(
                    f"{events}.partial_image",
                    {
                        "type": f"{events}.partial_image",
                        "created_at": int(time.time()),
                        "b64_json": base64.b64encode(blob).decode(),
                        "partial_image_index": partials_sent[index],
                        "index": index,
                        "seed": spec.seeds[index],
                        **common,
                    },
                )
                partials_sent[index] += 1
        if future.exception() is not None:
            yield error_event(job_failure(future.exception()))
            return
        encoded = await encode_for_response(
            engine, spec, future.result(), options.output_format, options.compression
        )
        for index, (blob, seed) in enumerate(zip(encoded, spec.seeds, strict=True)):
            yield sse(
                f"{events}.completed",
                {
                    "type": f"{events}.completed",
                    "created_at": int(time.time()),
                    "b64_json": base64.b64encode(blob).decode(),
                    "index": index,
                    "seed": seed,
                    **common,
                },
            )
    except TimeoutError:
        yield error_event(job_timeout(state.settings))
    finally:
        # Normal end, error, or the client hung up (Litestar cancels this generator): nobody
        # waits for this job any more, so the batcher may drop it and the engine may stop it.
        observer.cancelled = True
        future.cancel()


async def _next_report(observer: StreamObserver, timeout: float) -> StepReport | object | None:
    """The next report, None once the job is done, or KEEP_ALIVE after a quiet spell (a queued job)."""
    if timeout <= 0:
        raise TimeoutError
    try:
        return await asyncio.wait_for(observer.reports.get(), min(timeout, KEEP_ALIVE_S))
    except TimeoutError:
        if timeout <= KEEP_ALIVE_S:
            raise
        return KEEP_ALIVE
