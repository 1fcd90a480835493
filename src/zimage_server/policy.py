"""How a batch of requests becomes pipeline calls: the policy between the batcher and the runner.

The batcher hands over compatible requests (equal `params`); this flattens them to one row per
image, splits the rows into calls of at most `max_batch_size` images, hands the images back per
request, and survives running out of memory by retrying the requests one by one. No torch: the
runner says which exceptions mean "out of memory".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from .hires import UpscalerError
from .lora_library import LoraError
from .specs import (
    CallParams,
    GenerationCancelled,
    GenerationSpec,
    ImageRow,
    ModelUnavailable,
    OutOfMemoryForRequest,
    ResultCountMismatch,
)

log = logging.getLogger("zimage_server.policy")


class Runner(Protocol):
    """What the policy needs of the model runner (runner.ModelRunner)."""

    out_of_memory_errors: tuple[type[BaseException], ...]

    def run_call(self, params: CallParams, rows: Sequence[ImageRow]) -> list[Any]: ...

    def free_memory(self) -> None: ...

    def wake(self) -> float: ...

    resident: bool


class BatchPolicy:
    """`policy(specs) -> one result per spec`: its images, or the exception that failed only it."""

    def __init__(self, runner: Runner, max_batch_size: int):
        self.runner = runner
        self.max_batch_size = max_batch_size

    def __call__(self, specs: list[GenerationSpec]) -> list[Any]:
        if not self.runner.resident:
            # Before the out-of-memory recovery: a reload that fails is no request's fault, and
            # splitting the batch would only reload once per request.
            try:
                self.runner.wake()
            except Exception as exc:  # noqa: BLE001 - any loader failure: every request gets a 503
                log.error("the model could not be loaded again after sleeping: %s", exc)
                return [ModelUnavailable(f"the model could not be loaded again after sleeping: {exc}")] * len(specs)
        try:
            return self.recovering(self.run)(specs)
        except (LoraError, UpscalerError) as exc:
            # A LoRA or hires upscaler file that cannot be used (all specs of a call share them):
            # each request gets the client-facing error, and the runner is back on the base model.
            return [exc] * len(specs)

    def run(self, specs: list[GenerationSpec]) -> list[list[Any]]:
        """The images of each spec, in as few calls as max_batch_size allows. All specs share params."""
        params = specs[0].params
        if any(spec.params != params for spec in specs):
            raise ValueError("specs of one batch must share their call parameters")
        rows = [ImageRow(spec, seed) for spec in specs for seed in spec.seeds]
        images: list[Any] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            made = self.runner.run_call(params, chunk)
            if len(made) != len(chunk):
                raise ResultCountMismatch(f"the model call returned {len(made)} images for {len(chunk)} asked")
            images.extend(made)
        results: list[list[Any]] = []
        for spec in specs:
            results.append(images[: spec.n])
            images = images[spec.n :]
        return results

    def recovering(
        self, run: Callable[[list[GenerationSpec]], list[Any]]
    ) -> Callable[[list[GenerationSpec]], list[Any]]:
        """`run` (specs -> results per spec), made to survive running out of memory.

        When a call of several requests runs out of memory, free what the allocator caches and run
        the requests one by one, so the ones that fit still get their images. A request that runs
        out of memory alone gets an OutOfMemoryForRequest as its result (the batcher fails only its
        job). A lone request is not retried: PyTorch already frees its cache and retries once
        before raising, so the same call would fail the same way. Requests whose client left
        meanwhile are skipped.
        """
        out_of_memory = self.runner.out_of_memory_errors

        def run_recovering(specs: list[GenerationSpec]) -> list[Any]:
            try:
                return run(specs)
            except out_of_memory as exc:
                # Only the message survives the except block: the traceback's frames hold the
                # call's tensors, and they must be unreachable before the cache is freed.
                reason = f"{type(exc).__name__}: {exc}"
            self.runner.free_memory()
            if len(specs) == 1:
                log.warning("out of memory for a lone request (%s)", reason)
                return [too_large(specs[0])]
            log.warning("out of memory in a call of %d requests (%s); retrying them one by one", len(specs), reason)
            results: list[Any] = []
            for spec in specs:
                if spec.observer is not None and spec.observer.cancelled:
                    results.append(GenerationCancelled("the client left"))
                    continue
                try:
                    results.extend(run([spec]))
                    continue
                except GenerationCancelled as exc:
                    results.append(exc.with_traceback(None))
                    continue
                except out_of_memory as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                self.runner.free_memory()
                log.warning("out of memory for a request even alone (%s)", reason)
                results.append(too_large(spec))
            return results

        return run_recovering


def too_large(spec: GenerationSpec) -> OutOfMemoryForRequest:
    return OutOfMemoryForRequest(spec.n, *spec.params.output_size)
