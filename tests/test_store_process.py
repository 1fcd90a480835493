"""The image store in real `zimage-server serve` processes: kill -9 mid-burst, SIGHUP, start-up refusals."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from attack_support import SRC, ServerProcess
from PIL import Image

from zimage_server.keys import digest

pytestmark = pytest.mark.attack

GEN = "/v1/images/generations"


def listed(base: str, headers: dict | None = None) -> list[dict]:
    items, after = [], None
    while True:
        params = {"limit": 100} | ({"after": after} if after else {})
        page = httpx.get(base + "/v1/images", params=params, headers=headers, timeout=30).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]


def test_after_a_kill_9_mid_burst_every_listed_image_downloads_whole_and_no_partial_file_is_left(models_dir, tmp_path):
    store = tmp_path / "out"
    env = {"Z_IMAGE_STORE": str(store), "Z_IMAGE_MAX_QUEUE": "64"}
    server = ServerProcess(models_dir, tmp_path / "first.log", env).start()
    stop = threading.Event()

    def burst() -> None:
        while not stop.is_set():
            try:
                httpx.post(server.url + GEN, json={"prompt": "burst", "size": "256x256", "num_inference_steps": 1,
                                                   "n": 2}, timeout=30)  # fmt: skip
            except httpx.HTTPError:
                return

    senders = [threading.Thread(target=burst) for _ in range(6)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 60
    while len(list(store.glob("*/img_*.png"))) < 10:  # writes are under way
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.02)
    server.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    server.wait(10)
    stop.set()
    for sender in senders:
        sender.join()
    survivors = [path for path in store.rglob("*") if path.is_file() and path.name != "index.db"]
    assert survivors, "the burst wrote nothing before the kill"

    restarted = ServerProcess(models_dir, tmp_path / "second.log", {"Z_IMAGE_STORE": str(store)}).start()
    try:
        assert time.monotonic() - killed_at > 5  # staging files a dead write left are older than the grace
        deadline = time.monotonic() + 30
        while [p for p in store.rglob("*#*")]:  # the reconcile at start removes them
            assert time.monotonic() < deadline, [p.name for p in store.rglob("*#*")]
            time.sleep(0.1)
        items = listed(restarted.url)
        assert items, "no image survived in the index"
        for item in items:
            content = httpx.get(item["url"], timeout=30)
            assert content.status_code == 200 and len(content.content) == item["bytes"]
            image = Image.open(io.BytesIO(content.content))
            image.load()  # whole: a truncated PNG fails here
            assert image.size == (256, 256)
        assert all(not name.endswith(".png#") for name in os.listdir(store))
    finally:
        restarted.stop()


def write_keys(path: Path, *lines: str) -> None:
    path.write_text("\n".join(lines) + "\n")


def test_sighup_rereads_the_keys_file_and_a_broken_file_keeps_the_old_keys(models_dir, tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, "alice user alice-secret-1")
    server = ServerProcess(
        models_dir, tmp_path / "server.log", {"Z_IMAGE_API_KEYS_FILE": str(keys), "Z_IMAGE_STORE": str(tmp_path / "o")}
    ).start()
    try:

        def status(secret: str) -> int:
            return httpx.get(server.url + "/v1/images", headers={"Authorization": f"Bearer {secret}"}).status_code

        assert (status("alice-secret-1"), status("bob-secret-22")) == (200, 401)
        write_keys(keys, "alice user alice-secret-1", f"bob user sha256:{digest('bob-secret-22')}")
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while status("bob-secret-22") != 200:
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        write_keys(keys, "alice user alice-secret-1", "bob nobody")
        server.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "keeping the current API keys" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.05)
        assert (status("alice-secret-1"), status("bob-secret-22")) == (200, 200)
        assert "alice-secret-1" not in server.log() and "bob-secret-22" not in server.log()
    finally:
        server.stop()


def serve_once(models_dir: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("Z_IMAGE_")}
    environment |= {"MODELS_DIR": str(models_dir), "Z_IMAGE_DEVICE": "cpu", "PYTHONPATH": str(SRC)} | env
    return subprocess.run(
        [sys.executable, "-m", "zimage_server", "serve", "--port", "0"],
        env=environment, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_keys_file_with_a_bad_line_stops_the_start_in_one_line(models_dir, tmp_path):
    keys = tmp_path / "keys"
    write_keys(keys, "root admin root-secret-333", "alice superuser alice-secret-1")
    result = serve_once(models_dir, tmp_path, Z_IMAGE_API_KEYS_FILE=str(keys), Z_IMAGE_STORE=str(tmp_path / "o"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "line 2" in lines[0] and "role must be admin or user" in lines[0]
    assert "Traceback" not in result.stderr and "alice-secret-1" not in result.stderr


def test_an_index_from_a_newer_server_stops_the_start_in_one_line(models_dir, tmp_path):
    import sqlite3

    store = tmp_path / "o"
    store.mkdir()
    with sqlite3.connect(store / "index.db") as db:
        db.execute("CREATE TABLE zimage_schema (version INTEGER NOT NULL)")
        db.execute("INSERT INTO zimage_schema VALUES (99)")
    result = serve_once(models_dir, tmp_path, Z_IMAGE_STORE=str(store))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "schema version 99, newer than this server's 2" in lines[0]
