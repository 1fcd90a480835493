"""Jobs that outlive the connection: `Prefer: respond-async` on any generation or edit route.

The route checks the request exactly as it would a synchronous one, then `accept_job` writes it
(uploads into the store, the rest into the job's row, seeds fixed) and answers 202 with a
Location: the job is durable before the client hears of it. The `JobRunner` of every replica takes
queued jobs whenever its batcher has room, rebuilds each request with its route's own `Replay`
(so a job runs exactly what the synchronous route would have), runs it through the same batcher,
keeps the images, records the outcome, and calls the webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request, Response

from ..gallery import GalleryUnavailable
from ..index import INDEX_FAILURES
from ..job_queue import CANCELLED, FAILED, MAX_ATTEMPTS, QUEUED, RUNNING, SUCCEEDED, JobQueue, JobRecord, new_job_id
from ..store import StoreError, first_line
from ..specs import GenerationSpec
from .errors import ApiError
from .guards import RETRY_AFTER_S
from .jobs import submit_job
from .links import configured_base, image_link
from .responses import Origin, OutputOptions, encode_for_response, keep_images, origin_of
from .state import ServerState

log = logging.getLogger("zimage_server.jobs")

PREFER_ASYNC = re.compile(r"(^|[,;\s])respond-async\s*($|[,;])", re.IGNORECASE)
POLL_S = 1.0  # how often an idle runner looks for jobs other replicas accepted

# Rebuilds a job's spec and output options from its stored request, as its route does.
Replay = Callable[[ServerState, dict[str, Any], dict[str, list[bytes]]], Awaitable[tuple[GenerationSpec, OutputOptions]]]
REPLAYS: dict[str, Replay] = {}  # kind -> replay, registered by each route module


def wants_async(request: Request) -> bool:
    """`Prefer: respond-async` (RFC 7240); any other preference is ignored."""
    return any(PREFER_ASYNC.search(value) for value in request.headers.getall("prefer", []))


def check_async_fields(stream: bool | None, store: bool | None = None) -> None:
    if store is False:
        raise ApiError(
            400, "An async job's images are handed out from the store: drop store=false, or the Prefer header.",
            param="store",
        )  # fmt: skip
    if stream:
        raise ApiError(
            400, "An async job (Prefer: respond-async) has no event stream: drop stream, or the Prefer header.",
            param="stream",
        )  # fmt: skip


def check_sync_fields(webhook_url: str | None) -> None:
    if webhook_url is not None:
        raise ApiError(
            400, "webhook_url is called when an async job finishes: send the request with 'Prefer: respond-async'.",
            param="webhook_url",
        )  # fmt: skip


def job_queue_of(server: ServerState) -> JobQueue:
    if server.job_queue is None:
        raise ApiError(
            503,
            f"Asynchronous jobs need the image store and its index, and {server.gallery_error or 'they are not open yet'}.",
            code="store_unavailable",
        )
    return server.job_queue


async def accept_job(
    request: Request,
    server: ServerState,
    kind: str,
    body: dict[str, Any],
    spec: GenerationSpec,
    files: dict[str, list[bytes]] | None = None,
    webhook_url: str | None = None,
) -> Response:
    """Write the job and answer 202 with its Location: it is durable before the client hears of it."""
    if webhook_url is not None:
        await server.webhooks.check(webhook_url)
    job = await submit_async(server, origin_of(request), kind, body, spec, files, webhook_url)
    return Response(
        await job_object(server, job, request),
        status_code=202,
        headers={"Location": f"/v1/images/jobs/{job.id}"},
    )


async def submit_async(
    server: ServerState,
    origin: Origin,
    kind: str,
    body: dict[str, Any],
    spec: GenerationSpec,
    files: dict[str, list[bytes]] | None = None,
    webhook_url: str | None = None,
) -> JobRecord:
    """Write a job: its uploads into the store, then its row (503 if either cannot be written;
    429 when the shared queue is full)."""
    queue = job_queue_of(server)
    limit = server.settings.max_jobs_queued
    try:
        waiting = await queue.queued_images()
    except INDEX_FAILURES as exc:
        raise ApiError(503, f"The job could not be queued ({first_line(exc)}); retry shortly.", code="store_unavailable") from None
    if waiting + spec.n > limit:
        raise ApiError(
            429, f"The server is busy (the job queue holds {waiting} images, at most {limit}: Z_IMAGE_MAX_JOBS_QUEUED); "
            "retry shortly.", code="queue_full", headers={"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    job_id = new_job_id()
    stored_files: dict[str, list[str]] = {}
    try:
        for field, blobs in (files or {}).items():
            stored_files[field] = []
            for number, blob in enumerate(blobs):
                key = f"jobs/{job_id}/{field}-{number}"
                await server.gallery.store.put(key, blob)
                stored_files[field].append(key)
    except StoreError as exc:
        raise ApiError(503, f"The job's uploads could not be stored ({exc}); retry shortly.", code="store_unavailable") from None
    job = JobRecord(
        id=job_id,
        owner=origin.owner,
        created_at=time.time(),
        status=QUEUED,
        kind=kind,
        request={"body": body, "files": stored_files, "route": origin.route},
        request_id=origin.request_id,
        model=server.variant.model_name,
        n=spec.n,
        webhook_url=webhook_url,
        webhook_done=webhook_url is None and server.settings.webhook_url is None,
    )
    try:
        await queue.submit(job)
    except INDEX_FAILURES as exc:
        raise ApiError(503, f"The job could not be queued ({first_line(exc)}); retry shortly.", code="store_unavailable") from None
    server.job_runner.wake()
    return job


async def job_object(
    server: ServerState, job: JobRecord, request: Request | None, inline_images: bool = True
) -> dict[str, Any]:
    """What GET /v1/images/jobs/{id} answers (and the 202, and webhooks carry). Without
    `inline_images` (the list) its images are links only, never their bytes in base64."""
    body: dict[str, Any] = {
        "id": job.id,
        "object": "image.job",
        "status": job.status,
        "created_at": int(job.created_at),
        "model": job.model,
        "n": job.n,
        "request_id": job.request_id,
    }
    if job.status == QUEUED:
        body["queue_position"] = await server.job_queue.position(job)
    if job.status == RUNNING:
        running = server.job_runner.progress(job.id)
        step, total = running if running is not None else (job.step, job.total)
        body["progress"] = {"step": step or 0, "total": total or 0}
    if job.finished_at is not None:
        body["finished_at"] = int(job.finished_at)
    if job.status == SUCCEEDED and job.result is not None:
        body |= await result_data(server, job, request, inline_images)
    if job.error is not None:
        body["error"] = job.error
    return body


async def result_data(
    server: ServerState, job: JobRecord, request: Request | None, inline_images: bool = True
) -> dict[str, Any]:
    """`data` as the synchronous response would have it: fresh links, and base64 when asked for
    (and `inline_images`)."""
    result = job.result or {}
    # As the synchronous answer would carry it.
    want_b64 = inline_images and result.get("response_format") == "b64_json"
    items = []
    revised = result.get("revised_prompts") or [None] * len(result.get("seeds", []))
    for image_id, seed, revised_prompt in zip(result.get("image_ids", []), result.get("seeds", []), revised, strict=False):
        item: dict[str, Any] = {"id": image_id, "seed": seed, "revised_prompt": revised_prompt}
        try:
            record = await server.gallery.get(None, image_id) if server.gallery is not None else None
        except GalleryUnavailable as exc:
            raise ApiError(503, f"The job's images are unavailable ({exc}).", code="store_unavailable") from None
        if record is not None:
            if request is not None:
                item["url"], item["expires_at"] = image_link(request, server, record)
            else:  # a webhook: no request to take the host from
                query, item["expires_at"] = server.signer.sign(record.id)
                item["url"] = f"{configured_base(server)}/v1/images/{record.id}/content?{query}"
            if want_b64:
                try:
                    blob = await server.gallery.read(record)
                except GalleryUnavailable as exc:
                    raise ApiError(503, f"The job's images are unavailable ({exc}).", code="store_unavailable") from None
                item["b64_json"] = base64.b64encode(blob).decode() if blob is not None else None
        items.append(item)
    return {"data": items, "output_format": result.get("output_format"), "size": result.get("size")}


class JobRunner:
    """Takes queued jobs while the batcher has room and runs them; one per replica."""

    def __init__(self, server: ServerState, queue: JobQueue):
        self.server = server
        self.queue = queue
        self.replica = "replica_" + secrets.token_hex(8)
        self.lease_s = server.settings.job_lease_s
        self._wake = asyncio.Event()
        self._running: dict[str, Any] = {}  # job id -> its JobHandle
        self._stopped: dict[str, str] = {}  # job id -> why we stopped it: "cancel" (asked) or "lost" (lease)
        self._tasks: set[asyncio.Task] = set()  # running jobs
        self._deliveries: set[asyncio.Task] = set()  # webhook calls, retrying up to 15 minutes
        self._stopping = False
        self._preparing = 0  # images of jobs taken but not yet in the batcher's queue
        self.queued = 0  # the shared queue's depth at the last look, for /metrics
        self._taking: asyncio.Task | None = None  # run_forever, once the model is ready

    def start_taking(self) -> None:
        """Start taking queued jobs: once the model is loaded. Before that the runner still
        answers for its jobs (progress, cancels, their webhooks), which it has from the start.
        Once only, and not after a drain began (the model can finish loading during one)."""
        if self._taking is None and not self._stopping:
            self._taking = asyncio.create_task(self.run_forever(), name="job-runner")

    def wake(self) -> None:
        self._wake.set()

    def cancel_local(self, job_id: str) -> None:
        """Stop a job this replica runs now, at its next step (other replicas see the cancel at
        their next lease renewal)."""
        handle = self._running.get(job_id)
        if handle is not None:
            self._stopped[job_id] = "cancel"
            handle.cancel()

    def pause(self) -> None:
        """Take no more jobs (a drain began): what is queued stays queued for the next start or replica."""
        self._stopping = True

    def progress(self, job_id: str) -> tuple[int, int] | None:
        handle = self._running.get(job_id)
        return (handle.step, handle.total) if handle is not None else None

    def has_room(self) -> bool:
        server = self.server
        batcher = server.batcher
        return (
            server.taking_work
            and not self._stopping
            and batcher is not None
            and batcher.queued_images + self._preparing < server.settings.max_batch_size
        )

    async def run_forever(self) -> None:
        """Until cancelled: take what fits, then wait for a wake-up (a local submit) or the next poll."""
        await self.resume_webhooks()
        while True:
            try:
                while self.has_room() and (job := await self.queue.claim(self.replica, self.lease_s)) is not None:
                    self._preparing += job.n
                    task = asyncio.create_task(self.run(job), name=f"job-{job.id}")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                self.queued = await self.queue.queued_count()
            except Exception as exc:  # the index is down: keep the server up, try again at the next poll
                log.error("taking jobs from the queue failed: %s", exc)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def run(self, job: JobRecord) -> None:
        """One job, start to end. Whatever goes wrong here is logged and the job goes back to the
        queue (or, stopped by a cancel, ends cancelled): it is never left running with nobody on it."""
        try:
            try:
                handle = await self.start(job)
            finally:
                self._preparing -= job.n
            if handle is not None:
                await self.wait(job, *handle)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("job %s: %s; back to the queue", job.id, first_line(exc))
            with contextlib.suppress(Exception):
                await self.queue.release(job.id, self.replica)

    async def start(self, job: JobRecord) -> tuple[Any, GenerationSpec, OutputOptions] | None:
        """Rebuild the job's request and queue it on the batcher; None if it ended here instead."""
        if job.cancel_requested:  # cancelled while its last runner held it: it does not run again
            await self.finish(job, CANCELLED)
            return None
        if job.attempts > MAX_ATTEMPTS:
            await self.finish(job, FAILED, error=job_error(ApiError(500, f"The job was interrupted {MAX_ATTEMPTS} times and is given up.")))
            return None
        try:
            files = {field: [await self.server.gallery.store.get(key) for key in keys]
                     for field, keys in job.request.get("files", {}).items()}  # fmt: skip
        except StoreError as exc:  # the store is down for now: someone runs it later
            log.warning("job %s: its uploads cannot be read (%s); back to the queue", job.id, exc)
            await self.queue.release(job.id, self.replica)
            return None
        try:
            spec, options = await REPLAYS[job.kind](self.server, job.request["body"], files)
        except ApiError as exc:  # the request no longer fits this server (a LoRA removed, another model)
            await self.finish(job, FAILED, error=job_error(exc))
            return None
        except Exception as exc:
            log.error("job %s could not be prepared: %s", job.id, exc)
            await self.finish(job, FAILED, error=job_error(ApiError(500, "The job could not be prepared.")))
            return None
        try:
            handle = submit_job(self.server, spec, owner=job.owner, tag=job.request_id or job.id)
        except ApiError:  # full, or shutting down: back to the queue for whoever has room
            await self.queue.release(job.id, self.replica)
            return None
        return handle, spec, options

    async def wait(self, job: JobRecord, handle: Any, spec: GenerationSpec, options: OutputOptions) -> None:
        """Until the job's images are made (or it fails, or is stopped); then record how it ended."""
        self._running[job.id] = handle
        keeper = asyncio.create_task(self.keep_lease(job, handle))
        failure: ApiError | None = None
        try:
            images = await handle.result()
        except ApiError as exc:
            failure = exc
        except asyncio.CancelledError:
            # The batcher dropped the queued job (our cancel); anything else is this task's own end.
            if not handle.future.cancelled() or asyncio.current_task().cancelling():
                raise
            failure = ApiError(499, "cancelled")
        finally:
            keeper.cancel()
            self._running.pop(job.id, None)
        stopped = self._stopped.pop(job.id, None)
        if stopped == "lost":
            return  # another replica runs it now; only one may record it
        if stopped == "cancel":
            await self.finish(job, CANCELLED)
        elif failure is not None and self._stopping:
            await self.queue.release(job.id, self.replica)  # the drain ran out of time: run it at the next start
        elif failure is not None:
            await self.finish(job, FAILED, error=job_error(failure))
        else:
            await self.succeed(job, spec, options, images)

    async def succeed(self, job: JobRecord, spec: GenerationSpec, options: OutputOptions, images: list) -> None:
        try:
            if job.attempts > 1:  # an earlier run may have kept its images before its replica died
                await self.server.gallery.forget_request(job.id)
            encoded = await encode_for_response(self.server, spec, images, options.output_format, options.compression)
            # The job's images carry its id as their request id: what makes a rerun's clean-up exact.
            origin = Origin(job.owner, job.request.get("route", ""), job.id)
            records = await keep_images(origin, self.server, spec, encoded, options.output_format, options, wait=True)
        except (ApiError, GalleryUnavailable) as exc:  # the store failed: the images are lost with it, say so
            message = exc.message if isinstance(exc, ApiError) else f"The images could not be stored ({exc})."
            await self.finish(job, FAILED, error=job_error(ApiError(503, message, code="store_unavailable")))
            return
        result = {
            "image_ids": [r.id for r in records or []],
            "seeds": list(spec.seeds),
            "revised_prompts": [spec.revised_prompt_of(seed) for seed in spec.seeds],
            "response_format": options.response_format,
            "output_format": options.output_format,
            "size": "{}x{}".format(*spec.params.output_size),
        }
        await self.finish(job, SUCCEEDED, result=result)

    async def keep_lease(self, job: JobRecord, handle: Any) -> None:
        """Renew the lease (with the progress) until the job ends; stop it when a cancel was asked,
        or when the lease was lost (another replica took it over: only one may finish it)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                cancel = await self.queue.renew(job.id, self.replica, self.lease_s, handle.step, handle.total)
            except Exception as exc:
                log.warning("renewing the lease of job %s failed: %s", job.id, exc)
                continue
            if cancel is None or cancel:
                self._stopped[job.id] = "lost" if cancel is None else "cancel"
                handle.cancel()
                return

    async def finish(self, job: JobRecord, status: str, result: dict | None = None, error: dict | None = None) -> None:
        if not await self.queue.finish(job.id, self.replica, status, result=result, error=error):
            return  # no longer ours
        log.info("job %s %s", job.id, status)
        await self.ended(job.id)

    async def ended(self, job_id: str) -> None:
        """A job reached its end (here, or cancelled while queued): its uploads go, its webhooks fire."""
        done = await self.queue.get(job_id)
        if done is None:
            return
        for keys in done.request.get("files", {}).values():
            for key in keys:
                with contextlib.suppress(StoreError):
                    await self.server.gallery.store.delete(key)
        if not done.webhook_done:
            self.notify(done)

    def notify(self, job: JobRecord) -> None:
        """Call the job's webhook and the server's, in the background; the row remembers once delivered."""
        server = self.server
        targets = [url for url in (job.webhook_url, server.settings.webhook_url) if url]

        async def deliver() -> None:
            payload = await job_object(server, job, None)
            # Together: one receiver's retries (up to 15 minutes) must not hold back the other's call.
            await asyncio.gather(*(
                server.webhooks.deliver(url, f"image.job.{job.status}", payload, f"{job.id}-{index}")
                for index, url in enumerate(targets)
            ))  # fmt: skip
            # Delivered, or given up after the sender's retries: either way not again at the next start.
            await self.queue.webhook_done(job.id)

        task = asyncio.create_task(deliver(), name=f"webhook-{job.id}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def resume_webhooks(self) -> None:
        """Webhooks a crash cut short are delivered again (receivers de-duplicate on webhook-id)."""
        with contextlib.suppress(Exception):
            for job in await self.queue.undelivered():
                self.notify(job)

    async def stop(self, timeout_s: float) -> None:
        """After the batcher's drain: let the jobs record how they ended (up to `timeout_s`), then
        stop what is left. Webhook calls still retrying stop too: the next start resumes them."""
        self.pause()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        leftovers = [*self._tasks, *self._deliveries, *([self._taking] if self._taking else [])]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)


def job_error(error: ApiError) -> dict[str, Any]:
    """A failed job's `error`: the envelope's inside, as its row keeps it."""
    return msgspec.to_builtins(error.detail)
