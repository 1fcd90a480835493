"""Load against a real server process: 32 clients for 20 s on a small queue, a quarter of the
requests edits (multipart uploads), the rest generations.

Every request is answered with 200 or 429 (never a 5xx), each 200 carries the images asked for,
the queue (scraped from /metrics) never holds more than its bound, and resident memory shows no
growth trend once warm.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter

import httpx
import pytest

from attack_support import GENERATIONS, ServerProcess, assert_envelope, assert_valid_images
from test_images import encoded, picture

pytestmark = pytest.mark.attack

CLIENTS = 32
DURATION_S = 20.0
MAX_QUEUE = 6
EDITS = "/v1/images/edits"


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    process = ServerProcess(
        models_dir,
        tmp_path_factory.mktemp("load") / "server.log",
        env={"Z_IMAGE_MAX_QUEUE": str(MAX_QUEUE), "Z_IMAGE_MAX_BATCH_SIZE": "4", "Z_IMAGE_MAX_N": "2"},
    )
    try:
        yield process.start()
    finally:
        process.stop()


async def client_loop(index: int, base: str, deadline: float, statuses: Counter, failures: list) -> None:
    rng = random.Random(index)
    upload = encoded(picture(seed=index))
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        while time.monotonic() < deadline:
            n = rng.choice((1, 1, 2))
            size = rng.choice(("64x64", "64x64", "128x64"))
            fields = {"prompt": f"client {index} {rng.random()}", "n": n, "size": size, "num_inference_steps": 2}
            try:
                if rng.random() < 0.25:  # one request in four edits an upload
                    form = [(key, (None, str(value))) for key, value in fields.items()]
                    response = await client.post(EDITS, files=[*form, ("image", ("in.png", upload, "image/png"))])
                else:
                    response = await client.post(GENERATIONS, json=fields)
            except httpx.HTTPError as exc:  # every request must be answered
                failures.append(f"client {index}: {exc!r}")
                continue
            statuses[response.status_code] += 1
            try:
                if response.status_code == 200:
                    width, height = map(int, size.split("x"))
                    await asyncio.to_thread(assert_valid_images, response.json(), n, (width, height))
                elif response.status_code == 429:
                    assert_envelope(response, 429)
                    assert response.headers.get("retry-after")
                    await asyncio.sleep(rng.uniform(0.02, 0.2))  # keep the pressure on
                else:
                    failures.append(f"client {index}: {response.status_code} {response.text[:200]}")
            except AssertionError as exc:
                failures.append(f"client {index}: bad response: {exc}")


async def watch(server: ServerProcess, deadline: float, queue_depths: list, rss: list) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        while time.monotonic() < deadline:
            text = (await client.get("/metrics")).text
            depth = next(
                float(line.split()[1]) for line in text.splitlines() if line.startswith("zimage_queue_images ")
            )
            queue_depths.append(depth)
            rss.append(server.rss_bytes())
            await asyncio.sleep(0.25)


async def run_load(server: ServerProcess):
    deadline = time.monotonic() + DURATION_S
    statuses: Counter = Counter()
    failures: list[str] = []
    queue_depths: list[float] = []
    rss: list[int] = []
    await asyncio.gather(
        watch(server, deadline, queue_depths, rss),
        *(client_loop(i, server.url, deadline, statuses, failures) for i in range(CLIENTS)),
    )
    return statuses, failures, queue_depths, rss


def test_32_clients_for_20_seconds_get_only_200_or_429_and_the_queue_stays_bounded(server):
    started = time.monotonic()
    statuses, failures, queue_depths, rss = asyncio.run(run_load(server))
    elapsed = time.monotonic() - started

    assert elapsed >= DURATION_S
    assert not failures, failures[:5]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] >= CLIENTS and statuses[429] > 0, statuses  # it really was overloaded
    assert queue_depths and max(queue_depths) <= MAX_QUEUE
    assert max(queue_depths) > 0  # and the watcher really saw a queue

    # Memory: after a warm-up quarter, the last third of the samples is not above the first third
    # by more than a little (allocator noise), i.e. no steady growth per request.
    steady = rss[len(rss) // 4 :]
    third = max(1, len(steady) // 3)
    early, late = statistics.median(steady[:third]), statistics.median(steady[-third:])
    assert late <= early * 1.10 + 16 * 2**20, (early, late, rss)

    metrics = server.metrics()
    assert metrics["zimage_images_generated_total"] > 0
    assert metrics.get('zimage_requests_rejected_total{reason="queue_full"}', 0) == statuses[429]
    assert server.ready()
