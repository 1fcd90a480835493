"""Prompt enhancement as a service step: a request's prompt expanded before its job is queued,
and POST /v1/prompts/enhance, which shows the expansion without generating.

The enhancer itself (prompt_enhancer.py) never fails a request: a backend that errs, stalls or
refuses leaves the prompt as it was (`revised_prompt` null). What can fail here is the request:
enhancement asked of a server that has it off is a 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Annotated

import msgspec
from litestar import post
from litestar.datastructures import State
from msgspec import Meta

from ..prompt_enhancer import MAX_PROMPT_CHARS, ChatBackend, PromptEnhancer, ResidentBackend, prompt_token_counter
from ..settings import Settings
from ..specs import GenerationSpec
from .errors import ApiError
from .guards import require_json, require_ready
from .schemas import MAX_SEED, EnhanceField
from .state import ServerState, server_state



def build_enhancer(settings: Settings, runner) -> PromptEnhancer | None:
    """The enhancer Z_IMAGE_PROMPT_ENHANCER asks for, over the loaded runner; None when off."""
    if settings.prompt_enhancer == "off":
        return None
    if settings.prompt_enhancer == "resident":
        from ..resident_lm import ResidentLanguageModel  # torch: only with the model

        backend = ResidentBackend(ResidentLanguageModel(runner))
    else:
        backend = ChatBackend(
            settings.prompt_enhancer,
            model=settings.prompt_enhancer_model,
            api_key=settings.prompt_enhancer_api_key or None,
            timeout_s=settings.enhance_timeout_s,
        )
    return PromptEnhancer(
        backend,
        max_new_tokens=settings.enhance_max_tokens,
        timeout_s=settings.enhance_timeout_s,
        # Counted against what the pipeline encodes (chat template included) and where it cuts.
        count_tokens=prompt_token_counter(runner.pipeline.tokenizer),
        # The resident model writes one answer at a time (one KV cache, as the memory plan counts;
        # its turns share one thread anyway); a chat endpoint takes a few at once.
        concurrent=1 if settings.prompt_enhancer == "resident" else 4,
    )


def enhancer_of(server: ServerState, param: str) -> PromptEnhancer:
    if server.enhancer is None:
        raise ApiError(
            400, "Prompt enhancement is off on this server (Z_IMAGE_PROMPT_ENHANCER=off).", param=param
        )  # fmt: skip
    return server.enhancer


async def enhanced(
    server: ServerState, spec: GenerationSpec, mode: EnhanceField | None, param: str = "enhance_prompt"
) -> GenerationSpec:
    """The spec with its prompt expanded as `mode` asks (None: the server's default), for every
    dialect's route and for async jobs alike; unchanged when enhancement is not asked for."""
    if mode is None:
        mode = server.settings.enhance_prompt and server.enhancer is not None
    if mode is False:
        return spec
    enhancer = enhancer_of(server, param)
    limit = spec.params.max_sequence_length  # what this request's encoder reads
    if mode == "per_image":
        results = await asyncio.gather(
            *(enhancer.enhance(spec.prompt, seed=seed, max_tokens=limit) for seed in spec.seeds)
        )
    else:
        results = [await enhancer.enhance(spec.prompt, max_tokens=limit)] * spec.n
    # A DALL-E "use it AS-IS" prefix is dropped from the prompt, enhanced or not.
    return dataclasses.replace(
        spec, prompt=results[0].prompt if results[0].revised_prompt is None else spec.prompt,
        revised_prompts=tuple(result.revised_prompt for result in results),
    )  # fmt: skip


class EnhanceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, Meta(min_length=1, max_length=MAX_PROMPT_CHARS)]
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED, description="Sample with this seed; none: greedy.")] | None = None
    language: Annotated[str, Meta(max_length=64, description="Answer in this language; none: the prompt's.")] | None = None


class EnhanceResponse(msgspec.Struct, kw_only=True):
    prompt: str  # what was sent (less a DALL-E "as-is" prefix)
    revised_prompt: str | None  # the expansion; null when the enhancer fell back to the prompt
    fallback: str | None = None  # why it did: empty, refusal, lost_quotes, backend_error, timeout, skipped_prefix


@post(
    "/v1/prompts/enhance",
    guards=[require_json, require_ready],
    status_code=200,
    summary="Expand a short prompt into the detailed caption Z-Image is trained on, without generating.",
)
async def enhance_prompt(data: EnhanceRequest, state: State) -> EnhanceResponse:
    server = server_state(state)
    if not data.prompt.strip():
        raise ApiError(400, "'prompt' must not be empty.", param="prompt")
    result = await enhancer_of(server, "prompt").enhance(data.prompt, seed=data.seed, language=data.language)
    prompt = result.prompt if result.revised_prompt is None else data.prompt
    return EnhanceResponse(prompt=prompt, revised_prompt=result.revised_prompt, fallback=result.fallback)
