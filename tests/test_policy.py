"""The batch policy: out-of-memory retries one by one, cancelled requests skipped, faults inside real calls."""

from __future__ import annotations

import pytest
import torch

from conftest import generate, make_spec
from zimage_server.faults import FaultInjector
from zimage_server.policy import BatchPolicy
from zimage_server.runner import ModelRunner
from zimage_server.specs import GenerationCancelled, GenerationSpec, OutOfMemoryForRequest, ResultCountMismatch


def spec(prompt: str, n: int = 1, size: int = 64, observer=None) -> GenerationSpec:
    return make_spec(prompt, tuple(range(n)), width=size, height=size, num_inference_steps=2, observer=observer)


def policy(runner: ModelRunner) -> BatchPolicy:
    return BatchPolicy(runner, runner.settings.max_batch_size)


@pytest.mark.parametrize("oom_error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_retries_requests_one_by_one_and_fails_only_the_one_that_cannot_fit(runner, oom_error):
    calls = []

    def run(specs):
        calls.append([s.prompt for s in specs])
        if len(specs) > 1 or specs[0].prompt == "huge":
            raise oom_error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [[f"image of {specs[0].prompt}"] * len(specs[0].seeds)]

    results = policy(runner).recovering(run)([spec("a"), spec("huge", n=2, size=128), spec("b")])
    assert calls == [["a", "huge", "b"], ["a"], ["huge"], ["b"]]
    assert results[0] == ["image of a"] and results[2] == ["image of b"]
    assert isinstance(results[1], OutOfMemoryForRequest)
    assert "2 images of 128x128" in str(results[1])
    # A lone request is not retried: PyTorch already freed its cache and retried once.
    calls.clear()
    (lone,) = policy(runner).recovering(run)([spec("huge")])
    assert calls == [["huge"]] and isinstance(lone, OutOfMemoryForRequest)


def test_other_errors_are_not_swallowed_by_the_recovery(runner):
    def run(specs):
        raise RuntimeError("device on fire")

    with pytest.raises(RuntimeError):
        policy(runner).recovering(run)([spec("a"), spec("b")])


def test_injected_faults_fire_inside_the_real_pipeline_call(settings, runner):
    faulty = ModelRunner(runner.pipeline, settings, runner.device, runner.dtype, faults=FaultInjector())
    results = policy(faulty)([spec("a cat"), spec("a big cat [[fault:oom]]"), spec("shared [[fault:oom-shared]]")])
    assert len(results[0]) == 1 and len(results[2]) == 1
    assert isinstance(results[1], OutOfMemoryForRequest)


def test_a_call_that_returns_too_few_images_fails_its_batch_instead_of_misassigning_them(settings, runner):
    faulty = ModelRunner(runner.pipeline, settings, runner.device, runner.dtype, faults=FaultInjector())
    with pytest.raises(ResultCountMismatch, match="1 images for 2 asked"):
        policy(faulty)([spec("a cat"), spec("a short cat [[fault:short]]")])
    assert [len(images) for images in policy(faulty)([spec("a cat", n=2)])] == [2]


def test_specs_with_different_call_parameters_never_share_a_call(runner):
    with pytest.raises(ValueError, match="share their call parameters"):
        generate(runner, [spec("a", size=64), spec("b", size=128)])


def test_fault_injection_is_off_unless_the_env_var_turns_it_on(monkeypatch, runner):
    monkeypatch.delenv("Z_IMAGE_FAULT_INJECTION", raising=False)
    assert FaultInjector.from_env() is None and runner.faults is None
    monkeypatch.setenv("Z_IMAGE_FAULT_INJECTION", "1")
    assert FaultInjector.from_env() is not None


def test_a_cancelled_request_is_skipped_in_the_one_by_one_retry(runner):
    class Gone:
        cancelled = True

        def wants_previews(self, step, total):
            return False

        def on_step(self, *args):
            pass

    def run(specs):
        if len(specs) > 1:
            raise MemoryError()
        return [["ok"]]

    gone = spec("gone", observer=Gone())
    results = policy(runner).recovering(run)([spec("a"), gone])
    assert results[0] == ["ok"] and isinstance(results[1], GenerationCancelled)
