"""The one thread that runs the model's work. No torch here: it only decides where work runs.

Every thread that runs torch work gets its own OpenMP team (and, on a GPU, its own CPU-side
state), and idle teams spin against the busy one: measured on our 2-core CPU, the same pipeline
call took 44-50 ms from one thread and about 71 ms from rotating pool threads (docs/benchmarks.md,
benchmark 8). So the model lives on one thread for its whole life: start-up checks, loading,
warm-up, every call, prompt encoding, previews, the conversion of outputs, LoRA files, sleeping
and waking. Callers on any other thread hand work over and wait; work already on the thread runs
in place, so a model function may call another without deadlocking.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

THREAD_NAME = "model"


class ModelThread:
    """A single-thread executor, created on first use and kept for the life of the process."""

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME)
        self.ident: int | None = None
        self.executor.submit(self._learn_ident).result()

    def _learn_ident(self) -> None:
        self.ident = threading.get_ident()

    @property
    def is_current(self) -> bool:
        return threading.get_ident() == self.ident

    def submit(self, fn: Callable[..., T], *args, **kwargs) -> Future[T]:
        return self.executor.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on the model thread, from any thread; blocks until it returns."""
        if self.is_current:
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` on the model thread, awaited from the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))


_lock = threading.Lock()
_thread: ModelThread | None = None


def model_thread() -> ModelThread:
    """The process's model thread (one model per process, so one thread)."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = ModelThread()
        return _thread


def on_model_thread(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorate a function so that it always runs on the model thread, whoever calls it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return model_thread().call(fn, *args, **kwargs)

    return wrapper
