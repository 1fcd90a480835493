"""Sleep when idle (Z_IMAGE_IDLE_UNLOAD_S): free the model's memory once nothing has been queued or
running for that long, so a card (or a CPU host) shared with Ollama or llama.cpp gets it back.
No torch: the runner sleeps on its own thread, and wakes itself on the next call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("zimage_server.idle")

POLL_FLOOR_S = 0.05  # never spin: the shortest wait between two looks
BUSY_POLL_S = 1.0  # while busy or asleep: how often to look again (the lateness of a sleep at most)


class Sleeper(Protocol):
    resident: bool

    def sleep(self) -> None: ...


class IdleSource(Protocol):
    def idle_for(self) -> float | None: ...


class AllIdle:
    """Idle when every source is: the batcher, and the resident prompt enhancer between answers.
    None (busy) when any is busy; else the shortest idle time."""

    def __init__(self, *sources: IdleSource):
        self.sources = sources

    def idle_for(self) -> float | None:
        times = [source.idle_for() for source in self.sources]
        return None if None in times else min(times)


async def unload_when_idle(
    source: IdleSource, sleeper: Sleeper, idle_s: float, run: Callable[[Callable[[], None]], asyncio.Future]
) -> None:
    """Put `sleeper` to sleep (through `run`, the model thread) whenever `source` has been idle `idle_s`.

    Runs until cancelled. A request that arrives meanwhile is safe either way: it runs before the
    sleep or wakes the model after it, both on the model's one thread."""
    while True:
        idle = source.idle_for()
        if idle is None or not sleeper.resident:
            await asyncio.sleep(min(max(idle_s, POLL_FLOOR_S), BUSY_POLL_S))
            continue
        if idle >= idle_s:
            log.info("idle for %.1f s: unloading the model", idle)
            await run(sleeper.sleep)
            continue
        await asyncio.sleep(max(idle_s - idle, POLL_FLOOR_S))
