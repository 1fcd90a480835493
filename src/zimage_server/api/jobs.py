"""Queue a job on the batcher and turn its outcome into client-facing results or errors.

Shared by the plain JSON/raw-image responses (routes.py) and the event streams (streaming.py), so
both answer a full queue, a failed batch or a timeout with the same status and message.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from litestar import Request
from litestar.datastructures import State
from PIL import Image

from ..batcher import BatcherClosedError, QueueFullError
from ..images import ImageParameters, encode_image
from ..pipelines import EditSpec, GenerationSpec, OutOfMemoryForRequest, StepObserver, ZImageEngine
from ..settings import Settings
from .errors import ApiError
from .observability import remember_job, request_id_of

RETRY_AFTER_S = "2"
INLINE_ENCODE_MAX_PIXELS = 128 * 128  # responses this small encode on the event loop


def shutting_down() -> ApiError:
    return ApiError(
        503,
        "The server is shutting down and takes no new work; retry shortly (or on another replica).",
        code="shutting_down",
        headers={"Retry-After": RETRY_AFTER_S},
    )


class JobObserver:
    """The step observer every queued job carries: its run stops once nobody waits for its future.

    The future is done before its batch ends only when the client left, the request timed out, or a
    drain ran out of time; then the engine stops the call at its next step if every job in it is
    done. It wraps the route's own observer (stream progress), if the payload came with one.
    """

    def __init__(self, inner: StepObserver | None = None):
        self.inner = inner
        self.future: asyncio.Future | None = None

    @property
    def cancelled(self) -> bool:
        # Read from the worker thread; a future's done() is a plain state read.
        return (self.future is not None and self.future.done()) or bool(self.inner and self.inner.cancelled)

    def on_step(self, step: int, total: int, latents: Any) -> None:
        if self.inner is not None:
            self.inner.on_step(step, total, latents)


def observed(payload: Any) -> tuple[Any, JobObserver | None]:
    """The payload with a JobObserver attached, for payloads that carry one (engine specs)."""
    if not (dataclasses.is_dataclass(payload) and hasattr(payload, "observer")):
        return payload, None
    observer = JobObserver(payload.observer)
    return dataclasses.replace(payload, observer=observer), observer


def submit_job(state: State, key: Any, n: int, payload: Any, request: Request | None = None) -> asyncio.Future:
    """Queue a job of n images, or fail at once with 429 (queue full) or 503 (shutting down).

    With the request, the job is tagged with its id and its timings reach the request log."""
    payload, observer = observed(payload)
    try:
        job = state.batcher.enqueue(key, n, payload, tag=request_id_of(request.scope) if request else None)
    except QueueFullError as exc:
        message = f"The server is busy ({exc}); retry shortly."
        raise ApiError(429, message, code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
    except BatcherClosedError:
        raise shutting_down() from None
    if observer is not None:
        observer.future = job.future
    if request is not None:
        remember_job(request, job)
    return job.future


def job_failure(exc: BaseException) -> ApiError:
    """The client-facing error for a job whose future raised."""
    if isinstance(exc, BatcherClosedError):
        return shutting_down()
    if isinstance(exc, OutOfMemoryForRequest):
        # Retrying the same request would run out of memory again; tell the SDKs not to.
        return ApiError(500, str(exc), code="out_of_memory", headers={"x-should-retry": "false"})
    # A BatchFailedError: the details (device errors, addresses) stay in the log.
    return ApiError(500, "Image generation failed; the server is still running, retry the request.")


def job_timeout(settings: Settings) -> ApiError:
    return ApiError(
        504,
        f"The request waited longer than {settings.request_timeout_s:g} s (Z_IMAGE_REQUEST_TIMEOUT_S).",
        code="timeout",
    )


async def encode_for_response(
    engine: ZImageEngine,
    spec: GenerationSpec,
    images: list[Image.Image],
    output_format: str,
    compression: int | None,
) -> list[bytes]:
    """One request's images, encoded, each with its own seed in the PNG parameters chunk.

    Off the event loop, except for small images: a 64x64 PNG encodes faster than a round trip to a
    worker thread (the A/B is in docs/benchmarks.md, benchmark 1)."""

    def encode_all() -> list[bytes]:
        return [
            encode_image(
                image,
                output_format,
                compression,
                ImageParameters(
                    prompt=spec.prompt,
                    negative_prompt=spec.negative_prompt,
                    steps=spec.num_inference_steps,
                    guidance_scale=spec.guidance_scale,
                    seed=seed,
                    width=spec.width,
                    height=spec.height,
                    variant=engine.variant,
                    strength=spec.strength if isinstance(spec, EditSpec) else None,
                ),
            )
            for image, seed in zip(images, spec.seeds, strict=True)
        ]

    if spec.width * spec.height * len(images) <= INLINE_ENCODE_MAX_PIXELS:
        return encode_all()
    return await asyncio.to_thread(encode_all)
