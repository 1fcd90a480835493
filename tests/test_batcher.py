"""The batcher alone, with a fake model: what merges, what waits, what is dropped, what fails."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from zimage_server.batcher import (
    Batcher,
    BatcherClosedError,
    BatchFailedError,
    OwnerQueueFullError,
    QueueFullError,
)


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


# Fair shares: owners (API keys) take turns leading a batch.


@pytest.mark.parametrize("jobs, n", [(32, 1), (8, 4)])
@pytest.mark.parametrize("b_key", ["k", "other"])
@pytest.mark.anyio
async def test_a_key_with_32_queued_images_holds_back_another_keys_image_by_one_batch_at_most(jobs, n, b_key):
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=4, max_queue=40)
    model.gate.clear()
    a_jobs = [batcher.enqueue("k", n, f"A{i}", owner="alice") for i in range(jobs)]
    await wait_until(lambda: batcher.running_jobs)  # alice's first batch is under way
    b_job = batcher.enqueue(b_key, 1, "B", owner="bob")
    model.gate.set()
    await asyncio.gather(b_job.future, *(job.future for job in a_jobs))
    # The worker answers a call's jobs before it starts the next call, so the call order is the
    # order of events: bob's image ran in the very next call, long before alice's fifth batch.
    b_call = next(i for i, call in enumerate(model.calls) if "B" in call)
    assert b_call == 1
    assert model.calls[b_call][0] == "B"  # bob led it: its key, not alice's
    # Alice's images all ran, once each, in the order she sent them.
    assert [p for call in model.calls for p in call if p != "B"] == [f"A{i}" for i in range(jobs)]
    # And by the clock: bob was answered before alice's fifth batch (the fifth call she led) began.
    alice_led = [call for call in model.calls if call[0] != "B"]
    assert b_job.finished_at <= a_jobs[int(alice_led[4][0][1:])].started_at
    await batcher.stop()


@pytest.mark.anyio
async def test_three_owners_take_turns_each_in_its_own_order():
    model, batcher, blocker = await busy_batcher("blocker", max_batch_size=1, max_queue=20)
    futures = [batcher.submit(f"k{owner}", 1, f"{owner}{i}", owner=owner) for owner in "abc" for i in range(3)]
    model.gate.set()
    await asyncio.gather(blocker, *futures)
    assert [call for (call,) in model.calls[1:]] == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]
    await batcher.stop()


@pytest.mark.anyio
async def test_an_owner_that_arrives_while_a_batch_runs_goes_before_the_owner_that_led_it():
    model = FakeModel()
    batcher = make_batcher(model, max_batch_size=1)
    model.gate.clear()
    futures = [batcher.submit("k", 1, f"a{i}", owner="a") for i in range(3)]
    futures.append(batcher.submit("k", 1, "b0", owner="b"))
    await wait_until(lambda: batcher.running_jobs)  # a0 runs
    futures.append(batcher.submit("k", 1, "c0", owner="c"))  # c came after b, but while a's batch ran
    model.gate.set()
    await asyncio.gather(*futures)
    assert [call for (call,) in model.calls] == ["a0", "b0", "c0", "a1", "a2"]
    await batcher.stop()


@pytest.mark.anyio
async def test_a_batch_fills_with_its_leaders_jobs_first_then_other_owners_in_turn():
    model, batcher, blocker = await busy_batcher("blocker", max_batch_size=4, max_queue=20)
    futures = [
        batcher.submit("k", 1, "a0", owner="a"),
        batcher.submit("k", 1, "c0", owner="c"),
        batcher.submit("k", 1, "b0", owner="b"),
        batcher.submit("other", 1, "a-other", owner="a"),
        batcher.submit("k", 1, "b1", owner="b"),
        batcher.submit("k", 1, "a1", owner="a"),
    ]
    model.gate.set()
    await asyncio.gather(blocker, *futures)
    # a leads (it came first), its own "k" job first, then c's and b's in turn order (c came
    # before b) until the batch is full. c, its only job run, leaves the rotation; b, next in
    # turn, leads with b1; a, who just led, comes last.
    assert model.calls[1:] == [["a0", "a1", "c0", "b0"], ["b1"], ["a-other"]]
    await batcher.stop()


@pytest.mark.anyio
async def test_a_held_batch_takes_another_owners_compatible_job():
    model = FakeModel()
    batcher = make_batcher(model, batch_wait_s=0.3)
    first = batcher.submit("k", 1, "a", owner="alice")
    await asyncio.sleep(0.05)
    second = batcher.submit("k", 1, "b", owner="bob")
    assert await asyncio.gather(first, second) == ["done:a", "done:b"]
    assert model.calls == [["a", "b"]]
    await batcher.stop()


def fifo_batches(jobs: list[tuple[str, int, str]], max_batch_size: int) -> list[list[str]]:
    """The batching before fair shares: the oldest job, then every later job of its key that fits."""
    left, batches = list(jobs), []
    while left:
        key, images, batch = left[0][0], 0, []
        for job in list(left):
            if job[0] == key and images + job[1] <= max_batch_size:
                left.remove(job)
                batch.append(job[2])
                images += job[1]
        batches.append(batch)
    return batches


@pytest.mark.parametrize("owner", ["anonymous", "alice"])
@pytest.mark.anyio
async def test_one_owner_is_batched_exactly_as_first_in_first_out(owner):
    chance = random.Random(7)
    jobs = [(chance.choice("xyz"), chance.randint(1, 3), f"p{i}") for i in range(40)]
    model, batcher, blocker = await busy_batcher("blocker", max_batch_size=4, max_queue=100)
    futures = [batcher.submit(key, n, payload, owner=owner) for key, n, payload in jobs]
    model.gate.set()
    await asyncio.gather(blocker, *futures)
    assert model.calls[1:] == fifo_batches(jobs, 4)
    await batcher.stop()


@pytest.mark.anyio
async def test_an_owner_over_its_share_of_the_queue_is_refused_while_others_get_in():
    model, batcher, running = await busy_batcher(max_queue=8, max_queue_per_owner=3)
    alice = [batcher.submit("k", 2, "a0", owner="alice"), batcher.submit("k", 1, "a1", owner="alice")]
    with pytest.raises(OwnerQueueFullError) as refused:
        batcher.submit("k", 1, "a2", owner="alice")
    assert isinstance(refused.value, QueueFullError)  # the route's 429 handling still catches it
    assert str(refused.value) == "key 'alice' already has 3 images queued (Z_IMAGE_MAX_QUEUE_PER_KEY=3)"
    bob = [batcher.submit("k", 3, "b0", owner="bob")]
    assert batcher.queued_images_of("alice") == 3 and batcher.queued_images_of("carol") == 0
    assert batcher.queued_images_by_owner == {"alice": 3, "bob": 3}
    with pytest.raises(QueueFullError) as full:  # carol is within her share, but the queue is full
        batcher.submit("k", 3, "c0", owner="carol")
    assert not isinstance(full.value, OwnerQueueFullError)
    alice[1].cancel()  # a job whose client left no longer counts against its owner
    alice.append(batcher.submit("k", 1, "a3", owner="alice"))
    carol = batcher.submit("k", 1, "c1", owner="carol")
    model.gate.set()
    assert await asyncio.gather(running, alice[0], alice[2], *bob, carol) == [
        "done:running", "done:a0", "done:a3", "done:b0", "done:c1"
    ]
    assert batcher.queued_images_by_owner == {}
    await batcher.stop()
