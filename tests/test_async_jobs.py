"""Asynchronous jobs (`Prefer: respond-async`): accepted durably, run on the same batcher, watched,
listed, cancelled, owned by keys; each job's images equal its synchronous twin's."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_envelope, serving, wait_for
from zimage_server.keys import digest

GEN = "/v1/images/generations"
ASYNC = {"Prefer": "respond-async"}
SMALL = {"prompt": "a red barn", "size": "64x64", "num_inference_steps": 2}
ALICE, BOB, ROOT = "alice-secret-1", "bob-secret-22", "root-secret-333"


def auth(secret: str | None = None, **headers: str) -> dict[str, str]:
    return ({"Authorization": f"Bearer {secret}"} if secret else {}) | headers


def finished(client, job_id: str, headers: dict | None = None, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/images/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(f"alice user {ALICE}\nbob user sha256:{digest(BOB)}\nroot admin {ROOT}\n")
    return path


def test_an_async_generation_is_accepted_then_succeeds_with_its_synchronous_twins_images(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        accepted = client.post(GEN, json=SMALL | {"n": 2, "response_format": "b64_json"}, headers=ASYNC)
        assert accepted.status_code == 202, accepted.text
        job = accepted.json()
        assert accepted.headers["location"] == f"/v1/images/jobs/{job['id']}"
        assert job["object"] == "image.job" and job["id"].startswith("job_") and job["n"] == 2
        assert job["status"] in ("queued", "running") and job["model"] == "z-image-turbo"
        done = finished(client, job["id"])
        assert done["status"] == "succeeded", done
        seeds = [item["seed"] for item in done["data"]]
        twin = client.post(GEN, json=SMALL | {"n": 2, "seed": seeds[0]}).json()["data"]
        for item, sync in zip(done["data"], twin, strict=True):
            assert item["id"].startswith("img_") and item["url"].startswith("http://testserver.local/")
            from_link = client.get(item["url"]).content
            assert from_link == base64.b64decode(item["b64_json"])
            assert np.array_equal(pixels(from_link), pixels(base64.b64decode(sync["b64_json"])))
        # The list links the same images without their bytes.
        [listed] = [j for j in client.get("/v1/images/jobs").json()["data"] if j["id"] == job["id"]]
        assert [item["id"] for item in listed["data"]] == [item["id"] for item in done["data"]]
        assert all(item["url"] and "b64_json" not in item for item in listed["data"])
        # As the synchronous answer: b64_json by default, links only with response_format=url.
        assert "b64_json" in finished(client, client.post(GEN, json=SMALL, headers=ASYNC).json()["id"])["data"][0]
        url_only = client.post(GEN, json=SMALL | {"response_format": "url"}, headers=ASYNC).json()["id"]
        assert "b64_json" not in finished(client, url_only)["data"][0]


def test_other_prefer_values_are_ignored(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        for prefer in ("return=minimal", "respond-asynchronously", "wait=10"):
            response = client.post(GEN, json=SMALL, headers={"Prefer": prefer})
            assert response.status_code == 200 and "b64_json" in response.json()["data"][0]
        assert client.post(GEN, json=SMALL, headers={"Prefer": "wait=5, respond-async"}).status_code == 202


def test_a_queued_job_cancelled_never_runs_and_a_thousand_cancels_leave_one(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        calls_before = runner.calls
        runner.lock.acquire()  # the GPU is busy: the job waits in the queue
        try:
            blocker = client.post(GEN, json=SMALL | {"size": "128x64"}, headers=ASYNC).json()["id"]
            wait_for(lambda: client.get(f"/v1/images/jobs/{blocker}").json()["status"] == "running")
            job = client.post(GEN, json=SMALL, headers=ASYNC).json()["id"]
            for _ in range(1000):
                assert client.post(f"/v1/images/jobs/{job}/cancel").status_code == 200
        finally:
            runner.lock.release()
        assert finished(client, blocker)["status"] == "succeeded"
        cancelled = finished(client, job)
        assert cancelled["status"] == "cancelled" and "data" not in cancelled
        assert runner.calls - calls_before == 1  # the blocker's call only
        again = client.post(f"/v1/images/jobs/{job}/cancel").json()
        assert again["status"] == "cancelled" and again["finished_at"] == cancelled["finished_at"]
        done = client.post(f"/v1/images/jobs/{blocker}/cancel").json()
        assert done["status"] == "succeeded" and len(done["data"]) == 1  # a finished job is unchanged


def test_a_running_job_cancelled_stops_at_its_next_step(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        job = client.post(GEN, json=SMALL | {"num_inference_steps": 200, "size": "256x256"}, headers=ASYNC).json()["id"]
        wait_for(lambda: client.get(f"/v1/images/jobs/{job}").json().get("progress", {}).get("step", 0) >= 1, 60)
        progress = client.get(f"/v1/images/jobs/{job}").json()["progress"]
        assert progress["total"] == 200
        client.post(f"/v1/images/jobs/{job}/cancel")
        done = finished(client, job, timeout=30)
        assert done["status"] == "cancelled"
        assert client.get("/v1/images").json()["data"] == []


def test_jobs_belong_to_keys_like_images(settings, runner, tmp_path, keys_file):
    with serving(settings, runner, store=str(tmp_path / "out"), api_keys_file=keys_file) as client:
        alice = client.post(GEN, json=SMALL, headers=auth(ALICE, **ASYNC)).json()["id"]
        bob = client.post(GEN, json=SMALL, headers=auth(BOB, **ASYNC)).json()["id"]
        finished(client, alice, auth(ALICE))
        finished(client, bob, auth(BOB))
        for path in (f"/v1/images/jobs/{alice}",):
            assert assert_envelope(client.get(path, headers=auth(BOB)), 404)["code"] == "job_not_found"
        assert client.post(f"/v1/images/jobs/{alice}/cancel", headers=auth(BOB)).status_code == 404
        assert [j["id"] for j in client.get("/v1/images/jobs", headers=auth(ALICE)).json()["data"]] == [alice]
        assert [j["id"] for j in client.get("/v1/images/jobs", headers=auth(ROOT)).json()["data"]] == [bob, alice]
        # The job's images are its owner's too.
        [image] = client.get(f"/v1/images/jobs/{alice}", headers=auth(ALICE)).json()["data"]
        assert client.get(f"/v1/images/{image['id']}", headers=auth(BOB)).status_code == 404


@pytest.mark.parametrize("job_id", ["job_" + "0" * 32, "job_../x", "x" * 10_000, "img_" + "0" * 32, "job_\x00"])
def test_bad_job_ids_are_404s(settings, runner, tmp_path, job_id):
    import urllib.parse

    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        quoted = urllib.parse.quote(job_id, safe="")
        for response in (client.get(f"/v1/images/jobs/{quoted}"), client.post(f"/v1/images/jobs/{quoted}/cancel")):
            assert response.status_code == 404 and "error" in response.json()
            if job_id != "job_../x":  # a path the router itself does not match, not the job route
                assert response.json()["error"]["code"] == "job_not_found"


def test_async_needs_a_store_and_refuses_streams_and_sync_webhooks(settings, runner, tmp_path):
    with serving(settings, runner, store="none") as client:
        assert assert_envelope(client.post(GEN, json=SMALL, headers=ASYNC), 503)["code"] == "store_unavailable"
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        assert assert_envelope(client.post(GEN, json=SMALL | {"stream": True}, headers=ASYNC), 400)["param"] == "stream"
        assert assert_envelope(client.post(GEN, json=SMALL | {"store": False}, headers=ASYNC), 400)["param"] == "store"
        body = SMALL | {"webhook_url": "https://example.com/hook"}
        assert assert_envelope(client.post(GEN, json=body), 400)["param"] == "webhook_url"
        assert assert_envelope(client.post(GEN, json=body, headers=ASYNC), 400)["param"] == "webhook_url"  # no secret
        assert assert_envelope(client.post(GEN, json=SMALL | {"webhook_url": "x" * 10_000}, headers=ASYNC), 400)


def test_a1111_and_edit_requests_run_as_jobs_too(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        txt = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "width": 64, "height": 64, "steps": 2,
                                                     "seed": 9}, headers=ASYNC)  # fmt: skip
        assert txt.status_code == 202
        job = finished(client, txt.json()["id"])
        assert job["status"] == "succeeded" and job["data"][0]["seed"] == 9
        sync = client.post("/sdapi/v1/txt2img", json={"prompt": "a boat", "width": 64, "height": 64, "steps": 2, "seed": 9})
        assert np.array_equal(pixels(client.get(job["data"][0]["url"]).content),
                              pixels(base64.b64decode(sync.json()["images"][0])))  # fmt: skip
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, "PNG")
        form = {"prompt": "winter", "num_inference_steps": "2", "seed": "4"}
        edit = client.post("/v1/images/edits", files={"image": ("a.png", buffer.getvalue(), "image/png")}, data=form,
                           headers=ASYNC)  # fmt: skip
        assert edit.status_code == 202, edit.text
        done = finished(client, edit.json()["id"])
        assert done["status"] == "succeeded"
        twin = client.post("/v1/images/edits", files={"image": ("a.png", buffer.getvalue(), "image/png")}, data=form)
        assert np.array_equal(pixels(client.get(done["data"][0]["url"]).content),
                              pixels(base64.b64decode(twin.json()["data"][0]["b64_json"])))  # fmt: skip


def test_queue_position_while_queued(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out"), max_batch_size=1) as client:
        runner.lock.acquire()
        try:
            ids = [client.post(GEN, json=SMALL | {"seed": i}, headers=ASYNC).json()["id"] for i in range(4)]
            wait_for(lambda: client.get(f"/v1/images/jobs/{ids[0]}").json()["status"] == "running")
            wait_for(lambda: client.get(f"/v1/images/jobs/{ids[1]}").json()["status"] == "running")
            # Job 0 runs, job 1 waits in this replica's batcher (it had room), 2 and 3 in the shared queue.
            positions = [client.get(f"/v1/images/jobs/{job}").json().get("queue_position") for job in ids[2:]]
            assert positions == [0, 1]
        finally:
            runner.lock.release()
        assert all(finished(client, job)["status"] == "succeeded" for job in ids)


def test_fair_shares_one_keys_32_images_hold_back_anothers_by_one_batch_at_most(settings, runner, tmp_path, keys_file):
    """Key A queues 32 images (8 requests of 4) behind a busy GPU, then key B one image: B's
    image runs before A's fifth batch starts."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from conftest import live_server, metric

    finished_at: dict[str, float] = {}

    def send(name: str, secret: str, n: int) -> None:
        response = httpx.post(base + GEN, json=SMALL | {"n": n}, headers=auth(secret), timeout=120)
        assert response.status_code == 200, response.text
        finished_at[name] = time.monotonic()

    with live_server(settings, runner, store=str(tmp_path / "out"), api_keys_file=keys_file, max_batch_size=4, max_queue=40) as base:
        with ThreadPoolExecutor(10) as pool:
            runner.lock.acquire()
            try:
                blocker = pool.submit(send, "blocker", ROOT, 1)
                wait_for(lambda: metric(base, "zimage_running_images") == 1)
                a_sends = [pool.submit(send, f"a{i}", ALICE, 4) for i in range(8)]
                wait_for(lambda: metric(base, "zimage_queue_images") == 32)
                b_send = pool.submit(send, "b", BOB, 1)
                wait_for(lambda: metric(base, "zimage_queue_images") == 33)
            finally:
                runner.lock.release()
            for future in (blocker, *a_sends, b_send):
                future.result()
    a_before_b = sum(finished_at[f"a{i}"] < finished_at["b"] for i in range(8))
    assert a_before_b <= 1, sorted(finished_at, key=finished_at.get)


def test_a_keys_share_of_the_queue_is_capped_while_others_get_in(settings, runner, tmp_path, keys_file):
    with serving(settings, runner, store=str(tmp_path / "out"), api_keys_file=keys_file, max_queue_per_key=4) as client:
        runner.lock.acquire()
        try:
            blocker = client.post(GEN, json=SMALL | {"size": "128x64"}, headers=auth(ROOT, **ASYNC)).json()["id"]
            wait_for(lambda: client.get(f"/v1/images/jobs/{blocker}", headers=auth(ROOT)).json()["status"] == "running")
            import threading

            results = {}

            def post(name, secret, n):
                results[name] = client.post(GEN, json=SMALL | {"n": n}, headers=auth(secret))

            threads = [threading.Thread(target=post, args=("a1", ALICE, 4))]
            threads[0].start()
            wait_for(lambda: client.get("/metrics").text.count("zimage_queue_images 4.0") == 1)
            over = client.post(GEN, json=SMALL, headers=auth(ALICE))
            error = assert_envelope(over, 429)
            assert "Z_IMAGE_MAX_QUEUE_PER_KEY=4" in error["message"] and error["code"] == "queue_full"
            threads.append(threading.Thread(target=post, args=("b", BOB, 1)))
            threads[1].start()
            wait_for(lambda: client.get("/metrics").text.count("zimage_queue_images 5.0") == 1)
        finally:
            runner.lock.release()
        for thread in threads:
            thread.join()
        assert results["a1"].status_code == 200 and results["b"].status_code == 200


def test_a_finished_jobs_record_is_posted_to_its_webhook_and_the_servers_signed(settings, runner, tmp_path):
    from standardwebhooks import Webhook
    from test_webhooks import Receiver, answer

    secret = "a-webhook-secret-of-some-length"
    with Receiver([answer(500), answer(200)]) as own, Receiver([answer(204)]) as servers:
        overrides = dict(store=str(tmp_path / "out"), webhook_secret=secret, webhook_allow=("127.0.0.1",),
                         webhook_url=servers.url)  # fmt: skip
        with serving(settings, runner, **overrides) as client:
            job = client.post(GEN, json=SMALL | {"webhook_url": own.url}, headers=ASYNC).json()["id"]
            assert finished(client, job)["status"] == "succeeded"
            wait_for(lambda: own.answered_2xx == 1 and servers.answered_2xx == 1, 30)
            refused = client.post(GEN, json=SMALL | {"webhook_url": "http://10.1.2.3/hook"}, headers=ASYNC)
            assert "10.1.2.3" in assert_envelope(refused, 400)["message"]
        for receiver in (own, servers):
            events = [Webhook(secret.encode()).verify(body, headers) for headers, body in receiver.requests]
            assert all(event["type"] == "image.job.succeeded" for event in events)
            record = events[-1]["data"]
            assert record["id"] == job and record["status"] == "succeeded"
            assert record["data"][0]["url"].startswith("http://127.0.0.1:8000/v1/images/img_")
        assert len(set(own.ids)) == 1 and own.ids[0] != servers.ids[0]  # one id per delivery, kept on retry


def test_a_job_that_fails_records_the_error_envelope(settings, tmp_path):
    from litestar.testing import TestClient

    from zimage_server.api import create_app
    from zimage_server.faults import FaultInjector

    app = create_app(settings.replace(store=str(tmp_path / "out")), faults=FaultInjector())
    with TestClient(app, raise_server_exceptions=False) as client:
        job = client.post(GEN, json=SMALL | {"prompt": "a barn [[fault:oom]]"}, headers=ASYNC).json()["id"]
        done = finished(client, job)
        assert done["status"] == "failed" and "data" not in done
        assert set(done["error"]) == {"message", "type", "param", "code"} and done["error"]["code"] == "out_of_memory"
        assert client.get("/v1/images").json()["data"] == []


def test_finished_jobs_rows_go_after_the_stores_max_age_and_waiting_ones_stay(tmp_path):
    import asyncio

    from zimage_server.index import open_index
    from zimage_server.job_queue import QUEUED, JobQueue, JobRecord, new_job_id

    async def scenario() -> None:
        index = await open_index(f"sqlite:///{tmp_path / 'index.db'}")
        queue = JobQueue(index)
        ids = []
        for _ in range(3):
            job = JobRecord(id=new_job_id(), owner="anonymous", created_at=time.time(), status=QUEUED,
                            kind="generations", request={"body": {}}, request_id="r", model="m", n=1)  # fmt: skip
            await queue.submit(job)
            ids.append(job.id)
        for _ in range(2):  # two run to an end, one stays queued
            claimed = await queue.claim("replica_a", 30)
            assert await queue.finish(claimed.id, "replica_a", "succeeded", result={})
        assert await queue.prune(3600) == 0  # nothing is old yet
        assert await queue.prune(3600, now=time.time() + 7200) == 2
        assert [await queue.get(i) is not None for i in ids] == [False, False, True]
        await index.close()

    asyncio.run(scenario())


def test_jobs_answer_for_themselves_while_a_replica_loads_its_model(settings, runner, tmp_path):
    """A replica still loading (here: fetching) its model shares the queue: it shows a running
    job's progress from the row, and cancels a queued one, without taking either."""
    import asyncio
    import threading

    from litestar.testing import TestClient

    from zimage_server.api import create_app

    release = threading.Event()

    async def fetch(_settings) -> None:  # a download that finishes when the test says so
        while not release.is_set():
            await asyncio.sleep(0.01)

    shared = settings.replace(store=str(tmp_path / "out"))
    with serving(shared, runner) as serving_replica:
        runner.lock.acquire()  # the GPU is busy: one job runs, the next waits
        try:
            running = serving_replica.post(GEN, json=SMALL | {"size": "128x64"}, headers=ASYNC).json()["id"]
            wait_for(lambda: serving_replica.get(f"/v1/images/jobs/{running}").json()["status"] == "running")
            serving_replica.app.state.server.job_runner.pause()  # it takes no more: the next stays queued
            queued = serving_replica.post(GEN, json=SMALL, headers=ASYNC).json()["id"]
            loading = create_app(shared, runner, fetch_model=fetch)
            with TestClient(loading, raise_server_exceptions=False) as client:
                assert client.get("/ready").status_code == 503
                seen = client.get(f"/v1/images/jobs/{running}")
                assert seen.status_code == 200 and seen.json()["status"] == "running", seen.text
                assert seen.json()["progress"] == {"step": 0, "total": 0}  # the row's: nobody here runs it
                cancelled = client.post(f"/v1/images/jobs/{queued}/cancel")
                assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", cancelled.text
                listed = client.get("/v1/images/jobs")
                assert listed.status_code == 200 and {job["id"] for job in listed.json()["data"]} == {running, queued}
                release.set()
        finally:
            runner.lock.release()
        assert finished(serving_replica, running)["status"] == "succeeded"
        assert serving_replica.get(f"/v1/images/jobs/{queued}").json()["status"] == "cancelled"
