"""A bounded queue and one worker that merges compatible jobs into one model call.

Pure asyncio: it knows nothing of HTTP or torch. The model call is a plain function run in the
executor it is given (the server gives the model's one thread, model_thread.py), so the event
loop keeps serving health checks and noticing disconnects while the GPU works. Futures are
resolved on the loop thread only.

The model call returns one result per payload; a result that is an exception fails only its own
job (how a request that did not fit in memory fails while its batch-mates succeed). An exception
raised by the call, or a call that returns the wrong number of results, fails the whole batch, and
the worker goes on with the next one. Should the worker task itself ever end while the batcher is
open, `on_worker_died` hears of it, so the server can stop saying it is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("zimage_server.batcher")

WIND_DOWN_S = 10.0  # after a drain times out: how long a running call may take to notice

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(Exception):
    """The queue cannot take this many more images; the client should retry later."""


class BatcherClosedError(Exception):
    """The batcher has stopped and takes no more work."""


class BatchFailedError(Exception):
    """The model call for this job's batch raised; `__cause__` holds the original exception."""


@dataclass(eq=False)
class Job(Generic[P, R]):
    """One request: `n` images that must share a model call key with any batch they join."""

    key: Hashable
    n: int
    payload: P
    future: asyncio.Future[R] = field(repr=False)
    tag: str | None = None  # names the job in log lines (the request id)
    # Monotonic timestamps and the batch it ran in, for request logs and metrics.
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    batch_images: int | None = None

    @property
    def gone(self) -> bool:
        # A done future here means the client left (cancelled) or timed out before we started.
        return self.future.done()

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.queued_at

    @property
    def run_s(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True)
class BatchReport:
    """What one model call did, handed to the `on_batch` listener (metrics) on the loop thread."""

    jobs: list[Job]
    seconds: float
    error: BaseException | None = None  # the call raised: every job failed with it
    job_errors: tuple[BaseException, ...] = ()  # results that failed only their own job
    quiet: bool = False  # the error was one of `quiet_errors` (stopped on purpose)
    images_made: int = 0  # images of the jobs that got results

    @property
    def images(self) -> int:
        return sum(job.n for job in self.jobs)


@dataclass
class BatcherStats:
    dropped: int = 0  # jobs taken off the queue unrun because their client had left


class Batcher(Generic[P, R]):
    """Queue jobs with `submit`; the worker runs `run_batch(payloads) -> results` on compatible jobs."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], list[R]],
        *,
        max_batch_size: int,
        max_queue: int,
        batch_wait_s: float = 0.0,
        quiet_errors: tuple[type[BaseException], ...] = (),
        on_batch: Callable[[BatchReport], None] | None = None,
        on_worker_died: Callable[[BaseException | None], None] | None = None,
        executor: Executor | None = None,
    ):
        self._run_batch = run_batch
        self._executor = executor  # where model calls run; None: the event loop's default pool
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        # Exceptions that end a batch on purpose (every client left): no error log for those.
        self.quiet_errors = quiet_errors
        self.on_batch = on_batch
        self.on_worker_died = on_worker_died
        self._queue: deque[Job[P, R]] = deque()
        self._running: list[Job[P, R]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._last_busy = time.monotonic()  # when a job last arrived or a call last ended
        self.stats = BatcherStats()

    @property
    def queued_images(self) -> int:
        return sum(job.n for job in self._queue if not job.gone)

    @property
    def queued_jobs(self) -> int:
        return sum(1 for job in self._queue if not job.gone)

    @property
    def running_jobs(self) -> tuple[Job[P, R], ...]:
        """The jobs of the model call under way (empty between calls)."""
        return tuple(self._running)

    @property
    def running_images(self) -> int:
        return sum(job.n for job in self._running)

    def idle_for(self) -> float | None:
        """Seconds since the batcher last had work (a job arrived or a call ended); None while it has some."""
        if self._running or self.queued_jobs:
            return None
        return time.monotonic() - self._last_busy

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher-worker")
        self._worker.add_done_callback(self._worker_ended)

    @property
    def alive(self) -> bool:
        """Whether the worker is running (or not yet started, or stopped on purpose)."""
        return self._closed or self._worker is None or not self._worker.done()

    def _worker_ended(self, worker: asyncio.Task) -> None:
        if self._closed:
            return  # stop() ended it
        error = None if worker.cancelled() else worker.exception()
        log.critical("the batcher's worker ended unexpectedly; no queued job will run", exc_info=error)
        self._fail_unanswered(BatchFailedError("the server's worker stopped"))
        if self.on_worker_died is not None:
            self.on_worker_died(error)

    async def stop(self, timeout: float | None = None) -> None:
        """Take no more work; let queued jobs and the running batch finish, for at most `timeout` seconds.

        What is still unanswered when the time is up fails with BatcherClosedError; a running call
        sees its jobs gone and (through the runner's step observers) stops at its next step.
        """
        self._closed = True
        self._wakeup.set()
        if self._worker is None or self._worker.done():
            self._fail_unanswered()
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout)
        except TimeoutError:
            left = self._fail_unanswered()
            log.warning("drain timed out after %g s; failed %d unfinished jobs", timeout, left)
            # With its jobs gone the running call stops at its next step; give it that long to
            # wind down (and say so in the log) before abandoning it.
            _, running = await asyncio.wait({self._worker}, timeout=WIND_DOWN_S)
            for worker in running:
                worker.cancel()

    def _fail_unanswered(self, error: Exception | None = None) -> int:
        failed = 0
        for job in [*self._running, *self._queue]:
            if not job.gone:
                job.future.set_exception(error or BatcherClosedError("the server is shutting down"))
                failed += 1
        self._queue.clear()
        return failed

    def submit(self, key: Hashable, n: int, payload: P, tag: str | None = None) -> asyncio.Future[R]:
        """Queue a job of n images, or raise QueueFullError at once if it does not fit."""
        return self.enqueue(key, n, payload, tag).future

    def enqueue(self, key: Hashable, n: int, payload: P, tag: str | None = None) -> Job[P, R]:
        """As `submit`, returning the job itself: its future, and its timings once it has run."""
        if self._closed or not self.alive:
            raise BatcherClosedError("the server is shutting down")
        if self.queued_images + n > self.max_queue:
            raise QueueFullError(f"the queue holds {self.queued_images} of {self.max_queue} images")
        job = Job(key=key, n=n, payload=payload, future=asyncio.get_running_loop().create_future(), tag=tag)
        self._queue.append(job)
        self._last_busy = time.monotonic()
        self._wakeup.set()
        return job

    def _take_batch(self) -> list[Job[P, R]]:
        """The oldest live job plus every queued job with its key, oldest first, up to max_batch_size images."""
        while self._queue and self._queue[0].gone:
            self._queue.popleft()
            self.stats.dropped += 1
        if not self._queue:
            return []
        return self._add_companions([self._queue.popleft()])

    def _add_companions(self, batch: list[Job[P, R]]) -> list[Job[P, R]]:
        """Move queued jobs with the batch's key into it, oldest first, while they fit; drop gone ones."""
        images = sum(job.n for job in batch)
        for job in list(self._queue):
            if job.gone:
                self._queue.remove(job)
                self.stats.dropped += 1
            elif job.key == batch[0].key and images + job.n <= self.max_batch_size:
                self._queue.remove(job)
                batch.append(job)
                images += job.n
        return batch

    async def _hold_for_companions(self, batch: list[Job[P, R]]) -> list[Job[P, R]]:
        """With a batch wait set, give a partial batch that long to fill with compatible jobs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.batch_wait_s
        while sum(job.n for job in batch) < self.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
            self._add_companions(batch)
        return batch

    async def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.batch_wait_s > 0:
                batch = await self._hold_for_companions(batch)
            batch = [job for job in batch if not job.gone]
            if not batch:
                continue
            await self._run(batch)

    async def _run(self, batch: list[Job[P, R]]) -> None:
        images = sum(job.n for job in batch)
        started = time.monotonic()
        for job in batch:
            job.started_at, job.batch_images = started, images
        self._running = batch
        try:
            payloads = [job.payload for job in batch]
            results: Any = await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, payloads)
            if len(results) != len(batch):
                # A broken model call: handing out what came back would give jobs the wrong images.
                raise RuntimeError(f"batch size mismatch: {len(results)} results for {len(batch)} jobs")
            job_errors = tuple(result for result in results if isinstance(result, BaseException))
            made = sum(job.n for job, result in zip(batch, results) if not isinstance(result, BaseException))
            self._finish(batch, BatchReport(batch, time.monotonic() - started, job_errors=job_errors, images_made=made))
            for job, result in zip(batch, results, strict=True):
                if job.gone:
                    continue
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
        except Exception as exc:  # noqa: BLE001 - any model failure fails this batch only
            self._fail_batch(batch, exc, time.monotonic() - started)

    def _fail_batch(self, batch: list[Job[P, R]], exc: Exception, seconds: float) -> None:
        # A call stopped on purpose, or one whose every client left mid-call (the model stopped
        # early): nobody to tell, nothing wrong.
        quiet = isinstance(exc, self.quiet_errors) or all(job.gone for job in batch)
        self._finish(batch, BatchReport(batch, seconds, error=exc, quiet=quiet))
        tags = ", ".join(job.tag for job in batch if job.tag) or "untagged"
        if quiet:
            log.info("batch of %d jobs stopped early (requests %s): %s", len(batch), tags, exc)
        else:
            log.error("batch of %d jobs failed (requests %s)", len(batch), tags, exc_info=exc)
        for job in batch:
            if not job.gone:
                error = BatchFailedError(str(exc))
                error.__cause__ = exc
                job.future.set_exception(error)

    def _finish(self, batch: list[Job[P, R]], report: BatchReport) -> None:
        finished = time.monotonic()
        for job in batch:
            job.finished_at = finished
        self._running = []
        self._last_busy = finished
        if self.on_batch is not None:
            try:
                self.on_batch(report)
            except Exception:  # noqa: BLE001 - a metrics bug must not fail the requests
                log.exception("batch listener failed")
