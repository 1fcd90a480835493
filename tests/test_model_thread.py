"""The model's torch work runs on one thread for the life of the process: loading, warm-up, and every
generation, edit, stream (previews included), ControlNet call and conversion of outputs."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import diffusers
import pytest
import torch

from conftest import serving
from test_edits import form
from test_images import encoded, picture
from zimage_server import runner as runner_module
from zimage_server.model_thread import model_thread
from zimage_server.testing import write_tiny_controlnet

URL = "/v1/images/generations"
BASE = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2, "seed": 3, "max_sequence_length": 64}


@pytest.fixture
def torch_work_threads(monkeypatch) -> dict[int, set[str]]:
    """Thread id -> the torch work seen on it: every module's forward anywhere in the process, the
    pipeline loader, latent previews and the conversion of outputs."""
    seen: dict[int, set[str]] = {}

    def record(what: str) -> None:
        seen.setdefault(threading.get_ident(), set()).add(what)

    def recording(name: str, function):
        def wrapper(*args, **kwargs):
            record(name)
            return function(*args, **kwargs)

        return wrapper

    for name in ("latent_previews", "to_images"):
        monkeypatch.setattr(runner_module, name, recording(name, getattr(runner_module, name)))
    load = diffusers.ZImagePipeline.from_pretrained.__func__
    monkeypatch.setattr(diffusers.ZImagePipeline, "from_pretrained", classmethod(recording("from_pretrained", load)))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: record(type(module).__name__))
    yield seen
    hook.remove()


def test_loading_warm_up_and_every_kind_of_request_run_on_the_model_thread(settings, models_dir, torch_work_threads):
    write_tiny_controlnet(models_dir / "controlnets" / "thread-check")
    control = base64.b64encode(encoded(picture(64, 64, seed=1))).decode()
    with serving(settings.replace(controlnet=Path("thread-check"))) as client:  # loads its own runner
        generated = client.post(URL, json=BASE | {"n": 2})
        streamed = client.post(URL, json=BASE | {"stream": True, "partial_images": 1})
        edited = client.post("/v1/images/edits", **form(encoded(picture(64, 64)), seed=4))
        controlled = client.post(URL, json=BASE | {"control_image": control})
        for response in (generated, streamed, edited, controlled):
            assert response.status_code == 200, response.text[:300]
    work = set().union(*torch_work_threads.values())
    # Each kind of work was seen: loading, the models' forwards (the ControlNet's too), previews, outputs.
    expected = {
        "from_pretrained",
        "Qwen3Model",
        "ZImageTransformer2DModel",
        "ZImageControlNetModel",
        "Encoder",
        "Decoder",
    }
    assert expected | {"latent_previews", "to_images"} <= work
    assert set(torch_work_threads) == {model_thread().ident}, {
        ident: sorted(what)[:5] for ident, what in torch_work_threads.items()
    }


def test_work_already_on_the_model_thread_runs_in_place():
    thread = model_thread()
    assert thread.call(lambda: thread.call(threading.get_ident)) == thread.ident
    assert threading.get_ident() != thread.ident
