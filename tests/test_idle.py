"""Sleep when idle (Z_IMAGE_IDLE_UNLOAD_S): the model's memory is freed, the next request reloads it,
and the images after a wake are bit-identical to those before, whatever was loaded with it."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from conftest import generate, make_spec, serving, wait_for
from test_controlnet import control_map
from zimage_server.runner import load_runner
from zimage_server.testing import write_tiny_controlnet

URL = "/v1/images/generations"


def same_images(first: list[list[Image.Image]], second: list[list[Image.Image]]) -> bool:
    flat = [np.asarray(image) for images in first for image in images]
    again = [np.asarray(image) for images in second for image in images]
    return len(flat) == len(again) > 0 and all(np.array_equal(a, b) for a, b in zip(flat, again))


@pytest.fixture
def eager_compile(monkeypatch):
    """Compile through dynamo without inductor's C++ build, so the compiled case stays fast on a CPU;
    from a clean dynamo, as in a server process (other tests' compiled runners count towards its limits)."""
    import torch

    from zimage_server import acceleration

    torch._dynamo.reset()
    monkeypatch.setattr(acceleration, "apply_compile", functools.partial(acceleration.apply_compile, backend="eager"))


@pytest.mark.parametrize("case", ["lora", "controlnet", "compiled", "int8"])
def test_images_after_a_wake_are_bit_identical_and_what_was_loaded_comes_back(case, settings, models_dir, request):
    from safetensors.torch import save_file

    from test_loras import LAYOUTS, random_lora

    overrides: dict = {}
    specs = [make_spec("a red chair", (3, 4))]
    if case == "controlnet":
        write_tiny_controlnet(models_dir / "controlnets" / "idle")
        overrides["controlnet"] = Path("idle")
        specs = [make_spec("a red chair", (3,), mode="control", control_scale=0.75, control_image=control_map())]
    elif case == "compiled":
        request.getfixturevalue("eager_compile")
        overrides["compile"] = "regional"
    elif case == "int8":
        overrides["quantize"] = "int8"
    runner = load_runner(settings.replace(**overrides))
    if case == "lora":
        save_file(
            LAYOUTS["diffusers"](random_lora(runner.pipeline.transformer, 3)), models_dir / "loras" / "idle.safetensors"
        )
        specs.append(make_spec("a red chair", (5,), loras=(("idle", 0.8),)))
    before = [generate(runner, [spec]) for spec in specs]

    # Compiled code is guarded on the modules it traced; those die with a sleep, so wakes must not pile
    # up recompiles towards dynamo's limit (fullgraph fails a call past it).
    cycles = 3 if case == "compiled" else 1
    for _ in range(cycles):
        runner.sleep()
        assert not runner.resident and runner.pipeline is None and runner.mode_pipelines == {}
        runner.sleep()  # a second sleep is a no-op
        after = [generate(runner, [spec]) for spec in specs]
    assert runner.resident and runner.wakes == cycles and runner.last_wake_s > 0
    assert all(same_images(b, a) for b, a in zip(before, after, strict=True))
    if case == "lora":
        assert runner.lora_slot is not None and not same_images(before[0], before[1])
    elif case == "controlnet":
        assert runner.controlnet is not None and runner.has_controlnet
    elif case == "compiled":
        assert runner.acceleration.compile == "regional"
        assert runner.pipeline.transformer.layers[0]._compiled_call_impl is not None  # the blocks compiled again
    else:
        assert type(runner.pipeline.transformer.layers[0].attention.to_q.weight).__name__ == "Int8Tensor"


def scrape(client, name: str) -> float:
    text = client.get("/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def test_an_idle_server_unloads_stays_ready_and_the_next_request_wakes_it(settings):
    body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 9}
    with serving(settings, idle_unload_s=0.3) as client:  # loads its own runner
        first = client.post(URL, json=body)
        assert first.status_code == 200
        assert scrape(client, "zimage_model_resident") == 1
        wait_for(lambda: scrape(client, "zimage_model_resident") == 0, timeout=10)
        assert client.get("/ready").status_code == 200  # it can serve, just slower once
        again = client.post(URL, json=body)
        assert again.status_code == 200
        assert again.json()["data"][0]["b64_json"] == first.json()["data"][0]["b64_json"]
        assert scrape(client, "zimage_model_wakes") == 1 and scrape(client, "zimage_model_last_wake_seconds") > 0


def test_without_the_setting_the_model_never_sleeps(client):
    client.post(URL, json={"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 1})
    time.sleep(0.5)
    assert scrape(client, "zimage_model_resident") == 1 and scrape(client, "zimage_model_wakes") == 0


def write_heavier_pipeline(path: Path) -> int:
    """The tiny pipeline with a wider transformer (about 80 MB of fp32 weights), so freeing it shows in RSS."""
    import diffusers
    import torch

    from zimage_server.testing import MARKER, TINY_TRANSFORMER, build_components

    components = build_components("turbo")
    wide = TINY_TRANSFORMER | {"dim": 768, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [32, 32, 32]}
    torch.manual_seed(0)
    components["transformer"] = diffusers.ZImageTransformer2DModel(**wide)
    components["transformer"].x_pad_token.data.fill_(1.0)
    components["transformer"].cap_pad_token.data.fill_(1.0)
    diffusers.ZImagePipeline(**components).save_pretrained(path, safe_serialization=True)
    (path / MARKER).write_text("{}\n")
    return sum(p.numel() * p.element_size() for p in components["transformer"].parameters())


def test_on_a_cpu_sleeping_gives_the_host_memory_back(tmp_path):
    from zimage_server.settings import Settings

    weight_bytes = write_heavier_pipeline(tmp_path / "z-image-turbo")
    assert weight_bytes > 60 * 2**20
    runner = load_runner(Settings(models_dir=tmp_path, variant="turbo", device="cpu"))
    spec = make_spec("a red chair", (2,))
    before = generate(runner, [spec])
    process = psutil.Process()
    loaded = process.memory_info().rss
    runner.sleep()
    asleep = process.memory_info().rss
    assert loaded - asleep > 0.8 * weight_bytes, (loaded, asleep, weight_bytes)
    assert same_images(before, generate(runner, [spec]))


def test_a_model_that_cannot_be_reloaded_fails_its_batch_with_model_unavailable_and_recovers(tmp_path):
    """A wake that fails is no request's fault: one ModelUnavailable per request (a 503), no
    per-request retries, and the next batch tries again."""
    import shutil

    from zimage_server.policy import BatchPolicy
    from zimage_server.settings import Settings
    from zimage_server.specs import ModelUnavailable
    from zimage_server.testing import write_tiny_pipeline

    write_tiny_pipeline(tmp_path / "z-image-turbo")
    runner = load_runner(Settings(models_dir=tmp_path, variant="turbo", device="cpu"))
    specs = [make_spec("a red chair", (1,)), make_spec("a blue chair", (2,))]
    before = generate(runner, specs)
    runner.sleep()
    shutil.move(tmp_path / "z-image-turbo", tmp_path / "elsewhere")
    results = BatchPolicy(runner, 4)(specs)
    assert [type(result) for result in results] == [ModelUnavailable, ModelUnavailable] and not runner.resident
    shutil.move(tmp_path / "elsewhere", tmp_path / "z-image-turbo")
    after = BatchPolicy(runner, 4)(specs)
    assert runner.resident and runner.wakes == 1 and same_images(before, after)
