"""Draining on a signal: not ready, new work refused, accepted work finished."""

from __future__ import annotations

import threading
import time

from litestar.testing import TestClient

from conftest import assert_envelope, serving
from test_auth import SMALL, URL
from zimage_server.api import create_app
from zimage_server.api.shutdown import drain


def test_a_draining_server_is_not_ready_and_refuses_new_work_with_retry_after(settings, runner):
    with serving(settings, runner) as client:
        assert client.get("/ready").status_code == 200
        client.blocking_portal.call(drain, client.app, 5.0)
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        response = client.post(URL, json={"prompt": "a", **SMALL})
        assert assert_envelope(response, 503)["code"] == "shutting_down"
        assert response.headers["retry-after"]
        assert client.get("/health").status_code == 200
        assert "zimage_ready 0.0" in client.get("/metrics").text


def test_draining_lets_running_and_queued_work_finish(settings, runner):
    app = create_app(settings, runner)
    with TestClient(app, raise_server_exceptions=False) as client:
        results: list[int] = []

        def send(size: str) -> None:
            results.append(client.post(URL, json={"prompt": "drain me", "size": size, "num_inference_steps": 2}).status_code)

        def until(text: str) -> None:
            for _ in range(500):
                if text in client.get("/metrics").text:
                    return
                time.sleep(0.01)
            raise AssertionError(f"never saw {text}")

        runner.lock.acquire()
        senders = [threading.Thread(target=send, args=("64x64",)), threading.Thread(target=send, args=("128x64",))]
        try:
            senders[0].start()
            until("zimage_running_images 1.0")
            senders[1].start()
            until("zimage_queue_requests 1.0")
            draining = client.blocking_portal.start_task_soon(drain, app, 30.0)
            until("zimage_ready 0.0")
        finally:
            runner.lock.release()
        draining.result(timeout=30)
        for sender in senders:
            sender.join(timeout=30)
        assert results == [200, 200]
