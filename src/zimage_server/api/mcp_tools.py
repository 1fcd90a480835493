"""`POST /mcp`: the image tools for agents, over the Model Context Protocol (the official `mcp` SDK).

A thin adapter, as the OpenAI and A1111 routes are: each tool builds the same request struct a
route would, checks it with the same code, and hands it to the same service (an async job on the
shared batcher, the gallery). So images and jobs made through MCP belong to the calling key, and
every error an agent can act on (a bad size, an unknown LoRA, a full queue) comes back as a tool
result with `isError` and the HTTP API's own message, never as a transport error.

The SDK's Streamable HTTP app is stateless with JSON responses, so both protocol eras work (the
2025 handshake and the 2026-07-28 revision's `server/discover`), and it is mounted inside the
Litestar app; its session manager runs in the app's lifespan (a mounted app's own never runs).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import httpx
import msgspec
from litestar import asgi
from litestar.connection import ASGIConnection
from litestar.types import Receive, Scope, Send
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ImageContent, ResourceLink, TextContent
from PIL import Image
from pydantic import Field

from ..gallery import GalleryUnavailable
from ..index import ImageRecord
from ..job_queue import FINISHED, SUCCEEDED, JobRecord
from ..keys import NOBODY, Principal
from .async_jobs import job_object, submit_async
from .edits import prepare_edit_request
from .auth import authenticate
from .errors import ApiError
from .jobs import submit_job
from .links import configured_base
from ..prompt_enhancer import MAX_PROMPT_CHARS as MAX_ENHANCE_PROMPT_CHARS
from .prompts import enhancer_of
from .responses import Origin, OutputOptions, encode_for_response
from .routes import prepare_generation
from .schemas import MAX_PROMPT_CHARS, GenerationRequest
from .state import ServerState

# Claude Desktop rejects tool results over 1 MiB and Claude Code counts tokens: the previews of one
# result share this much base64; the full images are links.
PREVIEW_BUDGET_CHARS = 700_000
PREVIEW_MAX_SIDE = 768
FETCH_MAX_BYTES = 20 * 1024 * 1024
LINK_PATTERN = re.compile(r"/v1/images/(img_[0-9a-f]{32})(/content)?$")
POLL_S = 0.1

Size = Annotated[str, Field(description="WIDTHxHEIGHT, multiples of 16, each side 64..2048, e.g. 1024x1024.")]


class ToolFailure(Exception):
    """What a tool answers with isError: the HTTP API's message for the same mistake."""


def principal_of_call(ctx: Context) -> Principal:
    request = ctx.request_context.request
    state = getattr(request, "scope", {}).get("state", {}) if request is not None else {}
    return state.get("principal", NOBODY)


def failure(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def preview(blob: bytes, budget_chars: int) -> ImageContent | None:
    """A JPEG of the image within `budget_chars` of base64 (smaller sides, then lower quality), or None."""
    image = Image.open(io.BytesIO(blob)).convert("RGB")
    image.thumbnail((PREVIEW_MAX_SIDE, PREVIEW_MAX_SIDE))
    for quality in (85, 70, 50):
        while True:
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            data = base64.b64encode(buffer.getvalue()).decode()
            if len(data) <= budget_chars:
                return ImageContent(type="image", data=data, mime_type="image/jpeg")
            if min(image.size) <= 64:
                break
            image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)))
    return None


class ImageTools:
    """The tools, bound to one server's state."""

    def __init__(self, server: ServerState):
        self.server = server

    def base_url(self, ctx: Context) -> str:
        settings = self.server.settings
        if settings.public_url:
            return settings.public_url.rstrip("/")
        request = ctx.request_context.request
        return f"{request.url.scheme}://{request.headers.get('host', f'{settings.host}:{settings.port}')}"

    def link(self, ctx: Context, record: ImageRecord) -> str:
        query, _ = self.server.signer.sign(record.id)
        return f"{self.base_url(ctx)}/v1/images/{record.id}/content?{query}"

    async def wait(self, ctx: Context, job: JobRecord) -> JobRecord:
        """Until the job ends or Z_IMAGE_MCP_WAIT_S passes, reporting progress as the job runs."""
        queue, runner = self.server.job_queue, self.server.job_runner
        deadline = time.monotonic() + self.server.settings.mcp_wait_s
        reported = (0, 0)
        while time.monotonic() < deadline:
            current = await queue.get(job.id) or job
            if current.status in FINISHED:
                return current
            progress = runner.progress(job.id)
            if progress is not None and progress != reported and progress[1]:
                reported = progress
                await ctx.report_progress(progress[0], progress[1], f"step {progress[0]} of {progress[1]}")
            await asyncio.sleep(POLL_S)
        return await queue.get(job.id) or job

    async def answer(self, ctx: Context, job: JobRecord, previews: bool) -> CallToolResult:
        """The job's images as links, structured data and inline previews; or, still running, its id."""
        if job.status not in FINISHED:
            text = (
                f"Job {job.id} is {job.status}; it keeps running. Call get_job with this id for its images."
            )
            return CallToolResult(
                content=[TextContent(type="text", text=text)],
                structured_content={"images": [], "job_id": job.id, "status": job.status},
            )
        if job.status != SUCCEEDED:
            reason = (job.error or {}).get("message", "it was cancelled")
            return failure(f"Job {job.id} {job.status}: {reason}")
        gallery = self.server.gallery
        result = job.result or {}
        records = [r for image_id in result.get("image_ids", []) if (r := await gallery.get(None, image_id))]
        images, content = [], []
        for record, seed in zip(records, result.get("seeds", []), strict=False):
            params = record.parameters
            url = self.link(ctx, record)
            images.append({"id": record.id, "url": url, "width": params.get("image_width", params.get("width")),
                           "height": params.get("image_height", params.get("height")), "seed": seed,
                           "revised_prompt": params.get("revised_prompt")})  # fmt: skip
            content.append(
                ResourceLink(type="resource_link", uri=url, name=record.id, mime_type=f"image/{record.format}",
                             size=record.bytes)  # fmt: skip
            )
        if previews and records:
            budget = PREVIEW_BUDGET_CHARS // len(records)
            for record in records:
                blob = await gallery.read(record)
                shown = await asyncio.to_thread(preview, blob, budget) if blob is not None else None
                if shown is not None:
                    content.append(shown)
        summary = f"Made {len(images)} image(s) (job {job.id}): " + ", ".join(
            f"{i['id']} {i['width']}x{i['height']} seed {i['seed']}" for i in images
        )
        return CallToolResult(
            content=[TextContent(type="text", text=summary), *content],
            structured_content={"images": images, "job_id": job.id},
        )

    async def run_job(
        self, ctx: Context, kind: str, body: dict, spec: Any, options: OutputOptions, files: dict | None, previews: bool
    ) -> CallToolResult:
        principal = principal_of_call(ctx)
        if self.server.gallery is None:
            return await self.run_inline(ctx, principal, spec, options)
        job = await submit_async(self.server, Origin(principal.name, "/mcp", ctx.request_id), kind, body, spec, files)
        return await self.answer(ctx, await self.wait(ctx, job), previews)

    async def run_inline(self, ctx: Context, principal: Principal, spec: Any, options: OutputOptions) -> CallToolResult:
        """Without a store there are no links or jobs: the full PNGs inline, when they fit a result."""
        handle = submit_job(self.server, spec, owner=principal.name, tag=ctx.request_id)
        images = await handle.result()
        encoded = await encode_for_response(self.server, spec, images, "png", None)
        data = [base64.b64encode(blob).decode() for blob in encoded]
        size = sum(len(text) for text in data)
        if size > PREVIEW_BUDGET_CHARS:
            return failure(
                f"The {len(data)} PNG(s) take {size:,} characters of base64, over the {PREVIEW_BUDGET_CHARS:,} a "
                "result may carry inline, and this server keeps no images to link to (Z_IMAGE_STORE=none): "
                "ask for fewer or smaller images."
            )
        width, height = spec.params.output_size
        images_info = [{"id": None, "url": None, "width": width, "height": height, "seed": seed,
                        "revised_prompt": spec.revised_prompt_of(seed)} for seed in spec.seeds]  # fmt: skip
        return CallToolResult(
            content=[TextContent(type="text", text=f"Made {len(data)} image(s), {width}x{height}, seeds "
                                 f"{', '.join(map(str, spec.seeds))} (not stored: this server keeps no images)."),
                     *(ImageContent(type="image", data=text, mime_type="image/png") for text in data)],
            structured_content={"images": images_info},
        )  # fmt: skip

    # -- the tools ----------------------------------------------------------------------------

    async def generate_image(
        self,
        ctx: Context,
        prompt: Annotated[str, Field(description="What to draw: a detailed description works best.", min_length=1,
                                     max_length=MAX_PROMPT_CHARS)],  # fmt: skip
        size: Size = "1024x1024",
        n: Annotated[int, Field(description="How many images (1..the server's limit, 4 by default).", ge=1, le=16)] = 1,
        seed: Annotated[int | None, Field(description="Seed of the first image (image i uses seed + i); "
                                                      "omit for a random one.", ge=0, le=2**53 - 1)] = None,  # fmt: skip
        steps: Annotated[int | None, Field(description="Denoising steps (default: the model's, 8 on Turbo).",
                                           ge=1, le=200)] = None,  # fmt: skip
        guidance: Annotated[float | None, Field(description="Classifier-free guidance (default: the model's).",
                                                ge=0, le=30)] = None,  # fmt: skip
        negative_prompt: Annotated[str | None, Field(description="What to avoid.", max_length=MAX_PROMPT_CHARS)] = None,
        loras: Annotated[list[dict[str, Any]] | None, Field(description='LoRAs to apply: [{"name": ..., "scale": 0.8}] '
                                                                        "(names from list_loras).")] = None,  # fmt: skip
        hires: Annotated[dict[str, Any] | None, Field(description='A hires fix: make the image at size, then upscale '
                                                            'and refine it, e.g. {"scale": 1.5} or {"width": 1536, '
                                                            '"height": 1536, "upscaler": "Lanczos"}.')] = None,  # fmt: skip
        enhance_prompt: Annotated[bool | Literal["per_image"] | None, Field(
            description='Expand a short prompt into a detailed caption first (revised_prompt says how); '
                        '"per_image" gives each image its own.')] = None,  # fmt: skip
        variation_strength: Annotated[float | None, Field(description="More variety between seeds, 0..1 (default 0).",
                                                          ge=0, le=1)] = None,  # fmt: skip
        previews: Annotated[bool, Field(description="Include small inline JPEG previews (the full images are "
                                                    "links).")] = True,  # fmt: skip
    ) -> CallToolResult:
        """Generate images from a text prompt with Z-Image. Returns links to the full-size PNGs, their
        ids and seeds, and small previews. Long work returns a job id to pass to get_job."""
        body: dict[str, Any] = {"prompt": prompt, "size": size, "n": n, "seed": seed, "num_inference_steps": steps,
                                "guidance_scale": guidance, "negative_prompt": negative_prompt, "loras": loras,
                                "hires": hires, "enhance_prompt": enhance_prompt,
                                "variation_strength": variation_strength, "response_format": "url"}  # fmt: skip
        body = {key: value for key, value in body.items() if value is not None}
        try:
            data = msgspec.convert(body, GenerationRequest)
            if self.server.gallery is None:
                data = msgspec.structs.replace(data, response_format="b64_json")
            spec, options = await prepare_generation(self.server, data)
            return await self.run_job(ctx, "generations", body | {"seed": spec.seeds[0]}, spec, options, None, previews)
        except ApiError as exc:
            return failure(exc.message)
        except msgspec.ValidationError as exc:
            return failure(f"Invalid arguments: {exc}")

    async def edit_image(
        self,
        ctx: Context,
        image: Annotated[str, Field(description="The image to edit: a link or id of an image on this server "
                                                "(from generate_image or list_images), an https URL of an allowed "
                                                "host, or base64 (small images).", min_length=1)],  # fmt: skip
        prompt: Annotated[str, Field(description="What the edited image should show.", min_length=1,
                                     max_length=MAX_PROMPT_CHARS)],  # fmt: skip
        mask: Annotated[str | None, Field(description="Optional mask, given as image is: transparent (or white "
                                                      "without alpha) marks what to repaint.")] = None,  # fmt: skip
        strength: Annotated[float | None, Field(description="How much to redraw, 0 < s <= 1 (default 0.6).",
                                                gt=0, le=1)] = None,  # fmt: skip
        seed: Annotated[int | None, Field(description="Seed; omit for a random one.", ge=0, le=2**53 - 1)] = None,
        previews: Annotated[bool, Field(description="Include small inline JPEG previews.")] = True,
    ) -> CallToolResult:
        """Edit an image with a prompt (image to image, or inpainting with a mask)."""
        principal = principal_of_call(ctx)
        try:
            files = {"image": [await self.image_bytes(image, principal, "image")]}
            if mask is not None:
                files["mask"] = [await self.image_bytes(mask, principal, "mask")]
            values = {"prompt": prompt, "response_format": "url" if self.server.gallery is not None else "b64_json"}
            if strength is not None:
                values["strength"] = str(strength)
            if seed is not None:
                values["seed"] = str(seed)
            spec, options = await prepare_edit_request(self.server, values, files)
            return await self.run_job(ctx, "edits", values | {"seed": str(spec.seeds[0])}, spec, options, files, previews)
        except (ApiError, ToolFailure) as exc:
            return failure(exc.message if isinstance(exc, ApiError) else str(exc))

    async def image_bytes(self, reference: str, principal: Principal, name: str) -> bytes:
        """An input image: one of the caller's stored images (by link or id), an allowed https URL, or base64.
        Checked before anything is fetched."""
        gallery = self.server.gallery
        parts = urlsplit(reference)
        stored = LINK_PATTERN.search(parts.path) if parts.scheme in ("http", "https") else None
        image_id = stored.group(1) if stored else (reference if re.fullmatch(r"img_[0-9a-f]{32}", reference) else None)
        if image_id is not None:
            own_host = parts.hostname in (None, "") or parts.netloc == urlsplit(configured_base(self.server)).netloc
            if stored is None or own_host or parts.hostname in ("127.0.0.1", "localhost", self.server.settings.host):
                record = await gallery.get(principal, image_id) if gallery is not None else None
                blob = await gallery.read(record) if record is not None else None
                if blob is None:
                    raise ToolFailure(f"{name}: no image with id '{image_id}' (of yours) on this server.")
                return blob
        if parts.scheme in ("http", "https"):
            return await self.fetch(reference, name)
        try:
            blob = base64.b64decode(reference.split(",", 1)[-1], validate=True)
        except ValueError:
            raise ToolFailure(f"{name}: expected a link or id of an image on this server, an https URL, or base64.") from None
        if len(blob) > self.server.settings.max_upload_bytes:
            raise ToolFailure(f"{name}: the image is larger than {self.server.settings.max_upload_bytes} bytes.")
        return blob

    async def fetch(self, url: str, name: str) -> bytes:
        parts = urlsplit(url)
        allowed = self.server.settings.mcp_fetch_allow
        if parts.scheme != "https" or parts.hostname not in allowed or parts.username or parts.password:
            raise ToolFailure(
                f"{name}: this server fetches images only from https URLs of hosts in Z_IMAGE_MCP_FETCH_ALLOW "
                f"({', '.join(allowed) or 'none'}); send the image as base64 or one of this server's links."
            )
        try:
            async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=20) as client:
                async with client.stream("GET", url) as response:
                    if response.status_code != 200:
                        raise ToolFailure(f"{name}: fetching the image answered {response.status_code}.")
                    chunks, total = [], 0
                    async for chunk in response.aiter_bytes():
                        total += len(chunk)
                        if total > FETCH_MAX_BYTES:
                            raise ToolFailure(f"{name}: the image is larger than {FETCH_MAX_BYTES} bytes.")
                        chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise ToolFailure(f"{name}: the image could not be fetched ({type(exc).__name__}).") from None
        return b"".join(chunks)

    async def list_images(
        self,
        ctx: Context,
        query: Annotated[str | None, Field(description="Only images whose prompt contains this text.",
                                           max_length=1000)] = None,  # fmt: skip
        limit: Annotated[int, Field(description="How many, newest first (1..100).", ge=1, le=100)] = 20,
    ) -> CallToolResult:
        """The caller's stored images, newest first, with links, prompts and seeds."""
        if self.server.gallery is None:
            return failure(f"This server keeps no images: {self.server.gallery_error}.")
        try:
            records, more = await self.server.gallery.page(principal_of_call(ctx), limit, None, query or None)
        except GalleryUnavailable as exc:
            return failure(f"The image history is unavailable: {exc}.")
        images = [{"id": r.id, "url": self.link(ctx, r), "prompt": r.prompt, "created_at": int(r.created_at),
                   "width": r.parameters.get("width"), "height": r.parameters.get("height"),
                   "seed": r.parameters.get("seed")} for r in records]  # fmt: skip
        lines = [f"{i['id']}  {i['width']}x{i['height']}  seed {i['seed']}  {i['prompt'][:80]}" for i in images]
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(lines) or "No images yet.")],
            structured_content={"images": images, "has_more": more},
        )

    async def get_job(
        self,
        ctx: Context,
        id: Annotated[str, Field(description="The job id a tool answered with (job_...).", max_length=64)],
        previews: Annotated[bool, Field(description="Include small inline JPEG previews.")] = True,
    ) -> CallToolResult:
        """A job's status; its images once it has succeeded."""
        queue = self.server.job_queue
        job = await queue.get(id) if queue is not None else None
        sees = principal_of_call(ctx).sees
        if job is None or sees not in (None, job.owner):
            return failure(f"No job with id '{id[:64]}'.")
        if job.status in FINISHED:
            return await self.answer(ctx, job, previews)
        record = await job_object(self.server, job, None)
        return CallToolResult(
            content=[TextContent(type="text", text=f"Job {job.id} is {job.status}.")],
            structured_content={"images": [], "job_id": job.id, "status": job.status,
                                "progress": record.get("progress"), "queue_position": record.get("queue_position")},
        )  # fmt: skip

    async def enhance_prompt(
        self,
        prompt: Annotated[str, Field(description="A short prompt to expand.", min_length=1,
                                     max_length=MAX_ENHANCE_PROMPT_CHARS)],  # fmt: skip
        seed: Annotated[int | None, Field(description="Sample with this seed for a different take; omit for the "
                                                      "deterministic one.", ge=0, le=2**53 - 1)] = None,  # fmt: skip
    ) -> CallToolResult:
        """Expand a short prompt into the detailed caption Z-Image draws best from, without generating:
        subjects, counts and quoted text kept; composition, light and materials added."""
        try:
            result = await enhancer_of(self.server, "prompt").enhance(prompt, seed=seed)
        except ApiError as exc:
            return failure(exc.message)
        text = result.revised_prompt or f"Kept as written ({result.fallback}): {result.prompt}"
        return CallToolResult(
            content=[TextContent(type="text", text=text)],
            structured_content={"prompt": prompt, "revised_prompt": result.revised_prompt, "fallback": result.fallback},
        )

    async def list_loras(self) -> CallToolResult:
        """The LoRAs generate_image may apply, by name."""
        infos = await self.server.usable_loras()
        names = [info.name for info in infos]
        return CallToolResult(
            content=[TextContent(type="text", text="\n".join(names) or "No LoRAs on this server.")],
            structured_content={"loras": [{"name": i.name, "rank": i.rank, "sha256": i.sha256_short} for i in infos]},
        )


def allowed_hosts(server: ServerState) -> list[str]:
    """The Host values /mcp answers: the bind address and loopback on any port, the public URL's
    host, and Z_IMAGE_MCP_ALLOWED_HOSTS; the SDK refuses the rest (DNS rebinding) with 421."""
    settings = server.settings
    hosts = [f"{settings.host}:*", "127.0.0.1:*", "localhost:*", "[::1]:*", *settings.mcp_allowed_hosts]
    if settings.public_url:
        hosts.append(urlsplit(settings.public_url).netloc)
    return hosts


def build_mcp(server: ServerState) -> tuple[MCPServer, Any]:
    """The MCP server with the tools, and its Streamable HTTP app (stateless, JSON responses)."""
    tools = ImageTools(server)
    mcp = MCPServer(
        name="zimage-server",
        instructions="Z-Image text-to-image: generate_image, edit_image, enhance_prompt, list_images, get_job, "
        "list_loras. "
        "Full-size images are links (valid an hour); get_job finishes long work.",
    )
    for method in (
        tools.generate_image, tools.edit_image, tools.enhance_prompt, tools.list_images, tools.get_job, tools.list_loras
    ):  # fmt: skip
        mcp.add_tool(method, name=method.__name__, structured_output=False)
    hosts = allowed_hosts(server)
    app = mcp.streamable_http_app(
        streamable_http_path="/",
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(
            allowed_hosts=hosts, allowed_origins=[f"{scheme}://{host}" for scheme in ("http", "https") for host in hosts]
        ),
    )
    return mcp, app


@asgi(path="/mcp", is_mount=True, copy_scope=True)
async def mcp_endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """The SDK's app, mounted, behind the same keys as the HTTP API (checked here: Litestar's
    guards do not run on mounts). A missing or wrong key is a 401 with WWW-Authenticate."""
    try:
        authenticate(ASGIConnection(scope, receive, send))
    except ApiError as error:
        body = msgspec.json.encode({"error": error.detail})
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(name.lower().encode(), value.encode()) for name, value in (error.headers or {}).items()]
        await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    await scope["app"].state.server.mcp_app(scope, receive, send)
