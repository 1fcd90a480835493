"""One request's life through its job handle, over a real batcher with a fake model; and what the
API layer may import."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading

import pytest

from zimage_server.api.errors import ApiError
from zimage_server.api.jobs import StepReport, submit_job
from zimage_server.api.state import ServerState
from zimage_server.batcher import Batcher
from zimage_server.settings import Settings
from zimage_server.specs import CallParams, GenerationSpec

PARAMS = CallParams(mode="generate", width=64, height=64, num_inference_steps=2, guidance_scale=0.0)


def make_spec(prompt: str, n: int = 1, params: CallParams = PARAMS) -> GenerationSpec:
    return GenerationSpec(prompt=prompt, negative_prompt=None, seeds=tuple(range(n)), params=params)


class StepModel:
    """Stands in for the policy: reports two steps to each spec's observer, or fails, or waits for a gate."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, specs: list[GenerationSpec]) -> list:
        self.gate.wait(timeout=10)
        for step in (1, 2):
            for spec in specs:
                spec.observer.on_step(step, 2, [None] * spec.n, None)
        if any("boom" in spec.prompt for spec in specs):
            raise RuntimeError("device on fire at 0xdeadbeef")
        return [[f"image of {spec.prompt}"] * spec.n for spec in specs]


async def server_with(model: StepModel, **settings) -> ServerState:
    server = ServerState(settings=Settings().replace(**settings))
    server.batcher = Batcher(model, max_batch_size=4, max_queue=8)
    server.batcher.start()
    return server


@pytest.mark.anyio
async def test_result_gives_the_images_and_the_handle_is_cancelled_once_done():
    server = await server_with(StepModel())
    handle = submit_job(server, make_spec("a cat", n=2))
    assert not handle.cancelled
    assert await handle.result() == ["image of a cat"] * 2
    assert handle.cancelled  # a finished job is what a running call may stop for
    await server.batcher.stop()


@pytest.mark.anyio
async def test_a_failed_batch_and_a_timeout_map_to_the_same_errors_both_ways():
    server = await server_with(StepModel())
    with pytest.raises(ApiError) as failed:
        await submit_job(server, make_spec("boom")).result()
    assert failed.value.status_code == 500 and "0xdeadbeef" not in failed.value.message
    streamed = submit_job(server, make_spec("boom"), stream=True)
    reports = [report async for report in streamed.events()]
    assert [report.step for report in reports] == [1, 2]
    with pytest.raises(ApiError) as failed_stream:
        streamed.outcome()
    assert failed_stream.value.message == failed.value.message
    await server.batcher.stop()

    model = StepModel()
    model.gate.clear()  # the "GPU" never finishes
    server = await server_with(model, request_timeout_s=0.05)
    for handle in (submit_job(server, make_spec("slow")), submit_job(server, make_spec("slow"), stream=True)):
        with pytest.raises(ApiError) as timed_out:
            if handle._reports is None:
                await handle.result()
            else:
                [report async for report in handle.events()]
        assert timed_out.value.status_code == 504 and handle.cancelled
    model.gate.set()
    await server.batcher.stop()


@pytest.mark.anyio
async def test_events_report_steps_then_end_and_closing_early_cancels_the_job():
    server = await server_with(StepModel())
    handle = submit_job(server, make_spec("a", n=2), stream=True)
    reports = [report async for report in handle.events()]
    assert reports == [StepReport(1, 2, 0, 2, None), StepReport(2, 2, 0, 2, None)]
    assert handle.outcome() == ["image of a"] * 2
    await server.batcher.stop()

    model = StepModel()
    model.gate.clear()
    server = await server_with(model)
    running = submit_job(server, make_spec("running"))
    # Another size, so it cannot join the running call: it waits in the queue.
    queued = submit_job(server, make_spec("queued", params=dataclasses.replace(PARAMS, width=128)), stream=True)

    async def stream() -> None:
        async for _ in queued.events():
            pass

    streaming = asyncio.ensure_future(stream())
    await asyncio.sleep(0.01)
    streaming.cancel()  # the client hung up: Litestar cancels the task sending the stream
    with pytest.raises(asyncio.CancelledError):
        await streaming
    assert queued.cancelled
    model.gate.set()
    assert await running.result() == ["image of running"]
    await server.batcher.stop()
    assert server.batcher.stats.dropped == 1  # the hung-up job was dropped, never run


def test_the_api_batcher_and_policy_import_no_torch():
    code = (
        "import sys, zimage_server.api, zimage_server.api.app, zimage_server.batcher, zimage_server.policy; "
        "bad = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
