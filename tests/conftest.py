"""Shared fixtures: one tiny, real, random-weight Z-Image pipeline, written once and loaded by the real loader."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient

from zimage_server.api import create_app
from zimage_server.pipelines import ZImageEngine, load_engine
from zimage_server.settings import Settings
from zimage_server.testing import write_tiny_pipeline


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_tiny_pipeline(root / "z-image-turbo", "turbo")
    return root


@pytest.fixture(scope="session")
def settings(models_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, variant="turbo", device="cpu")


@pytest.fixture(scope="session")
def engine(settings: Settings) -> ZImageEngine:
    return load_engine(settings)


@contextlib.contextmanager
def serving(settings: Settings, engine: ZImageEngine | None = None, **overrides) -> Iterator[TestClient]:
    """A TestClient with the lifespan running, for settings with `overrides` applied."""
    app = create_app(settings.replace(**overrides), engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def client(settings: Settings, engine: ZImageEngine) -> Iterator[TestClient]:
    with serving(settings, engine) as test_client:
        yield test_client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.contextmanager
def live_server(settings: Settings, engine: ZImageEngine | None = None, **overrides) -> Iterator[str]:
    """The app under a real uvicorn server on an ephemeral loopback port; yields its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(settings.replace(**overrides), engine)
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
    return Settings(models_dir=models_dir, variant="edit", device="cpu")


@pytest.fixture(scope="session")
def edit_engine(edit_settings: Settings) -> ZImageEngine:
    return load_engine(edit_settings)


def wait_for(condition, timeout: float = 10) -> None:
    """Poll until `condition()` is true, failing the test after `timeout` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)
