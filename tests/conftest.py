"""Shared fixtures: one tiny, real, random-weight Z-Image pipeline, written once and loaded by the real loader."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from litestar.testing import TestClient

from zimage_server.api import create_app
from zimage_server.policy import BatchPolicy
from zimage_server.runner import ModelRunner, load_runner
from zimage_server.settings import Settings
from zimage_server.specs import CallMode, CallParams, GenerationSpec
from zimage_server.testing import write_tiny_pipeline


# Server processes a test starts from this environment keep their images in a folder of this test
# process's own, not in ./outputs of the checkout (ServerProcess sets one per server itself).
os.environ.setdefault("Z_IMAGE_STORE", tempfile.mkdtemp(prefix="zimage-test-outputs-"))


def assert_each_is_the_diffusers_image(images, pipeline, first_seed: int, prompt: str, **call) -> None:
    """Image i equals, to one 8-bit level, what the plain diffusers `pipeline` gives for seed
    `first_seed + i`: the reference every served image is held to."""
    assert images, "no images to compare"
    for offset, image in enumerate(images):
        generator = torch.Generator("cpu").manual_seed(first_seed + offset)
        expected = pipeline(prompt, generator=generator, **call).images[0]
        assert np.abs(np.asarray(image, np.int16) - np.asarray(expected, np.int16)).max() <= 1


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_pipeline(root / "z-image-turbo", "turbo")
    (root / "loras").mkdir()  # LoRA on: the shared runners carry the slot, as a LoRA-ready server does
    return root


@pytest.fixture(scope="session")
def settings(models_dir: Path) -> Settings:
    # Images are kept in a store of the session's own; tests that count them use one of their own.
    return Settings(models_dir=models_dir, variant="turbo", device="cpu", store=str(models_dir.parent / "outputs"))


@pytest.fixture(scope="session")
def runner(settings: Settings) -> ModelRunner:
    return load_runner(settings)


@contextlib.contextmanager
def serving(settings: Settings, runner: ModelRunner | None = None, **overrides) -> Iterator[TestClient]:
    """A TestClient with the lifespan running, for settings with `overrides` applied."""
    app = create_app(settings.replace(**overrides), runner)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(settings: Settings, runner: ModelRunner) -> Iterator[TestClient]:
    with serving(settings, runner) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS) on loopback for the session; tests use prefixes of their own."""
    from real_servers import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL cluster on loopback for the session; tests create databases of their own."""
    from real_servers import postgres_server

    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def live_server(settings: Settings, runner: ModelRunner | None = None, **overrides) -> Iterator[str]:
    """The app under a real uvicorn server on an ephemeral loopback port; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(settings.replace(**overrides), runner)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def edit_settings(models_dir: Path) -> Settings:
    """The edit variant: a tiny Omni pipeline (with its SigLIP2 image encoder) beside the turbo one."""
    write_tiny_pipeline(models_dir / "z-image-edit", "edit")
    return Settings(models_dir=models_dir, variant="edit", device="cpu", store=str(models_dir.parent / "edit-outputs"))


@pytest.fixture(scope="session")
def edit_runner(edit_settings: Settings) -> ModelRunner:
    return load_runner(edit_settings)


def metric(base: str, name: str) -> float:
    """One sample of a live server's /metrics, by its exact name (labels included)."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def wait_for(condition, timeout: float = 10) -> None:
    """Poll until `condition()` is true, failing the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def make_spec(
    prompt: str,
    seeds: tuple[int, ...] = (0,),
    *,
    mode: CallMode = "generate",
    negative_prompt: str | None = None,
    images: tuple = (),
    mask=None,
    control_image=None,
    observer=None,
    **params,
) -> GenerationSpec:
    """A request as the API would build it: 64x64, 3 steps, no guidance, 64 tokens, unless told otherwise."""
    call = dict(width=64, height=64, num_inference_steps=3, guidance_scale=0.0, max_sequence_length=64) | params
    return GenerationSpec(
        prompt=prompt,
        negative_prompt=negative_prompt,
        seeds=tuple(seeds),
        params=CallParams(mode=mode, **call),
        images=images,
        mask=mask,
        control_image=control_image,
        observer=observer,
    )


def generate(runner: ModelRunner, specs: list[GenerationSpec]) -> list[list]:
    """The images per spec, as the batcher's policy makes them (without its out-of-memory retries)."""
    return BatchPolicy(runner, runner.settings.max_batch_size).run(specs)


class Captured(logging.Handler):
    """Records of one logger, from a handler on that logger itself, whatever the root's handlers
    are (the server's own logging set-up, logs.configure_logging, replaces those)."""

    def __init__(self, name: str):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(name)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> Captured:
        self.logger.addHandler(self)
        self.old_level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.old_level)


def assert_envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def burst_behind_a_blocker(runner: ModelRunner, base: str, path: str, bodies: list[dict]) -> tuple[list, int]:
    """POST each JSON body of `bodies` to `path` in one burst: `burst_of_sends`."""
    import httpx

    return burst_of_sends(runner, base, [functools.partial(httpx.post, base + path, json=b, timeout=60) for b in bodies])


def burst_of_sends(runner: ModelRunner, base: str, sends: list) -> tuple[list, int]:
    """Make the requests `sends` (callables) together while the runner is busy with a blocker of
    another size, so they are all queued when the GPU frees up; their responses, and the pipeline
    calls they took (blocker excluded). Waits on the server's own gauges, never on sleeps."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    blocker_body = {"prompt": "blocker", "size": "128x64", "num_inference_steps": 2}
    calls_before = runner.calls
    with ThreadPoolExecutor(len(sends) + 1) as pool:
        runner.lock.acquire()  # the "GPU" is busy: the worker blocks on the blocker, the burst queues behind it
        try:
            blocker = pool.submit(httpx.post, base + "/v1/images/generations", json=blocker_body, timeout=60)
            wait_for(lambda: metric(base, "zimage_running_images") == 1)
            futures = [pool.submit(send) for send in sends]
            wait_for(lambda: metric(base, "zimage_queue_requests") == len(sends))
        finally:
            runner.lock.release()
        assert blocker.result().status_code == 200
        responses = [future.result() for future in futures]
    return responses, runner.calls - calls_before - 1
