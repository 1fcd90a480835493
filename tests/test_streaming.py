"""`stream: true`: server-sent events through TestClient, raw httpx against a live server, and the openai SDK."""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import burst_of_sends, live_server, metric, serving, wait_for
from zimage_server.api.jobs import partial_image_steps
from zimage_server.runner import ModelRunner, latent_previews
from zimage_server.specs import GenerationCancelled

URL = "/v1/images/generations"


def parse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.strip().split("\n\n"):
        if block.startswith(":"):
            continue  # a comment: keep-alive
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))), dtype=np.int16)


def of_type(events: list[tuple[str, dict]], name: str) -> list[dict]:
    return [data for event, data in events if event == name]


def test_stream_sends_progress_every_step_previews_and_one_completed_event_per_image(client):
    request = {"prompt": "a red chair", "size": "128x64", "n": 2, "seed": 10, "num_inference_steps": 6}
    response = client.post(URL, json={**request, "stream": True, "partial_images": 2})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    assert all(data["type"] == event for event, data in events)

    progress = of_type(events, "image_generation.progress")
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5, 6] and {p["total"] for p in progress} == {6}
    assert progress[-1]["progress"] == 1.0 and all(p["image_indices"] == [0, 1] for p in progress)

    partials = of_type(events, "image_generation.partial_image")
    assert [(p["index"], p["partial_image_index"]) for p in partials] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    for partial in partials:
        assert partial["size"] == "128x64" and partial["output_format"] == "png"
        assert Image.open(io.BytesIO(base64.b64decode(partial["b64_json"]))).size == (128, 64)

    completed = of_type(events, "image_generation.completed")
    assert events[-2:] == [("image_generation.completed", data) for data in completed]
    assert [c["index"] for c in completed] == [0, 1] and [c["seed"] for c in completed] == [10, 11]
    assert all(c["size"] == "128x64" and c["output_format"] == "png" for c in completed)
    # The streamed images are the images a plain request returns.
    plain = client.post(URL, json=request).json()["data"]
    for streamed, item in zip(completed, plain):
        assert np.array_equal(pixels(streamed["b64_json"]), pixels(item["b64_json"]))


def test_partial_images_are_spread_over_the_steps_and_never_the_last():
    assert partial_image_steps(8, 3) == {2, 4, 6}
    assert partial_image_steps(8, 1) == {4}
    assert partial_image_steps(8, 0) == set()
    assert partial_image_steps(2, 3) == {1}
    assert partial_image_steps(1, 3) == set()


def test_latent_previews_are_a_fixed_projection_at_latent_size():
    latents = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    first, second = latent_previews(latents)
    assert first.size == (12, 8) and first.mode == "RGB"
    assert np.array_equal(np.asarray(latent_previews(latents)[0]), np.asarray(first))
    assert not np.array_equal(np.asarray(first), np.asarray(second))
    # Zero latents land near mid-grey (the bias only nudges it).
    flat = np.asarray(latent_previews(torch.zeros(1, 16, 2, 2))[0])
    assert flat.min() >= 110 and flat.max() <= 130


def test_a_request_bigger_than_one_call_reports_progress_across_its_passes(settings, runner):
    one_per_call = settings.replace(max_batch_size=1)
    small_runner = ModelRunner(runner.pipeline, one_per_call, runner.device, runner.dtype)
    with serving(one_per_call, small_runner) as small_batches:
        response = small_batches.post(
            URL,
            json={"prompt": "a", "size": "64x64", "n": 2, "num_inference_steps": 2, "stream": True,
                  "partial_images": 1},
        )
    events = parse_events(response.text)
    progress = of_type(events, "image_generation.progress")
    assert [p["image_indices"] for p in progress] == [[0], [0], [1], [1]]
    assert [p["progress"] for p in progress] == [0.25, 0.5, 0.75, 1.0]
    partials = of_type(events, "image_generation.partial_image")
    assert [(p["index"], p["partial_image_index"]) for p in partials] == [(0, 0), (1, 0)]
    assert len(of_type(events, "image_generation.completed")) == 2


@pytest.mark.parametrize(
    "payload, param",
    [({"size": "100x100"}, "size"), ({"partial_images": 4}, "partial_images"), ({"n": 9}, "n")],
)
def test_invalid_streaming_requests_are_plain_http_errors(client, payload, param):
    response = client.post(URL, json={"prompt": "a", "stream": True, **payload})
    assert response.status_code == 400 and response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["param"] == param


def test_a_queued_stream_sends_keep_alive_comments_then_its_events(client, runner, monkeypatch):
    monkeypatch.setattr("zimage_server.api.jobs.KEEP_ALIVE_S", 0.05)
    runner.lock.acquire()  # the GPU is busy for a while: the job waits
    threading.Timer(0.4, runner.lock.release).start()
    response = client.post(URL, json={"prompt": "a", "size": "64x64", "stream": True})
    assert response.text.startswith(": keep-alive\n\n")
    assert [event for event, _ in parse_events(response.text)][-1] == "image_generation.completed"


def test_a_stream_that_waits_past_its_timeout_ends_with_a_timeout_error_event(settings, runner):
    with serving(settings, runner, request_timeout_s=0.3) as client:
        runner.lock.acquire()
        try:
            response = client.post(URL, json={"prompt": "a", "size": "64x64", "stream": True})
        finally:
            runner.lock.release()
        assert client.post(URL, json={"prompt": "a", "size": "64x64", "stream": True}).status_code == 200
    (event, data), = parse_events(response.text)
    assert event == "error" and data["error"]["code"] == "timeout" and data["error"]["type"] == "server_error"


class FailingRunner(ModelRunner):
    """The real runner, with a device error injected into every call."""

    def run_call(self, params, rows):
        raise RuntimeError("CUDA error: an illegal memory access at 0xdeadbeef")


def test_a_failure_mid_stream_is_one_error_event_in_the_openai_envelope(settings, runner):
    failing = FailingRunner(runner.pipeline, settings, runner.device, runner.dtype)
    with serving(settings, failing) as client:
        response = client.post(URL, json={"prompt": "a", "size": "64x64", "stream": True})
        assert client.get("/ready").status_code == 200
    assert response.status_code == 200
    (event, data), = parse_events(response.text)
    assert event == "error" and data["type"] == "error"
    assert set(data["error"]) == {"message", "type", "param", "code"}
    assert data["error"]["type"] == "server_error" and "0xdeadbeef" not in response.text


def test_openai_sdk_streams_partial_and_completed_images(settings, runner):
    from openai import APIError, OpenAI

    with live_server(settings, runner) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        stream = sdk.images.generate(
            prompt="a lighthouse", size="64x64", n=2, stream=True, partial_images=1,
            extra_body={"seed": 3, "num_inference_steps": 4},
        )
        events = list(stream)
    completed = [event for event in events if event.type == "image_generation.completed"]
    partials = [event for event in events if event.type == "image_generation.partial_image"]
    assert len(completed) == 2 and len(partials) == 2
    assert all(event.size == "64x64" and event.output_format == "png" for event in completed)
    assert pixels(completed[0].b64_json).shape == (64, 64, 3)
    assert [event.partial_image_index for event in partials] == [0, 0]

    failing = FailingRunner(runner.pipeline, settings, runner.device, runner.dtype)
    with live_server(settings, failing) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(APIError, match="Image generation failed"):
            list(sdk.images.generate(prompt="a", size="64x64", stream=True))


class RecordingRunner(ModelRunner):
    """The real runner, remembering each call that stopped because every client left."""

    def __init__(self, *args):
        super().__init__(*args)
        self.cancellations: list[str] = []

    def run_call(self, params, rows):
        try:
            return super().run_call(params, rows)
        except GenerationCancelled as exc:
            self.cancellations.append(str(exc))
            raise


def test_a_streaming_client_that_leaves_stops_its_running_call(settings, runner):
    recording = RecordingRunner(runner.pipeline, settings, runner.device, runner.dtype)
    request = {"prompt": "long", "size": "256x256", "num_inference_steps": 200, "stream": True}
    with live_server(settings, recording) as base:
        with httpx.stream("POST", base + URL, json=request, timeout=30) as response:
            first = next(line for line in response.iter_lines() if line.startswith("data:"))
        assert json.loads(first.removeprefix("data: "))["step"] == 1
        wait_for(lambda: recording.cancellations)
        stopped_after = int(recording.cancellations[0].split("step ")[1].split(":")[0])
        assert stopped_after < 50, recording.cancellations
        assert httpx.post(base + URL, json={"prompt": "next", "size": "64x64"}, timeout=30).status_code == 200


def test_a_streaming_client_that_leaves_while_queued_is_dropped_not_computed(settings, runner):
    request = {"prompt": "impatient", "size": "64x64", "stream": True}
    with live_server(settings, runner) as base, ThreadPoolExecutor(1) as pool:
        calls_before = runner.calls
        runner.lock.acquire()  # the GPU is busy: the worker blocks on the blocker, the stream queues behind it
        try:
            blocker = pool.submit(httpx.post, base + URL, json={"prompt": "blocker", "size": "64x64"}, timeout=30)
            wait_for(lambda: metric(base, "zimage_running_images") == 1)
            with httpx.stream("POST", base + URL, json=request, timeout=30) as response:
                assert response.status_code == 200
            # The server noticed the hang-up: the queue no longer counts the job.
            wait_for(lambda: metric(base, "zimage_queue_requests") == 0)
        finally:
            runner.lock.release()
        assert blocker.result().status_code == 200
        wait_for(lambda: metric(base, "zimage_requests_dropped") == 1)  # the worker took it off, unrun
    assert runner.calls == calls_before + 1  # only the blocker ran


def test_queue_full_is_a_plain_429_before_any_event(settings, runner):
    with live_server(settings, runner, max_queue=1) as base, ThreadPoolExecutor(2) as pool:
        runner.lock.acquire()
        try:
            running = pool.submit(httpx.post, base + URL, json={"prompt": "running", "size": "64x64"}, timeout=30)
            wait_for(lambda: metric(base, "zimage_running_images") == 1)
            queued = pool.submit(httpx.post, base + URL, json={"prompt": "queued", "size": "64x64"}, timeout=30)
            wait_for(lambda: metric(base, "zimage_queue_requests") == 1)
            refused = httpx.post(base + URL, json={"prompt": "refused", "size": "64x64", "stream": True}, timeout=30)
        finally:
            runner.lock.release()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert running.result().status_code == 200 and queued.result().status_code == 200


def test_concurrent_streams_share_one_call_and_each_gets_its_own_events(settings, runner):
    prompts = ["a cat", "a watercolor of mountains"]
    with live_server(settings, runner) as base:
        sends = [
            functools.partial(
                httpx.post, base + URL, timeout=30,
                json={"prompt": prompt, "size": "64x64", "seed": i, "stream": True, "partial_images": 1},
            )
            for i, prompt in enumerate(prompts)
        ]
        responses, calls = burst_of_sends(runner, base, sends)
        results = [parse_events(response.text) for response in responses]
        solo = [
            httpx.post(base + URL, json={"prompt": prompt, "size": "64x64", "seed": i}, timeout=30).json()
            for i, prompt in enumerate(prompts)
        ]
    assert calls == 1  # both streams in one call
    for events, plain in zip(results, solo, strict=True):
        (completed,) = of_type(events, "image_generation.completed")
        assert len(of_type(events, "image_generation.partial_image")) == 1
        assert np.abs(pixels(completed["b64_json"]) - pixels(plain["data"][0]["b64_json"])).max() <= 1


needs_edits = pytest.mark.skipif(
    importlib.util.find_spec("zimage_server.api.edits") is None,
    reason="POST /v1/images/edits has not landed on this branch yet (issue 3)",
)


def png_bytes(size: tuple[int, int], mode: str = "RGB", color=(40, 90, 200)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


@needs_edits
def test_edits_stream_image_edit_events_with_a_mask(client):
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent: the area to edit
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    response = client.post(
        "/v1/images/edits",
        files={
            "image": ("photo.png", png_bytes((64, 64)), "image/png"),
            "mask": ("mask.png", buffer.getvalue(), "image/png"),
        },
        data={"prompt": "make it stormy", "n": "2", "seed": "4", "num_inference_steps": "4", "stream": "true",
              "partial_images": "1"},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_events(response.text)
    assert {event.split(".")[0] for event, _ in events} == {"image_edit"}
    progress = of_type(events, "image_edit.progress")
    assert [p["step"] for p in progress] == list(range(1, progress[-1]["total"] + 1))
    assert progress[-1]["progress"] == 1.0
    assert [p["index"] for p in of_type(events, "image_edit.partial_image")] == [0, 1]
    completed = of_type(events, "image_edit.completed")
    assert [c["seed"] for c in completed] == [4, 5] and all(c["size"] == "64x64" for c in completed)


@needs_edits
def test_openai_sdk_streams_edits(settings, runner):
    from openai import OpenAI

    with live_server(settings, runner) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        stream = sdk.images.edit(
            image=("photo.png", png_bytes((96, 64)), "image/png"),
            prompt="make it stormy",
            stream=True,
            partial_images=2,
            extra_body={"seed": 7, "num_inference_steps": 6, "strength": 0.5},
        )
        events = list(stream)
    partials = [event for event in events if event.type == "image_edit.partial_image"]
    (completed,) = [event for event in events if event.type == "image_edit.completed"]
    assert [event.partial_image_index for event in partials] == [0, 1]
    assert completed.size == "96x64" and pixels(completed.b64_json).shape == (64, 96, 3)
