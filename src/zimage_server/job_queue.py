"""The durable queue of asynchronous jobs, in the index's database: one row per job.

A job is accepted only once its row is committed, so a crash loses nothing accepted. Replicas on
one PostgreSQL share the queue: a replica takes a job by writing its own name and a lease expiry
into the row with a compare-and-set UPDATE (only one UPDATE can move a row out of `queued`, or
take over a lease that expired), renews the lease while the job runs, and a replica that dies
simply stops renewing: its jobs are taken over and run again from the start, with the same
seeds. The same statements run on SQLite, the single-machine default.

A small lease table in our own schema rather than procrastinate or pgqueuer: both are PostgreSQL
only, and the SQLite default must run the same code; the queue is six statements.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update

from .index import ImageIndex, UnknownCursor, jobs_table

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
# A job that failed to run this many times (its replica died each time) fails instead of looping.
MAX_ATTEMPTS = 3


def new_job_id() -> str:
    return "job_" + secrets.token_hex(16)


def is_job_id(text: str) -> bool:
    return len(text) == 36 and text.startswith("job_") and all(c in "0123456789abcdef" for c in text[4:])


@dataclass(frozen=True)
class JobRecord:
    id: str
    owner: str
    created_at: float
    status: str
    kind: str
    request: dict[str, Any] = field(repr=False)
    request_id: str
    model: str
    n: int
    webhook_url: str | None = None
    lease_owner: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    step: int | None = None
    total: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    webhook_done: bool = False

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


COLUMNS = tuple(f.name for f in fields(JobRecord))


def record(row: Any) -> JobRecord:
    return JobRecord(**{name: row._mapping[name] for name in COLUMNS})


class JobQueue:
    def __init__(self, index: ImageIndex):
        self._engine = index.engine

    async def submit(self, job: JobRecord) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(insert(jobs_table).values(**{name: getattr(job, name) for name in COLUMNS}))

    async def get(self, job_id: str) -> JobRecord | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(jobs_table).where(jobs_table.c.id == job_id))).first()
        return record(row) if row is not None else None

    async def page(self, owner: str | None, limit: int, after: str | None) -> tuple[list[JobRecord], bool]:
        """Newest first, as the image list pages (owner None: everyone's)."""
        jobs = jobs_table.c
        conditions = [jobs.owner == owner] if owner is not None else []
        async with self._engine.connect() as conn:
            if after is not None:
                cursor = (await conn.execute(select(jobs.created_at).where(jobs.id == after, *conditions))).first()
                if cursor is None:
                    raise UnknownCursor(after)
                conditions.append(
                    or_(jobs.created_at < cursor.created_at, and_(jobs.created_at == cursor.created_at, jobs.id < after))
                )
            statement = (
                select(jobs_table).where(*conditions).order_by(jobs.created_at.desc(), jobs.id.desc()).limit(limit + 1)
            )
            rows = (await conn.execute(statement)).all()
        return [record(row) for row in rows[:limit]], len(rows) > limit

    async def claim(self, replica: str, lease_s: float, now: float | None = None) -> JobRecord | None:
        """Take the oldest job that is queued, or whose runner's lease ran out; None if there is none.

        The UPDATE's WHERE repeats the condition, so of two replicas reading the same candidate
        only one moves it (PostgreSQL re-checks WHERE on the locked row; SQLite has one writer)."""
        now = now if now is not None else time.time()
        jobs = jobs_table.c
        # Never our own lapsed lease: a runner here that was slow to renew still runs that job.
        lapsed = and_(jobs.status == RUNNING, jobs.lease_until < now, jobs.lease_owner != replica)
        takeable = or_(jobs.status == QUEUED, lapsed)
        for _ in range(5):  # lost races: try the next candidate
            async with self._engine.begin() as conn:
                owner = await self._next_owner(conn, takeable)
                if owner is None:
                    return None
                candidate = (
                    await conn.execute(
                        select(jobs.id).where(takeable, jobs.owner == owner).order_by(jobs.created_at, jobs.id).limit(1)
                    )
                ).first()
                if candidate is None:
                    continue
                moved = await conn.execute(
                    update(jobs_table)
                    .where(jobs.id == candidate.id, takeable)
                    .values(
                        status=RUNNING, lease_owner=replica, lease_until=now + lease_s, started_at=now,
                        attempts=jobs.attempts + 1, step=None, total=None,
                    )  # fmt: skip
                )
            if moved.rowcount == 1:
                return await self.get(candidate.id)
        return None

    async def _next_owner(self, conn: Any, takeable: Any) -> str | None:
        """Fair shares across keys: the owner with the fewest jobs running anywhere, oldest waiting
        job first among equals. So one key's 40 queued jobs cannot hold back another key's one."""
        jobs = jobs_table.c
        running = dict(
            (await conn.execute(select(jobs.owner, func.count()).where(jobs.status == RUNNING).group_by(jobs.owner))).all()
        )
        waiting = (await conn.execute(select(jobs.owner, func.min(jobs.created_at)).where(takeable).group_by(jobs.owner))).all()
        if not waiting:
            return None
        return min(waiting, key=lambda row: (running.get(row[0], 0), row[1]))[0]

    async def renew(self, job_id: str, replica: str, lease_s: float, step: int | None, total: int | None) -> bool | None:
        """Extend our lease and record progress. Whether a cancel was asked; None if the job is no longer ours."""
        jobs = jobs_table.c
        async with self._engine.begin() as conn:
            moved = await conn.execute(
                update(jobs_table)
                .where(jobs.id == job_id, jobs.lease_owner == replica, jobs.status == RUNNING)
                .values(lease_until=time.time() + lease_s, step=step, total=total)
            )
            if moved.rowcount != 1:
                return None
            return bool((await conn.execute(select(jobs.cancel_requested).where(jobs.id == job_id))).scalar_one())

    async def finish(
        self, job_id: str, replica: str, status: str, result: dict | None = None, error: dict | None = None
    ) -> bool:
        """Record the outcome, if the job is still ours (a replica that lost its lease keeps quiet)."""
        jobs = jobs_table.c
        async with self._engine.begin() as conn:
            moved = await conn.execute(
                update(jobs_table)
                .where(jobs.id == job_id, jobs.lease_owner == replica, jobs.status == RUNNING)
                .values(status=status, result=result, error=error, finished_at=time.time(), lease_until=None)
            )
        return moved.rowcount == 1

    async def release(self, job_id: str, replica: str) -> None:
        """Put a job we took but will not run (we are shutting down) back in the queue, for whoever starts next."""
        jobs = jobs_table.c
        async with self._engine.begin() as conn:
            await conn.execute(
                update(jobs_table)
                .where(jobs.id == job_id, jobs.lease_owner == replica, jobs.status == RUNNING)
                .values(status=QUEUED, lease_owner=None, lease_until=None, attempts=jobs.attempts - 1)
            )

    async def cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled now; a running one is asked to stop (its runner sees it at the
        next renewal); a finished one is left as it is. Idempotent."""
        jobs = jobs_table.c
        async with self._engine.begin() as conn:
            await conn.execute(
                update(jobs_table)
                .where(jobs.id == job_id, jobs.status == QUEUED)
                .values(status=CANCELLED, finished_at=time.time(), cancel_requested=True)
            )
            await conn.execute(
                update(jobs_table).where(jobs.id == job_id, jobs.status == RUNNING).values(cancel_requested=True)
            )
        return await self.get(job_id)

    async def queued_images(self) -> int:
        """Images of the jobs waiting: what the shared queue's limit counts."""
        statement = select(func.coalesce(func.sum(jobs_table.c.n), 0)).where(jobs_table.c.status == QUEUED)
        async with self._engine.connect() as conn:
            return int((await conn.execute(statement)).scalar_one())

    async def queued_count(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.count()).where(jobs_table.c.status == QUEUED))).scalar_one())

    async def position(self, job: JobRecord) -> int:
        """How many queued jobs are ahead of this one (0: next)."""
        jobs = jobs_table.c
        ahead = or_(jobs.created_at < job.created_at, and_(jobs.created_at == job.created_at, jobs.id < job.id))
        async with self._engine.connect() as conn:
            statement = select(func.count()).where(jobs.status == QUEUED, ahead)
            return int((await conn.execute(statement)).scalar_one())

    async def prune(self, max_age_s: float, now: float | None = None) -> int:
        """Delete the rows of jobs that ended more than `max_age_s` ago (their images follow the
        store's own retention); how many."""
        cutoff = (now if now is not None else time.time()) - max_age_s
        jobs = jobs_table.c
        async with self._engine.begin() as conn:
            done = await conn.execute(delete(jobs_table).where(jobs.status.in_(FINISHED), jobs.finished_at < cutoff))
        return done.rowcount

    async def undelivered(self, limit: int = 50) -> Sequence[JobRecord]:
        """Finished jobs whose webhook has not been delivered (a restart resumes them)."""
        jobs = jobs_table.c
        statement = (
            select(jobs_table)
            .where(jobs.status.in_(FINISHED), jobs.webhook_done.is_(False))
            .order_by(jobs.finished_at)
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            return [record(row) for row in (await conn.execute(statement)).all()]

    async def webhook_done(self, job_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(update(jobs_table).where(jobs_table.c.id == job_id).values(webhook_done=True))
