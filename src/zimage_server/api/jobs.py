"""Queue a job on the batcher and turn its outcome into client-facing results or errors.

Shared by the plain JSON/raw-image responses (routes.py) and the event streams (streaming.py), so
both answer a full queue, a failed batch or a timeout with the same status and message.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar.datastructures import State
from PIL import Image

from ..batcher import BatcherClosedError, QueueFullError
from ..images import ImageParameters, encode_image
from ..pipelines import EditSpec, GenerationSpec, ZImageEngine
from ..settings import Settings
from .errors import ApiError

RETRY_AFTER_S = "2"


def submit_job(state: State, key: Any, n: int, payload: Any) -> asyncio.Future:
    """Queue a job of n images, or fail at once with 429 (queue full) or 503 (shutting down)."""
    try:
        return state.batcher.submit(key, n, payload)
    except QueueFullError as exc:
        message = f"The server is busy ({exc}); retry shortly."
        raise ApiError(429, message, code="queue_full", headers={"Retry-After": RETRY_AFTER_S}) from None
    except BatcherClosedError:
        raise ApiError(
            503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": RETRY_AFTER_S}
        ) from None


def job_failure(exc: BaseException) -> ApiError:
    """The client-facing error for a job whose future raised."""
    if isinstance(exc, BatcherClosedError):
        return ApiError(503, "The server is shutting down.", code="shutting_down")
    # A BatchFailedError: the details (device errors, addresses) stay in the log.
    return ApiError(500, "Image generation failed; the server is still running, retry the request.")


def job_timeout(settings: Settings) -> ApiError:
    return ApiError(
        504,
        f"The request waited longer than {settings.request_timeout_s:g} s (Z_IMAGE_REQUEST_TIMEOUT_S).",
        code="timeout",
    )


def encode_outputs(
    engine: ZImageEngine,
    spec: GenerationSpec,
    images: list[Image.Image],
    output_format: str,
    compression: int | None,
) -> list[bytes]:
    """Encode one request's images, each with its own seed in the PNG parameters chunk. Blocking: run off the loop."""
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
