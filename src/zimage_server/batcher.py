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

Fair shares: every job has an owner (the API key's name), and owners take turns leading a batch,
round-robin, each owner's own jobs oldest first. The leader's oldest job sets the batch's key; the
batch is then filled with jobs of that key, the leader's first, then the other owners' in turn
order: a fuller call is cheaper per image, and it starves nobody, since every image in it runs. An
owner who just led goes behind everyone already waiting, newcomers included, so an owner with work
waits for at most the running batch plus one batch per other owner with work: with two keys, 32
queued images of one delay the other's single image by the running batch alone. With one owner
this is exactly the first-in, first-out batching of before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Generic, TypeVar

log = logging.getLogger("zimage_server.batcher")

WIND_DOWN_S = 10.0  # after a drain times out: how long a running call may take to notice

P = TypeVar("P")
R = TypeVar("R")


class QueueFullError(Exception):
    """The queue cannot take this many more images; the client should retry later."""


class OwnerQueueFullError(QueueFullError):
    """This owner already has as many images queued as one owner may; others may still get in."""

    def __init__(self, owner: str, queued: int, limit: int):
        super().__init__(f"key {owner!r} already has {queued} images queued (Z_IMAGE_MAX_QUEUE_PER_KEY={limit})")
        self.owner, self.queued, self.limit = owner, queued, limit


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
    owner: str = "anonymous"  # whose turn this job waits for (the API key's name)
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
        max_queue_per_owner: int | None = None,
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
        self.max_queue_per_owner = max_queue_per_owner  # None: an owner may fill the whole queue
        self.batch_wait_s = batch_wait_s
        # Exceptions that end a batch on purpose (every client left): no error log for those.
        self.quiet_errors = quiet_errors
        self.on_batch = on_batch
        self.on_worker_died = on_worker_died
        # Each owner's jobs, oldest first; an owner is here only while it has jobs queued (gone
        # ones count until the worker meets them).
        self._queues: dict[str, deque[Job[P, R]]] = {}
        # Owners waiting for their turn to lead a batch, next first: an ordered set, so that an
        # owner whose jobs all rode along in another's batch leaves it in O(1). The owner that led
        # the last batch waits aside in `_served` and rejoins the end at the next pick, so that
        # owners who arrived while its batch ran go before it. Every owner in `_queues` is in one.
        self._turns: OrderedDict[str, None] = OrderedDict()
        self._served: str | None = None
        self._running: list[Job[P, R]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._last_busy = time.monotonic()  # when a job last arrived or a call last ended
        self.stats = BatcherStats()

    def _queued(self) -> Iterator[Job[P, R]]:
        for queue in self._queues.values():
            yield from queue

    @property
    def queued_images(self) -> int:
        return sum(job.n for job in self._queued() if not job.gone)

    @property
    def queued_jobs(self) -> int:
        return sum(1 for job in self._queued() if not job.gone)

    def queued_images_of(self, owner: str) -> int:
        """Images this owner has waiting (not counting its running ones)."""
        return sum(job.n for job in self._queues.get(owner, ()) if not job.gone)

    @property
    def queued_images_by_owner(self) -> dict[str, int]:
        """Images waiting per owner, for owners with any."""
        counts = {owner: self.queued_images_of(owner) for owner in self._queues}
        return {owner: images for owner, images in counts.items() if images}

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
        for job in [*self._running, *self._queued()]:
            if not job.gone:
                job.future.set_exception(error or BatcherClosedError("the server is shutting down"))
                failed += 1
        self._queues.clear()
        self._turns.clear()
        self._served = None
        return failed

    def submit(
        self, key: Hashable, n: int, payload: P, tag: str | None = None, *, owner: str = "anonymous"
    ) -> asyncio.Future[R]:
        """Queue a job of n images, or raise QueueFullError at once if it does not fit."""
        return self.enqueue(key, n, payload, tag, owner=owner).future

    def enqueue(
        self, key: Hashable, n: int, payload: P, tag: str | None = None, *, owner: str = "anonymous"
    ) -> Job[P, R]:
        """As `submit`, returning the job itself: its future, and its timings once it has run.

        Raises OwnerQueueFullError when `owner` would have more than max_queue_per_owner images
        queued (checked first: that one is the owner's own doing), QueueFullError when the whole
        queue would hold more than max_queue."""
        if self._closed or not self.alive:
            raise BatcherClosedError("the server is shutting down")
        if self.max_queue_per_owner is not None:
            mine = self.queued_images_of(owner)
            if mine + n > self.max_queue_per_owner:
                raise OwnerQueueFullError(owner, mine, self.max_queue_per_owner)
        if self.queued_images + n > self.max_queue:
            raise QueueFullError(f"the queue holds {self.queued_images} of {self.max_queue} images")
        job = Job(
            key=key, n=n, payload=payload, future=asyncio.get_running_loop().create_future(), tag=tag, owner=owner
        )
        queue = self._queues.get(owner)
        if queue is None:  # a newcomer waits for its turn behind the owners already waiting
            queue = self._queues[owner] = deque()
            self._turns[owner] = None
        queue.append(job)
        self._last_busy = time.monotonic()
        self._wakeup.set()
        return job

    def _take_batch(self) -> list[Job[P, R]]:
        """The next owner's oldest live job, filled with queued jobs of its key (see `_add_companions`)."""
        if self._served is not None:  # the last leader goes behind everyone who waited during its batch
            self._turns[self._served] = None
            self._served = None
        while self._turns:
            owner, _ = self._turns.popitem(last=False)
            queue = self._queues[owner]
            while queue and queue[0].gone:
                queue.popleft()
                self.stats.dropped += 1
            if queue:
                self._served = owner
                return self._add_companions([queue.popleft()])
            del self._queues[owner]  # nothing live left: it loses its place until it queues again
        return []

    def _add_companions(self, batch: list[Job[P, R]]) -> list[Job[P, R]]:
        """Move queued jobs with the batch's key into it while they fit; drop gone ones met on the way.

        The leader's own jobs come first, oldest first, then each other owner's in turn order. Each
        job is looked at once and the scan stops once the batch is full, so a pick costs
        O(owners + jobs looked at), however long the queue behind."""
        key, images, leader = batch[0].key, sum(job.n for job in batch), batch[0].owner
        emptied: list[str] = []
        # The leader is in `_turns` too if it emptied and queued again while its batch was held.
        for owner in chain([leader], (owner for owner in self._turns if owner != leader)):
            queue = self._queues.get(owner)
            if queue is None:
                continue
            kept: list[Job[P, R]] = []  # looked at and left, in order, to go back at the front
            while queue and images < self.max_batch_size:
                job = queue.popleft()
                if job.gone:
                    self.stats.dropped += 1
                elif job.key == key and images + job.n <= self.max_batch_size:
                    batch.append(job)
                    images += job.n
                else:
                    kept.append(job)
            queue.extendleft(reversed(kept))
            if not queue:
                emptied.append(owner)
            if images >= self.max_batch_size:
                break
        # Owners whose jobs were all taken leave the rotation (they had their images run); queuing
        # again, they join at its end like any newcomer.
        for owner in emptied:
            del self._queues[owner]
            self._turns.pop(owner, None)
            if self._served == owner:
                self._served = None
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
