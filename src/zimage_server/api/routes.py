"""HTTP routes: generations, models, health and readiness."""

from __future__ import annotations


import msgspec
from litestar import Request, Response, get, post
from litestar.datastructures import State

from ..specs import GenerationSpec
from .async_jobs import REPLAYS, accept_job, check_async_fields, check_sync_fields, wants_async
from .control import controlled_from_base64
from .guards import RETRY_AFTER_S, require_json, require_ready
from .jobs import submit_job
from .prompts import enhanced
from .requests import generation_spec
from .responses import OutputOptions, check_raw_image_count, images_response
from .schemas import GenerationRequest, LoraCard, LoraList, ModelCard, ModelDefaults, ModelList
from .state import ServerState, server_state
from .streaming import GENERATION_EVENTS, stream_images


@post(
    "/v1/images/generations",
    guards=[require_json, require_ready],
    status_code=200,
    summary="Create images from a prompt (OpenAI Images API).",
)
async def create_images(request: Request, data: GenerationRequest, state: State) -> Response:
    server = server_state(state)
    spec, options = await prepare_generation(server, data)
    if wants_async(request):
        check_async_fields(data.stream, data.store)
        body = msgspec.to_builtins(data) | {"seed": spec.seeds[0]}
        return await accept_job(request, server, "generations", body, spec, webhook_url=data.webhook_url)
    check_sync_fields(data.webhook_url)
    if data.stream:
        return stream_images(
            server, spec, options, partial_images=data.partial_images or 0, events=GENERATION_EVENTS, request=request
        )
    check_raw_image_count(request, spec.n)
    images = await submit_job(server, spec, request).result()
    return await images_response(request, server, spec, options, images)


async def prepare_generation(server: ServerState, data: GenerationRequest) -> tuple[GenerationSpec, OutputOptions]:
    """The spec a generations request runs, its control image decoded: for the route and for its async job."""
    spec, options = generation_spec(data, server)
    if data.control_image is not None:
        spec = await controlled_from_base64(
            spec, server, data.control_image, "control_image", data.control_preprocess or "none", data.control_scale
        )
    return await enhanced(server, spec, data.enhance_prompt), options


async def replay_generation(server: ServerState, body: dict, _: dict) -> tuple[GenerationSpec, OutputOptions]:
    return await prepare_generation(server, msgspec.convert(body, GenerationRequest))


REPLAYS["generations"] = replay_generation


@get("/v1/models", guards=[require_ready], summary="The model this server runs, with its default settings.")
async def list_models(state: State) -> ModelList:
    server = server_state(state)
    variant = server.variant
    defaults = ModelDefaults(
        num_inference_steps=variant.default_steps,
        guidance_scale=variant.default_guidance,
        takes_mask=variant.takes_mask,
    )
    card = ModelCard(id=server.variant.model_name, created=int(server.started_at), defaults=defaults)
    return ModelList(data=[card])


@get("/v1/loras", guards=[require_ready], summary="The LoRAs requests may name, from the LoRA folder.")
async def list_loras(state: State) -> LoraList:
    infos = await server_state(state).usable_loras()
    return LoraList(
        data=[
            LoraCard(name=i.name, size_bytes=i.size_bytes, rank=i.rank, modules=list(i.modules), sha256=i.sha256_short)
            for i in infos
        ]
    )


@get("/health", summary="200 while the process runs.")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", summary="200 once the model is loaded and warmed up, 503 before, while draining, or once broken.")
async def ready(state: State) -> Response[dict[str, str]]:
    server = server_state(state)
    if server.worker_died:
        return Response({"status": "broken"}, status_code=503)
    if server.draining:
        return Response({"status": "draining"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})
    if server.ready:
        return Response({"status": "ready", "model": server.variant.model_name})
    return Response({"status": "loading"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S})


ROUTES = [list_models, list_loras, health, ready]

