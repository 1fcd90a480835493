"""A real `zimage-server serve` process on loopback, for the attack tests (tests/test_attack_*.py).

Each server binds port 0 (the kernel picks a free one; we read it from uvicorn's start-up line),
logs to a file the tests read, and is always stopped: SIGTERM, then SIGKILL if it hangs.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

SRC = Path(__file__).resolve().parents[1] / "src"
GENERATIONS = "/v1/images/generations"
STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


class ServerProcess:
    """`python -m zimage_server serve` with the given env settings, started and stopped by a test."""

    def __init__(self, models_dir: Path, log_path: Path, env: dict[str, str] | None = None):
        self.models_dir = models_dir
        self.log_path = log_path
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 90) -> ServerProcess:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("Z_IMAGE_", "MODELS_DIR"))}
        env.update(
            MODELS_DIR=str(self.models_dir),
            Z_IMAGE_DEVICE="cpu",
            PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            Z_IMAGE_STORE=str(self.log_path.parent / "outputs"),
        )
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "zimage_server", "serve", "--host", "127.0.0.1", "--port", "0"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + timeout
        while not self.url:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not start in {timeout} s:\n{self.log()[-3000:]}")
            if match := STARTED.search(self.log()):
                self.url = f"http://127.0.0.1:{match.group(1)}"
            time.sleep(0.1)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) * 1024

    def metrics(self) -> dict[str, float]:
        """One scrape of /metrics: sample name (with labels, Prometheus style) -> value."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return samples

    def ready(self) -> bool:
        return httpx.get(self.url + "/ready", timeout=10).status_code == 200

    def log_lines_for(self, request_id: str) -> list[str]:
        return [line for line in self.log().splitlines() if request_id in line]


def assert_envelope(response: httpx.Response, status: int | None = None) -> dict:
    """An OpenAI error envelope (4xx unless `status` says otherwise) with no internals in it."""
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:300])
    else:
        assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert "Traceback" not in response.text and 'File "' not in response.text
    return error


def assert_valid_images(body: dict, n: int, size: tuple[int, int]) -> None:
    assert len(body["data"]) == n, body.get("data")
    seeds = [item["seed"] for item in body["data"]]
    assert seeds == list(range(seeds[0], seeds[0] + n))
    for item in body["data"]:
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        image.load()
        assert image.format == "PNG" and image.size == size
