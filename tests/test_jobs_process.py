"""Async jobs across crashes, drains and replicas, in real `zimage-server serve` processes."""

from __future__ import annotations

import io
import secrets
import signal
import sqlite3
import time

import httpx
import numpy as np
import pytest
from attack_support import ServerProcess
from PIL import Image
from real_servers import create_database

pytestmark = pytest.mark.attack

GEN = "/v1/images/generations"
ASYNC = {"Prefer": "respond-async"}
BODY = {"prompt": "a lighthouse in fog", "size": "256x256", "num_inference_steps": 3}


def status(base: str, job_id: str) -> dict:
    return httpx.get(f"{base}/v1/images/jobs/{job_id}", timeout=30).json()


def wait_until(condition, timeout: float, what) -> None:
    """Poll until `condition()`; `what` (a string, or a function giving one) says what went wrong."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.05)


def statuses(base: str, jobs: list[str]) -> list[str]:
    return [status(base, job)["status"] for job in jobs]


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def all_images(base: str) -> list[dict]:
    return httpx.get(base + "/v1/images", params={"limit": 100}, timeout=30).json()["data"]


def assert_each_equals_its_synchronous_twin(base: str, jobs: list[str], bodies: list[dict]) -> None:
    for job_id, body in zip(jobs, bodies, strict=True):
        job = status(base, job_id)
        assert job["status"] == "succeeded", job
        [item] = job["data"]
        twin = httpx.post(base + GEN, json=body | {"seed": item["seed"], "response_format": "url"},
                          timeout=60).json()["data"][0]  # fmt: skip
        assert np.array_equal(pixels(httpx.get(item["url"]).content), pixels(httpx.get(twin["url"]).content))
        httpx.delete(f"{base}/v1/images/{twin['id']}")


def test_a_kill_9_loses_no_accepted_job_and_records_none_twice(models_dir, tmp_path):
    env = {"Z_IMAGE_STORE": str(tmp_path / "out"), "Z_IMAGE_JOB_LEASE_S": "2", "Z_IMAGE_MAX_BATCH_SIZE": "1",
           "Z_IMAGE_FAULT_INJECTION": "1"}  # fmt: skip
    first = ServerProcess(models_dir, tmp_path / "first.log", env).start()
    # The third job takes a second a step, so the kill finds it running.
    bodies = [BODY | {"seed": 100 + i} | ({"prompt": BODY["prompt"] + " [[fault:slow=1]]"} if i == 2 else {})
              for i in range(8)]  # fmt: skip
    try:
        jobs = [httpx.post(first.url + GEN, json=body, headers=ASYNC).json()["id"] for body in bodies]
        wait_until(lambda: status(first.url, jobs[1])["status"] == "succeeded", 120, "the second job never finished")
        wait_until(lambda: status(first.url, jobs[2]).get("progress", {}).get("step", 0) >= 1, 60,
                   "the third job never ran")  # fmt: skip
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.stop()
    second = ServerProcess(models_dir, tmp_path / "second.log", env).start()
    try:
        wait_until(lambda: all(status(second.url, j)["status"] == "succeeded" for j in jobs), 180,
                   lambda: f"not every job succeeded after the restart: {statuses(second.url, jobs)}\n"
                           f"{second.log()[-3000:]}")  # fmt: skip
        images = all_images(second.url)
        assert len(images) == 8 and len({image["request_id"] for image in images}) == 8  # none twice
        assert_each_equals_its_synchronous_twin(second.url, jobs, bodies)
    finally:
        second.stop()


def test_sigterm_runs_what_runs_and_leaves_queued_jobs_for_the_next_start(models_dir, tmp_path):
    env = {"Z_IMAGE_STORE": str(tmp_path / "out"), "Z_IMAGE_MAX_BATCH_SIZE": "1", "Z_IMAGE_FAULT_INJECTION": "1"}
    first = ServerProcess(models_dir, tmp_path / "first.log", env).start()
    slow = {"prompt": "fog [[fault:slow=0.5]]", "size": "64x64", "num_inference_steps": 2}  # a second a job
    try:
        jobs = [httpx.post(first.url + GEN, json=slow | {"seed": i}, headers=ASYNC).json()["id"] for i in range(6)]
        wait_until(lambda: status(first.url, jobs[0]).get("progress", {}).get("step", 0) >= 1, 60, "nothing ran")
        first.signal(signal.SIGTERM)
        assert first.wait(120) == 0
    finally:
        first.stop()
    with sqlite3.connect(tmp_path / "out" / "index.db") as db:
        left = dict(db.execute("SELECT status, COUNT(*) FROM zimage_jobs GROUP BY status").fetchall())
    assert left.get("queued", 0) >= 3 and left.get("running", 0) == 0, left  # the drain ran only what had started
    second = ServerProcess(models_dir, tmp_path / "second.log", env).start()
    try:
        wait_until(lambda: all(status(second.url, j)["status"] == "succeeded" for j in jobs), 180, "jobs were lost")
        assert len(all_images(second.url)) == 6
    finally:
        second.stop()


def test_replicas_share_one_queue_and_a_dead_replicas_jobs_finish_on_the_other(models_dir, tmp_path, postgres, s3):
    env = {
        "Z_IMAGE_STORE": f"s3://{s3.bucket}/jobs-{secrets.token_hex(4)}",
        "Z_IMAGE_DATABASE_URL": create_database(postgres, f"jobs_{secrets.token_hex(4)}"),
        "Z_IMAGE_JOB_LEASE_S": "2",
        "Z_IMAGE_MAX_BATCH_SIZE": "1",
        **s3.env,
    }
    a = ServerProcess(models_dir, tmp_path / "a.log", env).start()
    b = ServerProcess(models_dir, tmp_path / "b.log", env).start()
    try:
        jobs = [httpx.post(a.url + GEN, json=BODY | {"seed": 200 + i}, headers=ASYNC).json()["id"] for i in range(12)]
        wait_until(lambda: sum(status(b.url, j)["status"] == "succeeded" for j in jobs) >= 4, 120, "no progress")
        a.signal(signal.SIGKILL)
        a.wait(10)
        wait_until(lambda: all(status(b.url, j)["status"] == "succeeded" for j in jobs), 180, "B did not finish A's jobs")
        images = all_images(b.url)
        assert len(images) == 12 and len({image["request_id"] for image in images}) == 12  # each exactly once
    finally:
        a.stop()
        b.stop()
