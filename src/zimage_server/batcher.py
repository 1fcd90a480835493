"""A bounded queue and one worker that merges compatible jobs into one model call.

Pure asyncio: it knows nothing of HTTP or torch. The model call is a plain function run in a
worker thread, so the event loop keeps serving health checks and noticing disconnects while the
GPU works. Futures are resolved on the loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

log = logging.getLogger("zimage_server.batcher")

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

    @property
    def gone(self) -> bool:
        # A done future here means the client left (cancelled) or timed out before we started.
        return self.future.done()


@dataclass
class BatcherStats:
    batches: int = 0
    jobs: int = 0
    images: int = 0
    dropped: int = 0
    last_batch_sizes: list[int] = field(default_factory=list)


class Batcher(Generic[P, R]):
    """Queue jobs with `submit`; the worker runs `run_batch(payloads) -> results` on compatible jobs."""

    def __init__(
        self,
        run_batch: Callable[[list[P]], list[R]],
        *,
        max_batch_size: int,
        max_queue: int,
        batch_wait_s: float = 0.0,
    ):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._queue: deque[Job[P, R]] = deque()
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self.stats = BatcherStats()

    @property
    def queued_images(self) -> int:
        return sum(job.n for job in self._queue if not job.gone)

    @property
    def queued_jobs(self) -> int:
        return sum(1 for job in self._queue if not job.gone)

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="batcher-worker")

    async def stop(self) -> None:
        """Stop taking work, fail what is still queued, and let the running batch finish and answer."""
        self._closed = True
        while self._queue:
            job = self._queue.popleft()
            if not job.gone:
                job.future.set_exception(BatcherClosedError("the server is shutting down"))
        self._wakeup.set()
        if self._worker is not None:
            await self._worker

    def submit(self, key: Hashable, n: int, payload: P) -> asyncio.Future[R]:
        """Queue a job of n images, or raise QueueFullError at once if it does not fit."""
        if self._closed:
            raise BatcherClosedError("the server is shutting down")
        if self.queued_images + n > self.max_queue:
            raise QueueFullError(f"the queue holds {self.queued_images} of {self.max_queue} images")
        job = Job(key=key, n=n, payload=payload, future=asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self._wakeup.set()
        return job.future

    def _take_batch(self) -> list[Job[P, R]]:
        """The oldest live job plus every queued job with its key, oldest first, up to max_batch_size images."""
        while self._queue and self._queue[0].gone:
            self._queue.popleft()
            self.stats.dropped += 1
        if not self._queue:
            return []
        first = self._queue.popleft()
        batch, images = [first], first.n
        for job in list(self._queue):
            if job.gone:
                self._queue.remove(job)
                self.stats.dropped += 1
            elif job.key == first.key and images + job.n <= self.max_batch_size:
                self._queue.remove(job)
                batch.append(job)
                images += job.n
        return batch

    def _has_companion(self, key: Hashable) -> bool:
        return any(job.key == key and not job.gone for job in self._queue)

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
            images = sum(job.n for job in batch)
            for job in list(self._queue):
                if not job.gone and job.key == batch[0].key and images + job.n <= self.max_batch_size:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.n
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
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        self.stats.images += sum(job.n for job in batch)
        self.stats.last_batch_sizes = [job.n for job in batch]
        try:
            results: Any = await asyncio.to_thread(self._run_batch, [job.payload for job in batch])
        except Exception as exc:  # noqa: BLE001 - any model failure fails this batch only
            if all(job.gone for job in batch):
                # Every client left mid-call and the model stopped early: nobody to tell, nothing wrong.
                log.info("batch of %d jobs stopped: every client left (%s)", len(batch), exc)
                return
            log.exception("batch of %d jobs failed", len(batch))
            for job in batch:
                if not job.gone:
                    error = BatchFailedError(str(exc))
                    error.__cause__ = exc
                    job.future.set_exception(error)
            return
        for job, result in zip(batch, results, strict=True):
            if not job.gone:
                job.future.set_result(result)
