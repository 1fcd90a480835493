"""The batcher alone, with a fake model: what merges, what waits, what is dropped, what fails."""

from __future__ import annotations

import asyncio
import threading

import pytest

from zimage_server.batcher import Batcher, BatcherClosedError, BatchFailedError, QueueFullError


class FakeModel:
    """Records each call's payloads; can block until released, or raise."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, payloads: list[str]) -> list[str]:
        self.gate.wait(timeout=10)
        self.calls.append(list(payloads))
        if any(payload.startswith("boom") for payload in payloads):
            raise RuntimeError("device on fire")
        return [f"done:{payload}" for payload in payloads]


def make_batcher(model: FakeModel, **kwargs) -> Batcher:
    options = {"max_batch_size": 4, "max_queue": 8} | kwargs
    batcher = Batcher(model, **options)
    batcher.start()
    return batcher


async def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


async def busy_batcher(payload: str = "running", **options) -> tuple[FakeModel, Batcher, asyncio.Future]:
    """A batcher whose worker is stuck in a call of `payload` (until model.gate is set), and that call's future."""
    model = FakeModel()
    batcher = make_batcher(model, **options)
    model.gate.clear()
    running = batcher.submit("k", 1, payload)
    await wait_until(lambda: batcher.queued_jobs == 0)
    return model, batcher, running


@pytest.mark.anyio
async def test_lone_request_starts_at_once_and_queued_compatible_jobs_share_a_call():
    model = FakeModel()
    batcher = make_batcher(model)
    model.gate.clear()
    first = batcher.submit("k", 1, "a")
    await wait_until(lambda: batcher.queued_jobs == 0)  # the worker took "a" without waiting for more
    rest = [batcher.submit("k", 1, p) for p in ("b", "c")] + [batcher.submit("other", 1, "d")]
    rest.append(batcher.submit("k", 1, "e"))
    model.gate.set()
    results = await asyncio.gather(first, *rest)
    assert results == ["done:a", "done:b", "done:c", "done:d", "done:e"]
    # "a" ran alone; then the oldest ("b") took every compatible job ("c", "e"); "d" ran last.
    assert model.calls == [["a"], ["b", "c", "e"], ["d"]]
    await batcher.stop()


@pytest.mark.anyio
async def test_batches_never_exceed_max_batch_size_in_images():
    model, batcher, blocker = await busy_batcher("blocker", max_batch_size=3, max_queue=20)
    futures = [batcher.submit("k", 2, "two-1"), batcher.submit("k", 2, "two-2"), batcher.submit("k", 1, "one")]
    model.gate.set()
    await asyncio.gather(blocker, *futures)
    assert model.calls[1:] == [["two-1", "one"], ["two-2"]]
    await batcher.stop()


@pytest.mark.anyio
async def test_full_queue_refuses_at_once():
    model, batcher, running = await busy_batcher(max_queue=3)
    queued = batcher.submit("k", 3, "three")
    with pytest.raises(QueueFullError):
        batcher.submit("k", 1, "one too many")
    assert batcher.queued_images == 3
    model.gate.set()
    assert await asyncio.gather(running, queued) == ["done:running", "done:three"]
    await batcher.stop()


@pytest.mark.anyio
async def test_jobs_whose_client_left_are_dropped_not_computed():
    model, batcher, running = await busy_batcher()
    gone = batcher.submit("k", 1, "gone")
    kept = batcher.submit("k", 1, "kept")
    gone.cancel()  # what the route does when the client disconnects
    assert batcher.queued_images == 1
    model.gate.set()
    assert await asyncio.gather(running, kept) == ["done:running", "done:kept"]
    assert ["gone"] not in model.calls and all("gone" not in call for call in model.calls)
    assert batcher.stats.dropped == 1
    await batcher.stop()


@pytest.mark.anyio
async def test_a_failed_batch_fails_each_of_its_jobs_and_the_worker_keeps_going():
    model, batcher, blocker = await busy_batcher("blocker")
    doomed = [batcher.submit("k", 1, "boom-x"), batcher.submit("k", 1, "y")]
    model.gate.set()
    assert await blocker == "done:blocker"
    outcomes = await asyncio.gather(*doomed, return_exceptions=True)
    assert model.calls[1] == ["boom-x", "y"]
    assert all(isinstance(outcome, BatchFailedError) for outcome in outcomes)
    assert isinstance(outcomes[0].__cause__, RuntimeError)
    assert await batcher.submit("k", 1, "after") == "done:after"
    await batcher.stop()


@pytest.mark.anyio
async def test_batch_wait_holds_a_lone_job_for_companions():
    model = FakeModel()
    batcher = make_batcher(model, batch_wait_s=0.3)
    first = batcher.submit("k", 1, "a")
    await asyncio.sleep(0.05)
    second = batcher.submit("k", 1, "b")
    await asyncio.gather(first, second)
    assert model.calls == [["a", "b"]]
    await batcher.stop()




@pytest.mark.anyio
async def test_stop_drains_queued_jobs_and_refuses_new_ones():
    model, batcher, running = await busy_batcher()
    queued = [batcher.submit("k", 1, "queued-1"), batcher.submit("other", 1, "queued-2")]
    stopping = asyncio.ensure_future(batcher.stop(timeout=10))
    await asyncio.sleep(0.05)
    with pytest.raises(BatcherClosedError):
        batcher.submit("k", 1, "too late")
    model.gate.set()
    await stopping
    assert await running == "done:running"
    assert [await future for future in queued] == ["done:queued-1", "done:queued-2"]


@pytest.mark.anyio
async def test_stop_fails_what_is_left_when_the_drain_times_out():
    model, batcher, running = await busy_batcher()
    queued = batcher.submit("other", 1, "queued")
    stopping = asyncio.ensure_future(batcher.stop(timeout=0.2))
    for future in (running, queued):
        with pytest.raises(BatcherClosedError):
            await future
    model.gate.set()  # the stuck call ends; nobody is left to answer
    await stopping
    assert model.calls == [["running"]]  # the queued job was failed, not run


@pytest.mark.anyio
async def test_an_exception_result_fails_only_its_own_job_and_is_reported():
    reports = []

    def model(payloads):
        return [ValueError("too big") if payload == "big" else f"done:{payload}" for payload in payloads]

    batcher = Batcher(model, max_batch_size=4, max_queue=8, on_batch=reports.append)
    batcher.start()
    futures = [batcher.submit("k", 1, "small"), batcher.submit("k", 2, "big")]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] == "done:small" and isinstance(outcomes[1], ValueError)
    (report,) = reports
    assert report.images == 3 and report.images_made == 1 and len(report.job_errors) == 1
    assert report.error is None and report.seconds >= 0
    await batcher.stop()


@pytest.mark.anyio
async def test_jobs_carry_their_timings_and_quiet_errors_are_not_logged_as_errors(caplog):
    class Stopped(Exception):
        pass

    def model(payloads):
        raise Stopped("every client left")

    caplog.set_level("INFO", logger="zimage_server.batcher")
    batcher = Batcher(model, max_batch_size=4, max_queue=8, quiet_errors=(Stopped,))
    batcher.start()
    job = batcher.enqueue("k", 1, "p", tag="req-1")
    with pytest.raises(BatchFailedError):
        await job.future
    assert job.batch_images == 1 and job.queue_wait_s >= 0 and job.run_s >= 0
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    assert any("req-1" in record.getMessage() and "stopped early" in record.getMessage() for record in caplog.records)
    await batcher.stop()


@pytest.mark.anyio
async def test_a_call_that_returns_too_few_results_fails_its_batch_and_the_worker_goes_on():
    reports = []

    def model(payloads):
        results = [f"done:{payload}" for payload in payloads]
        return results[:-1] if "short" in payloads else results

    batcher = Batcher(model, max_batch_size=4, max_queue=8, batch_wait_s=0.05, on_batch=reports.append)
    batcher.start()
    outcomes = await asyncio.gather(
        batcher.submit("k", 1, "short"), batcher.submit("k", 1, "mate"), return_exceptions=True
    )
    assert all(isinstance(outcome, BatchFailedError) for outcome in outcomes)
    assert "mismatch" in str(outcomes[0]) and isinstance(reports[0].error, RuntimeError)
    assert await batcher.submit("k", 1, "next") == "done:next"
    assert batcher.alive
    await batcher.stop()


@pytest.mark.anyio
async def test_a_worker_that_dies_fails_its_jobs_refuses_new_ones_and_tells_its_owner():
    died = asyncio.Event()
    model, batcher, running = await busy_batcher()
    batcher.on_worker_died = lambda error: died.set()
    queued = batcher.submit("k", 1, "queued")
    batcher._worker.cancel()  # what an unexpected bug in the loop itself would do
    await asyncio.wait_for(died.wait(), 5)
    assert not batcher.alive
    with pytest.raises(BatchFailedError):
        await queued
    with pytest.raises(BatcherClosedError):
        batcher.submit("k", 1, "after")
    model.gate.set()
    await batcher.stop()
