"""`stream: true`: answer with server-sent events, the OpenAI way, while the batcher runs the job.

Events, in order, for a request of n images (`<kind>` is `image_generation` or `image_edit`):
- `<kind>.progress` after every denoising step (our extension): step and total of the running
  pass, the fraction of the whole request done, and which images the pass covers;
- `<kind>.partial_image` as many times per image as `partial_images` asks (0-3), spread over the
  steps: a cheap linear projection of the latents to RGB, never a VAE decode;
- `<kind>.completed` once per image with the final image (`b64_json`, or `url` and `expires_at` with
  response_format=url; `id` when it was stored), its seed and its index;
- or, if the job fails, times out or the server shuts down mid-stream, one `error` event in the
  OpenAI envelope (`{"error": {message, type, param, code}}`), and the stream closes.

Errors found before the stream starts (validation, a full queue) are ordinary HTTP errors.
A client that hangs up cancels its job (Litestar closes the stream's iterator, and with it the
job handle's): queued work is dropped by the batcher, and a running call whose clients all left
stops at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator

import msgspec
from litestar import Request
from litestar.background_tasks import BackgroundTask
from litestar.response import ServerSentEvent, ServerSentEventMessage
from PIL import Image

from ..images import encode_image
from ..specs import GenerationSpec
from .errors import ApiError
from .jobs import KEEP_ALIVE, JobHandle, StepReport, submit_job
from .responses import OutputOptions, encode_for_response, image_items, keep_images, origin_of
from .schemas import CompletedEvent, ErrorEvent, PartialImageEvent, ProgressEvent
from .state import ServerState

GENERATION_EVENTS = "image_generation"
EDIT_EVENTS = "image_edit"
# ServerSentEvent sets Cache-Control; nginx would otherwise buffer the stream until it ends.
SSE_HEADERS = {"X-Accel-Buffering": "no"}
# SSE clients (the SDK included) skip comments: what keeps an idle connection open (jobs.KEEP_ALIVE_S).
KEEP_ALIVE_COMMENT = ServerSentEventMessage(comment="keep-alive", data=None, sep="\n")


def encode_preview(preview: Image.Image, spec: GenerationSpec, options: OutputOptions) -> bytes:
    # Scaled up to the requested size, so a client can show it where the final image will go.
    scaled = preview.resize(spec.params.output_size, Image.Resampling.BILINEAR)
    return encode_image(scaled, options.output_format, options.compression, parameters=None)


def sse(event: msgspec.Struct) -> ServerSentEventMessage:
    # "\n" line ends, as the OpenAI API sends them (Litestar's default is "\r\n").
    return ServerSentEventMessage(event=event.type, data=msgspec.json.encode(event).decode(), sep="\n")


def error_event(error: ApiError) -> ServerSentEventMessage:
    return sse(ErrorEvent(error=error.detail))


def stream_images(
    server: ServerState,
    spec: GenerationSpec,
    options: OutputOptions,
    *,
    partial_images: int,
    events: str,
    request: Request,
) -> ServerSentEvent:
    """Queue the job now (so a full queue is a plain 429) and answer with its event stream.

    The job is cancelled once the response is over, however it ended: a client that hangs up before
    the stream's first event leaves its generator unstarted, and closing an unstarted generator runs
    none of its code, so its own clean-up cannot be the only one. Cancelling a finished job does nothing."""
    handle = submit_job(server, spec, request, stream=True, partial_images=partial_images)
    return ServerSentEvent(
        job_events(server, handle, options, events), headers=SSE_HEADERS, background=BackgroundTask(handle.cancel)
    )


async def job_events(
    server: ServerState, handle: JobHandle, options: OutputOptions, events: str
) -> AsyncIterator[ServerSentEventMessage]:
    spec = handle.spec
    size = "{}x{}".format(*spec.params.output_size)
    partials_sent = [0] * spec.n
    try:
        # aclosing: a client that hangs up closes this generator, and with it the handle's, which cancels the job.
        async with contextlib.aclosing(handle.events()) as reports:
            async for report in reports:
                if report is KEEP_ALIVE:
                    yield KEEP_ALIVE_COMMENT
                    continue
                for message in await step_events(report, handle, options, events, size, partials_sent):
                    yield message
        images = handle.outcome()
        encoded = await encode_for_response(server, spec, images, options.output_format, options.compression)
        records = await keep_images(origin_of(handle.request), server, spec, encoded, options.output_format, options)
        items = image_items(handle.request, server, spec, encoded, records, options.response_format)
        for index, item in enumerate(items):
            yield sse(
                CompletedEvent(
                    type=f"{events}.completed",
                    created_at=int(time.time()),
                    b64_json=item.b64_json,
                    url=item.url,
                    expires_at=item.expires_at,
                    id=item.id,
                    index=index,
                    seed=item.seed,
                    size=size,
                    output_format=options.output_format,
                )
            )
    except ApiError as error:  # a failed batch, a timeout or a drain, found after the stream began
        yield error_event(error)


async def step_events(
    report: StepReport, handle: JobHandle, options: OutputOptions, events: str, size: str, partials_sent: list[int]
) -> list[ServerSentEventMessage]:
    """The progress event of one step, and the previews it carries."""
    spec = handle.spec
    done = report.first_image * report.total + report.images * report.step
    messages = [
        sse(
            ProgressEvent(
                type=f"{events}.progress",
                created_at=int(time.time()),
                step=report.step,
                total=report.total,
                progress=round(done / (spec.n * report.total), 4),
                image_indices=list(range(report.first_image, report.first_image + report.images)),
            )
        )
    ]
    for offset, preview in enumerate(report.previews or ()):
        index = report.first_image + offset
        blob = await asyncio.to_thread(encode_preview, preview, spec, options)
        messages.append(
            sse(
                PartialImageEvent(
                    type=f"{events}.partial_image",
                    created_at=int(time.time()),
                    b64_json=base64.b64encode(blob).decode(),
                    partial_image_index=partials_sent[index],
                    index=index,
                    seed=spec.seeds[index],
                    size=size,
                    output_format=options.output_format,
                )
            )
        )
        partials_sent[index] += 1
    return messages
