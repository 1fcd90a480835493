"""Faults against a real server process: out of memory and errors injected inside the pipeline call,
clients that leave while queued or while their batch runs, and SIGTERM in the middle of load.

The server runs with Z_IMAGE_FAULT_INJECTION=1 (see zimage_server/faults.py): a prompt marker
like [[fault:oom]] makes the runner fail inside its call, as a GPU would.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from attack_support import GENERATIONS, ServerProcess, assert_envelope, assert_valid_images

pytestmark = pytest.mark.attack

FAULTS_ON = {"Z_IMAGE_FAULT_INJECTION": "1"}
SMALL = {"size": "64x64", "num_inference_steps": 2}


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    process = ServerProcess(models_dir, tmp_path_factory.mktemp("faults") / "server.log", env=FAULTS_ON)
    try:
        yield process.start()
    finally:
        process.stop()


def post(server: ServerProcess, prompt: str, *, request_id: str | None = None, timeout: float = 60, **fields):
    headers = {"X-Request-ID": request_id} if request_id else {}
    return httpx.post(
        server.url + GENERATIONS, json={"prompt": prompt, **SMALL, **fields}, headers=headers, timeout=timeout
    )


def wait_for(condition, timeout: float = 20, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def metric(server: ServerProcess, name: str) -> float:
    return server.metrics().get(name, 0.0)


def run_behind_a_slow_request(server: ServerProcess, prompts: list[str]) -> list[httpx.Response]:
    """Hold the worker with a slow request, queue `prompts` behind it so they form one batch, return their answers."""
    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        blocker = pool.submit(post, server, "blocker [[fault:slow=0.4]]", num_inference_steps=4)
        wait_for(lambda: metric(server, "zimage_running_images") > 0, what="the blocker to run")
        futures = [pool.submit(post, server, prompt) for prompt in prompts]
        wait_for(lambda: metric(server, "zimage_queue_requests") == len(prompts), what="the batch to queue")
        assert blocker.result().status_code == 200
        return [future.result() for future in futures]


def test_out_of_memory_in_a_batch_retries_one_by_one_and_fails_only_the_request_that_cannot_fit(server):
    fits, too_big, fits_alone = run_behind_a_slow_request(
        server, ["a cat", "a huge cat [[fault:oom]]", "a shared cat [[fault:oom-shared]]"]
    )
    assert_valid_images(fits.json(), 1, (64, 64))
    assert_valid_images(fits_alone.json(), 1, (64, 64))
    error = assert_envelope(too_big, 500)
    assert error["code"] == "out_of_memory" and "64x64" in error["message"]
    assert too_big.headers["x-should-retry"] == "false"
    assert too_big.headers["x-request-id"] in error["message"]
    assert "out of memory in a call of 3 requests" in server.log()
    assert metric(server, 'zimage_errors_total{type="OutOfMemoryForRequest"}') >= 1
    assert server.ready()


def test_a_generic_error_fails_only_its_batch_with_a_request_id_and_no_internals(server):
    doomed, batch_mate = run_behind_a_slow_request(server, ["boom [[fault:error]]", "innocent bystander"])
    for response in (doomed, batch_mate):
        error = assert_envelope(response, 500)
        request_id = response.headers["x-request-id"]
        assert request_id in error["message"]
        assert "InjectedFault" not in response.text and "injected" not in response.text
        # The traceback is in the log, findable by the id.
        failed = [line for line in server.log_lines_for(request_id) if "failed" in line]
        assert failed, server.log()[-2000:]
    assert "Traceback" in server.log() and "InjectedFault" in server.log()
    assert post(server, "after the storm").status_code == 200
    assert server.ready()


def test_a_client_that_leaves_while_queued_is_never_computed(server):
    request_id = f"leaver-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post, server, "blocker [[fault:slow=0.4]]", num_inference_steps=4)
        wait_for(lambda: metric(server, "zimage_running_images") > 0, what="the blocker to run")
        with pytest.raises(httpx.ReadTimeout):
            post(server, "impatient", request_id=request_id, timeout=0.5)
        assert blocker.result().status_code == 200
    wait_for(lambda: server.log_lines_for(request_id), what="the leaver's log line")
    (line,) = server.log_lines_for(request_id)
    assert "status=499" in line and "batch_size=-" in line  # dropped before any batch took it
    assert server.ready()


def test_a_running_batch_whose_clients_all_left_stops_at_the_next_step(server):
    request_id = f"runaway-{uuid.uuid4().hex[:8]}"
    cancelled_before = metric(server, "zimage_batches_cancelled_total")
    started = time.monotonic()
    # 40 steps of 0.3 s: 12 s if nobody stopped it.
    with pytest.raises(httpx.ReadTimeout):
        post(server, "long run [[fault:slow=0.3]]", request_id=request_id, timeout=1.0, num_inference_steps=40)
    wait_for(
        lambda: metric(server, "zimage_batches_cancelled_total") > cancelled_before, timeout=5, what="the stop"
    )
    assert time.monotonic() - started < 5
    quick = time.monotonic()
    assert post(server, "next in line").status_code == 200
    assert time.monotonic() - quick < 5
    stopped = [line for line in server.log_lines_for(request_id) if "stopped early" in line]
    assert stopped and "ERROR" not in stopped[0]
    assert server.ready()


# --- SIGTERM in the middle of load ------------------------------------------------------------

LOAD_CLIENTS = 16


async def load_until_refused(base: str, index: int, outcomes: list) -> None:
    """Send requests until the server says it is shutting down (or is gone), recording each outcome."""
    rng = random.Random(index)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        while True:
            n = rng.choice((1, 2))
            request_id = f"term-{index}-{uuid.uuid4().hex[:8]}"
            payload = {"prompt": f"load {index} [[fault:slow=0.1]]", "n": n, **SMALL}
            try:
                response = await client.post(GENERATIONS, json=payload, headers={"X-Request-ID": request_id})
            except httpx.HTTPError as exc:
                outcomes.append((request_id, type(exc).__name__, None, time.monotonic()))
                return
            outcomes.append((request_id, response.status_code, response, time.monotonic()))
            if response.status_code == 503:
                return  # a well-behaved client goes elsewhere
            if response.status_code == 200:
                await asyncio.to_thread(assert_valid_images, response.json(), n, (64, 64))
            else:
                await asyncio.sleep(rng.uniform(0.02, 0.1))


def probe_ready(base: str, seen: Counter, stop: threading.Event) -> None:
    with httpx.Client(base_url=base, timeout=5) as client:
        while not stop.is_set():
            try:
                response = client.get("/ready")
                seen[(response.status_code, response.json().get("status"))] += 1
            except httpx.HTTPError:
                seen["gone"] += 1
                return
            time.sleep(0.05)


def test_sigterm_under_load_finishes_every_accepted_request_and_exits_0(models_dir, tmp_path):
    server = ServerProcess(models_dir, tmp_path / "server.log", env={**FAULTS_ON, "Z_IMAGE_MAX_QUEUE": "8"})
    server.start()
    outcomes: list = []
    ready_seen: Counter = Counter()
    try:

        async def scenario() -> tuple[float, int]:
            clients = [asyncio.create_task(load_until_refused(server.url, i, outcomes)) for i in range(LOAD_CLIENTS)]
            await asyncio.sleep(3)
            # Signal while work is queued, so the drain has something to finish.
            for _ in range(200):
                if await asyncio.to_thread(metric, server, "zimage_queue_images") > 0:
                    break
                await asyncio.sleep(0.02)
            signalled = time.monotonic()
            server.signal(signal.SIGTERM)
            _, unfinished = await asyncio.wait(clients, timeout=60)
            for client in unfinished:
                client.cancel()
            return signalled, len(unfinished)

        probe_stop = threading.Event()
        prober = threading.Thread(target=probe_ready, args=(server.url, ready_seen, probe_stop))
        prober.start()
        try:
            signalled, unfinished = asyncio.run(scenario())
            exit_code = server.wait(timeout=60)
        finally:
            probe_stop.set()
            prober.join(timeout=10)
    finally:
        server.stop()

    log = server.log()
    statuses = Counter(status for _, status, _, _ in outcomes)
    context = f"{statuses} {ready_seen}\n{log[-3000:]}"  # what a failure needs to be understood
    assert exit_code == 0, context
    assert unfinished == 0, context
    assert "drained in" in log, context
    assert statuses[200] > 0 and statuses[503] > 0, context
    assert any(status == 200 and at > signalled for _, status, _, at in outcomes), "nothing finished while draining"
    for request_id, status, response, _ in outcomes:
        if isinstance(status, int):
            assert status in (200, 429, 503), (status, response.text[:200])
            if status == 503:
                assert assert_envelope(response, 503)["code"] == "shutting_down"
                assert response.headers["retry-after"]
        else:
            # A transport error is only acceptable for a request the app never saw (refused at connect).
            assert not server.log_lines_for(request_id), (status, server.log_lines_for(request_id), context)
    # Every generation the server answered with images reached its client.
    served = [line for line in log.splitlines() if "route=/v1/images/generations status=200" in line]
    assert len(served) == statuses[200], context
    assert ready_seen[(503, "draining")] > 0, context


def test_a_drain_that_runs_out_of_time_answers_503_stops_the_run_and_still_exits_0(models_dir, tmp_path):
    env = {**FAULTS_ON, "Z_IMAGE_DRAIN_TIMEOUT_S": "1"}
    server = ServerProcess(models_dir, tmp_path / "server.log", env=env).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            # 40 steps of 0.5 s: 20 s, far past the 1 s drain.
            stuck = pool.submit(post, server, "endless [[fault:slow=0.5]]", num_inference_steps=40)
            wait_for(lambda: metric(server, "zimage_running_images") > 0, what="the run to start")
            signalled = time.monotonic()
            server.signal(signal.SIGINT)
            response = stuck.result(timeout=30)
            exit_code = server.wait(timeout=30)
            took = time.monotonic() - signalled
    finally:
        server.stop()
    assert assert_envelope(response, 503)["code"] == "shutting_down"
    assert exit_code == 0, server.log()[-3000:]
    assert took < 10, took  # the run stopped at its next step instead of finishing its 20 s
    assert "drain timed out" in server.log() and "stopped early" in server.log()
