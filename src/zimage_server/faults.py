"""Test-only fault injection: a hook the runner calls inside its pipeline calls, when one is passed in.

`zimage-server serve` passes one only with `Z_IMAGE_FAULT_INJECTION=1`; in-process tests build
their own. The attack tests start a real server with it on and put a marker in a prompt to make
the runner fail inside its pipeline call, the way a GPU fails, without a GPU:

    [[fault:oom]]         out of memory in every call holding this prompt, alone or batched
    [[fault:oom-shared]]  out of memory only in calls that hold more than one request (fits alone)
    [[fault:error]]       a RuntimeError (a device error, a bug): fails the whole call
    [[fault:slow=S]]      sleep S seconds after each denoising step (a long run to disconnect from)
    [[fault:short]]       the call returns one image fewer than it was asked for (a broken model call)

Without the env var no prompt is inspected; a production server never runs any of this.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger("zimage_server.faults")

ENV_VAR = "Z_IMAGE_FAULT_INJECTION"
MARKER = re.compile(r"\[\[fault:([a-z-]+)(?:=([0-9.]+))?\]\]")


class InjectedFault(RuntimeError):
    """A generic failure injected by a test."""


@dataclass(frozen=True)
class FaultInjector:
    """Raises or stalls inside a pipeline call whose prompts carry a marker."""

    @classmethod
    def from_env(cls) -> FaultInjector | None:
        if os.environ.get(ENV_VAR, "").strip() != "1":
            return None
        log.warning("fault injection is ON (%s=1): prompts with [[fault:...]] markers fail on purpose", ENV_VAR)
        return cls()

    @staticmethod
    def _faults(prompts: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for prompt in prompts:
            for name, value in MARKER.findall(prompt):
                found[name] = float(value) if value else 0.0
        return found

    def after_step(self, prompts: list[str], requests: int) -> None:
        """Called inside the pipeline call after each step, with one prompt per image in the call."""
        faults = self._faults(prompts)
        if "oom" in faults or ("oom-shared" in faults and requests > 1):
            # The host's out-of-memory error: the policy treats it as CUDA's (runner.out_of_memory_errors).
            raise MemoryError(f"out of memory (injected) in a call of {len(prompts)} images")
        if "error" in faults:
            raise InjectedFault("injected failure inside the pipeline call")
        if "slow" in faults:
            time.sleep(faults["slow"])

    def after_call(self, prompts: list[str], images: list) -> list:
        """Called with a finished call's images (one prompt per image); drops one for `short`."""
        return images[:-1] if "short" in self._faults(prompts) else images
