"""The async jobs' routes: status, list, cancel. Jobs belong to keys exactly as images do."""

from __future__ import annotations

from litestar import Request, get, post
from litestar.datastructures import State

from ..index import UnknownCursor
from ..job_queue import CANCELLED, QUEUED, JobRecord, is_job_id
from .async_jobs import job_object, job_queue_of
from .auth import principal_of
from .errors import ApiError, not_found
from .history import parse_limit
from .state import ServerState, server_state


async def visible_job(request: Request, server: ServerState, job_id: str) -> JobRecord:
    """The job, if the caller may see it; another key's job is a 404, exactly as a missing one."""
    queue = job_queue_of(server)
    job = await queue.get(job_id) if is_job_id(job_id) else None
    sees = principal_of(request).sees
    if job is None or sees not in (None, job.owner):
        raise not_found("job", job_id, "job_id")
    return job


@get("/v1/images/jobs/{job_id:str}", summary="An async job's status, progress, and images once done.")
async def get_job(request: Request, state: State, job_id: str) -> dict:
    server = server_state(state)
    return await job_object(server, await visible_job(request, server, job_id), request)


@get("/v1/images/jobs", summary="The caller's async jobs, newest first (an admin key: everyone's).")
async def list_jobs(request: Request, state: State, limit: str | None = None, after: str | None = None) -> dict:
    server = server_state(state)
    queue = job_queue_of(server)
    try:
        jobs, has_more = await queue.page(principal_of(request).sees, parse_limit(limit), after or None)
    except UnknownCursor:
        raise ApiError(400, "Invalid after: it must be the id of a job in this list.", param="after") from None
    # Links only: a page of 100 finished jobs would otherwise read and base64 every image they made.
    data = [await job_object(server, job, request, inline_images=False) for job in jobs]
    return {
        "object": "list", "data": data, "has_more": has_more,
        "first_id": jobs[0].id if jobs else None, "last_id": jobs[-1].id if jobs else None,
    }  # fmt: skip


@post("/v1/images/jobs/{job_id:str}/cancel", status_code=200, summary="Cancel an async job (idempotent).")
async def cancel_job(request: Request, state: State, job_id: str) -> dict:
    """A queued job never runs; a running one stops at its next step; a finished one is unchanged
    (its status says so)."""
    server = server_state(state)
    job = await visible_job(request, server, job_id)
    if not job.finished:
        was_queued = job.status == QUEUED
        job = await job_queue_of(server).cancel(job.id) or job
        server.job_runner.cancel_local(job.id)
        if was_queued and job.status == CANCELLED:  # ended here: nobody else will say so
            await server.job_runner.ended(job.id)
    return await job_object(server, job, request)


JOB_ROUTES = [get_job, list_jobs, cancel_job]
