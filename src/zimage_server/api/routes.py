"""HTTP routes: generations, models, health and readiness."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.handlers.base import BaseRouteHandler
from litestar.types import Guard

from ..images import FORMAT_FOR_MEDIA_TYPE, MEDIA_TYPES
from ..pipelines import GenerationSpec, ZImageEngine
from .errors import ApiError, ClientGoneError
from .jobs import RETRY_AFTER_S, encode_for_response, job_failure, job_timeout, shutting_down, submit_job
from .requests import OutputOptions, batch_key, generation_spec, served_model_ids
from .schemas import GenerationRequest, ImageData, ImagesResponse, ModelCard, ModelList
from .streaming import GENERATION_EVENTS, stream_images

JSON_BODY_LIMIT = 1024 * 1024


# Guards are async on purpose: Litestar runs a sync guard in a worker thread, two thread round
# trips per request before it is even queued (the A/B is in docs/benchmarks.md, benchmark 1).
async def require_ready(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    if connection.app.state.get("draining"):
        raise shutting_down()
    if not connection.app.state.get("ready"):
        raise ApiError(
            503, "The model is still loading; retry shortly.", code="not_ready", headers={"Retry-After": RETRY_AFTER_S}
        )


def require_media_type(expected: str, hint: str = "") -> Guard:
    """A guard that answers 415 unless the body is `expected`; Litestar itself parses whatever it gets."""

    async def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        media_type = connection.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != expected:
            raise ApiError(
                415,
                f"Content-Type must be {expected}, not '{media_type or 'none'}'{hint}.",
                code="unsupported_media_type",
            )

    return guard


require_json = require_media_type("application/json")


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up. The body is already read, so the next ASGI message is the hang-up."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(request: Request, state: State, key: Any, n: int, payload: Any) -> Any:
    """Queue a job and wait for its result, its timeout, or its client leaving, whichever comes first."""
    future = submit_job(state, key, n, payload, request=request)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait(
            {future, watcher}, timeout=state.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    except asyncio.CancelledError:
        future.cancel()  # the server is going away under us: do not compute for nobody
        raise
    finally:
        watcher.cancel()
    if future in done:
        if future.exception() is not None:
            raise job_failure(future.exception())
        return future.result()
    # Cancelling the future marks the job gone: the batcher drops it if it has not started.
    future.cancel()
    if watcher in done:
        raise ClientGoneError()
    raise job_timeout(state.settings)


def wants_raw_image(request: Request) -> str | None:
    """The image media type the client asked for with Accept, if it prefers one over JSON."""
    accept = request.headers.get("accept", "")
    if not accept or "image/" not in accept:
        return None
    best = request.accept.best_match(["application/json", *MEDIA_TYPES.values()], default="application/json")
    return best if best in FORMAT_FOR_MEDIA_TYPE else None


def check_raw_image_count(request: Request, n: int) -> None:
    if wants_raw_image(request) and n > 1:
        raise ApiError(400, "A raw image response holds one image: send n=1, or Accept: application/json.", param="n")


async def images_response(
    request: Request, engine: ZImageEngine, spec: GenerationSpec, options: OutputOptions, images: list
) -> Response:
    """Encode the images (off the event loop) as JSON with b64 data, or as raw bytes when Accept asks for that."""
    raw_type = wants_raw_image(request)
    output_format = FORMAT_FOR_MEDIA_TYPE[raw_type] if raw_type else options.output_format

    encoded = await encode_for_response(engine, spec, images, output_format, options.compression)
    if raw_type:
        return Response(encoded[0], media_type=raw_type, headers={"X-Seed": str(spec.seeds[0])})
    body = ImagesResponse(
        created=int(time.time()),
        data=[ImageData(b64_json=base64.b64encode(blob).decode(), seed=seed) for blob, seed in zip(encoded, spec.seeds)],
        output_format=output_format,
        size=f"{spec.width}x{spec.height}",
    )
    return Response(body)


@post(
    "/v1/images/generations",
    guards=[require_json, require_ready],
    request_max_body_size=JSON_BODY_LIMIT,
    status_code=200,
    summary="Create images from a prompt (OpenAI Images API).",
)
async def create_images(request: Request, data: GenerationRequest, state: State) -> Response:
    engine: ZImageEngine = state.engine
    spec, options = generation_spec(data, engine, state.settings)
    if data.stream:
        return stream_images(
            state,
            batch_key(spec),
            spec,
            options,
            partial_images=data.partial_images or 0,
            events=GENERATION_EVENTS,
            request=request,
        )
    check_raw_image_count(request, len(spec.seeds))
    images = await run_job(request, state, batch_key(spec), len(spec.seeds), spec)
    return await images_response(request, engine, spec, options, images)


@get("/v1/models", guards=[require_ready], summary="The model this server runs.")
async def list_models(state: State) -> ModelList:
    model_id = served_model_ids(state.engine)[0]
    return ModelList(data=[ModelCard(id=model_id, created=int(state.started_at))])


@get("/health", summary="200 while the process runs.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="200 once the model is loaded and warmed up, 503 before.")
async def ready(state: State) -> Response[dict[str, str]]:
    if state.get("draining"):
        return Response({"status": "draining"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})
    if state.get("ready"):
        return Response({"status": "ready", "model": f"z-image-{state.settings.variant}"})
    return Response({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


ROUTES = [create_images, list_models, health, ready]
