"""Image edits: the edit pipelines on the tiny models, and POST /v1/images/edits.

Random VAE weights do not reproduce pixels, so what survives of the input is measured in latent
space: against the input encoded by the pipeline's own VAE with the request's seed.
"""

from __future__ import annotations

import functools
import io
import logging
import socket
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from test_api import assert_error, decode
from conftest import assert_each_is_the_diffusers_image, burst_of_sends, generate, live_server, make_spec, serving
from test_images import encoded, gif_bomb, left_half_mask, picture, png_claiming
from test_runner import pixels, spec
from zimage_server.images import edit_area
from zimage_server.specs import GenerationSpec

URL = "/v1/images/edits"


# --- the edit pipelines on the tiny models ---------------------------------------------------------


class LastLatents:
    """A step observer that keeps the step count and this request's latents after the last step."""

    cancelled = False

    def __init__(self) -> None:
        self.total = 0
        self.latents: torch.Tensor | None = None

    def wants_previews(self, step, total) -> bool:
        return False

    def on_step(self, step, total, latents, previews) -> None:
        self.total, self.latents = total, latents.clone()


def edit_spec(
    prompt: str, image: Image.Image, seeds=(0,), mask=None, strength=0.6, images=None, mode=None, **overrides
) -> GenerationSpec:
    """An img2img (inpaint with a mask) request at the image's size, 4 steps; Omni with strength None."""
    if mode is None:
        mode = "omni" if strength is None else "inpaint" if mask is not None else "img2img"
    params = dict(width=image.width, height=image.height, num_inference_steps=4, strength=strength) | overrides
    return make_spec(prompt, seeds, mode=mode, images=images or (image,), mask=mask, **params)


def input_latents(runner, image: Image.Image, seed: int) -> torch.Tensor:
    """The input as the edit pipelines encode it: VAE latents sampled with the request's own generator."""
    pipeline = runner.mode_pipelines["img2img"]
    tensor = pipeline.image_processor.preprocess(image).to(runner.dtype)
    with torch.no_grad():
        latents = pipeline.vae.encode(tensor).latent_dist.sample(generator=torch.Generator("cpu").manual_seed(seed))
    return (latents - pipeline.vae.config.shift_factor) * pipeline.vae.config.scaling_factor


def final_latents(runner, image: Image.Image, strength: float) -> tuple[int, torch.Tensor]:
    observer = LastLatents()
    generate(runner, [edit_spec("a cat", image, (3,), strength=strength, observer=observer, num_inference_steps=8)])
    return observer.total, observer.latents


def test_strength_sets_how_much_of_the_input_survives(runner):
    image = picture()
    start = input_latents(runner, image, seed=3)
    steps, finals = zip(*(final_latents(runner, image, strength) for strength in (0.25, 0.5, 1.0)))
    assert steps == (2, 4, 8)  # strength s re-noises the input to s and denoises only from there
    distances = [float((final - start).abs().mean()) for final in finals]
    assert distances[0] < distances[1] < distances[2]
    # At 1.0 the input is pure noise: nothing of it survives, so another input gives the same result.
    assert torch.allclose(final_latents(runner, picture(seed=9), 1.0)[1], finals[2], atol=1e-5)


def test_inpainting_keeps_the_input_outside_the_mask(runner):
    image = picture(seed=1)
    mask = edit_area(left_half_mask())
    observer = LastLatents()
    generate(runner, [edit_spec("a dog", image, seeds=(5,), mask=mask, strength=1.0, observer=observer)])
    start = input_latents(runner, image, seed=5)[0]
    final = observer.latents[0]
    # 64 pixels are 8 latent columns: the left 4 were repainted, the right 4 are the input's.
    assert torch.allclose(final[:, :, 4:], start[:, :, 4:], atol=1e-5)
    assert (final[:, :, :4] - start[:, :, :4]).abs().mean() > 0.1


def test_an_edit_is_what_diffusers_returns_for_the_same_seed(runner, settings):
    from diffusers import ZImageImg2ImgPipeline

    direct = ZImageImg2ImgPipeline.from_pretrained(settings.model_dir)
    direct.set_progress_bar_config(disable=True)
    image = picture(seed=2)
    [images] = generate(runner, [edit_spec("a red chair", image, seeds=(41, 42), strength=0.5, num_inference_steps=4)])
    call = dict(image=image, strength=0.5, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=64)
    assert_each_is_the_diffusers_image(images, direct, 41, "a red chair", **call)


@pytest.mark.parametrize("with_mask", [False, True])
def test_an_edit_is_the_same_alone_and_inside_a_batch(runner, with_mask):
    mask = edit_area(left_half_mask()) if with_mask else None
    strength = 1.0 if with_mask else 0.6
    mine = edit_spec("a cat on a chair", picture(seed=1), seeds=(7,), mask=mask, strength=strength)
    [[alone]] = generate(runner, [mine])
    others_mask = edit_area(left_half_mask().transpose(Image.Transpose.FLIP_LEFT_RIGHT)) if with_mask else None
    other = edit_spec("a longer prompt about mountains", picture(seed=8), (100, 101), mask=others_mask, strength=strength)
    batched = generate(runner, [other, mine])
    assert np.abs(pixels(batched[1][0]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(batched[0][0]) - pixels(alone)).max() > 10


def test_edits_leave_text_to_image_and_the_dtype_untouched(runner):
    [[before]] = generate(runner, [spec("a lamp", (9,))])
    generate(runner, [edit_spec("a lamp", picture(), strength=0.3)])  # moves the shared scheduler's begin index
    [[after]] = generate(runner, [spec("a lamp", (9,))])
    assert np.array_equal(pixels(before), pixels(after))
    assert runner.mode_pipelines["img2img"].transformer is runner.pipeline.transformer


def test_bf16_edit_pipelines_share_the_modules_in_bf16(settings):
    from zimage_server.runner import load_runner

    bf16 = load_runner(settings.replace(dtype="bf16"))
    for pipeline in (bf16.pipeline, bf16.mode_pipelines["img2img"], bf16.mode_pipelines["inpaint"]):
        assert pipeline.transformer.dtype == torch.bfloat16 and pipeline.vae.dtype == torch.bfloat16
        assert pipeline.text_encoder.dtype == torch.bfloat16 and pipeline.transformer is bf16.pipeline.transformer


def test_omni_edits_with_one_or_several_references(edit_runner):
    first, second = picture(seed=1), picture(96, 64, seed=2)
    common = dict(num_inference_steps=2, guidance_scale=2.0, strength=None, width=64, height=64)
    [[one]] = generate(edit_runner, [edit_spec("make it blue", first, **common)])
    [[two]] = generate(edit_runner, [edit_spec("make it blue", first, images=(first, second), **common)])
    [[other]] = generate(edit_runner, [edit_spec("make it blue", picture(seed=3), **common)])
    assert one.size == two.size == (64, 64)
    assert np.abs(pixels(one) - pixels(two)).max() > 0 and np.abs(pixels(one) - pixels(other)).max() > 0


# --- the HTTP endpoint ------------------------------------------------------------------------------


def form(image: bytes | None = None, mask: bytes | None = None, **fields) -> dict:
    """httpx multipart arguments, shaped as curl -F sends them."""
    files = []
    if image is not None:
        files.append(("image", ("image.png", image, "image/png")))
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    data = {"prompt": "a cat", "num_inference_steps": "2"} | {key: str(value) for key, value in fields.items()}
    if not files:  # without a file httpx would send the fields urlencoded; text parts keep it multipart
        return {"files": [(key, (None, value)) for key, value in data.items()]}
    return {"files": files, "data": data}


def test_curl_style_edit_returns_the_openai_shape(client):
    response = client.post(
        URL, **form(encoded(picture(100, 70)), n=2, seed=10, cfg_normalization="false", size="", quality="high")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "96x64" and body["output_format"] == "png"  # the input's size, snapped to 16
    assert [item["seed"] for item in body["data"]] == [10, 11]
    images = [decode(item["b64_json"]) for item in body["data"]]
    assert all(image.size == (96, 64) for image in images)
    parameters = images[0].text["parameters"]
    assert parameters.startswith("a cat\n") and "Seed: 10" in parameters and "Denoising strength: 0.6" in parameters
    assert URL in client.get("/schema/openapi.json").json()["paths"]


def test_edit_with_mask_size_and_raw_image_response(client):
    response = client.post(
        URL,
        **form(encoded(picture()), encoded(left_half_mask()), size="128x64", seed=1),
        headers={"Accept": "image/webp"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/webp" and response.headers["x-seed"] == "1"
    assert Image.open(io.BytesIO(response.content)).size == (128, 64)


def bad_requests() -> list:
    good = encoded(picture())
    two_prompts = {"files": [("image", ("a.png", good, "image/png"))], "data": {"prompt": ["a", "b"]}}
    two_images = {"files": [("image[]", ("a.png", good, "image/png"))] * 2, "data": {"prompt": "a"}}
    return [
        ("no image", form(), 400, "image"),
        ("image as text", {"files": [("prompt", (None, "a")), ("image", (None, "cat.png"))]}, 400, "image"),
        ("no prompt", {"files": [("image", ("a.png", good, "image/png"))]}, 400, "prompt"),
        ("empty prompt", form(good, prompt="  "), 400, "prompt"),
        ("zero bytes", form(b""), 400, "image"),
        ("text file", form(b"hello, I am text"), 415, "image"),
        ("gif bomb", form(gif_bomb()), 415, "image"),
        ("truncated png", form(encoded(picture(256, 256))[:400]), 400, "image"),
        ("huge claim", form(png_claiming(50_000, 50_000)), 400, "image"),
        ("mask of another size", form(good, encoded(left_half_mask(32, 32))), 400, "mask"),
        ("mask that marks nothing", form(good, encoded(Image.new("RGBA", (64, 64), (0, 0, 0, 255)))), 400, "mask"),
        ("broken mask", form(good, b"not a png"), 415, "mask"),
        ("n not a number", form(good, n="two"), 400, "n"),
        ("n too big", form(good, n=9), 400, "n"),
        ("strength zero", form(good, strength=0), 400, "strength"),
        ("strength above one", form(good, strength="1.5"), 400, "strength"),
        ("strength not a number", form(good, strength="strong"), 400, "strength"),
        ("boolean not a boolean", form(good, cfg_normalization="maybe"), 400, "cfg_normalization"),
        ("bad size", form(good, size="100x100"), 400, "size"),
        ("field twice", two_prompts, 400, "prompt"),
        ("two images on turbo", two_images, 400, "image"),
    ]


@pytest.mark.parametrize("name, request_args, status, param", bad_requests(), ids=[case[0] for case in bad_requests()])
def test_bad_edits_get_a_4xx_envelope_and_the_server_stays_ready(client, name, request_args, status, param):
    assert_error(client.post(URL, **request_args), status, param)
    assert client.get("/ready").status_code == 200
    assert client.post(URL, **form(encoded(picture()), size="64x64")).status_code == 200


def test_bad_bodies_and_the_server_still_edits_afterwards(client):
    assert_error(client.post(URL, json={"prompt": "a", "image": "x"}), 415)
    garbage = b"--xyz\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nno end"
    response = client.post(URL, content=garbage, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(response, 400)
    assert_error(client.post(URL, content=b"", headers={"content-type": "multipart/form-data"}), 400)
    # What curl -F image=<photo.png sends: the bytes as a text field.
    as_text_field = client.post(URL, files={"prompt": (None, "a"), "image": (None, encoded(picture()))})
    assert "file part" in assert_error(as_text_field, 400)["message"]
    assert client.post(URL, **form(encoded(picture()))).status_code == 200


def test_uploads_over_the_limit_get_413(settings, runner):
    big = encoded(picture(512, 512, seed=4))
    assert len(big) > 32 * 1024 > len(encoded(picture(64, 64))) + 1024
    with serving(settings, runner, max_upload_bytes=32 * 1024) as small:
        error = assert_error(small.post(URL, **form(big)), 413)
        assert "Z_IMAGE_MAX_UPLOAD_BYTES" in error["message"]
        assert small.get("/ready").status_code == 200
        assert small.post(URL, **form(encoded(picture(64, 64)))).status_code == 200
    # The limit belongs to that app alone: a server with the default limit takes the same upload.
    with serving(settings, runner) as default:
        assert default.post(URL, **form(big, size="64x64")).status_code == 200


def test_the_upload_limit_is_enforced_while_the_body_streams(settings, runner):
    """A chunked upload with no Content-Length is cut off with 413 once it passes the limit.

    The body never ends (no final zero-size chunk is sent), so any answer at all shows that the
    server refused it while reading, not after buffering a whole body."""
    limit, chunk = 64 * 1024, 16 * 1024
    with live_server(settings, runner, max_upload_bytes=limit) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(
                f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            sent, answer = 0, b""
            connection.settimeout(0.05)
            while sent < 20 * limit and not answer:
                try:
                    connection.sendall(f"{chunk:x}\r\n".encode() + b"x" * chunk + b"\r\n")
                    sent += chunk
                    answer = connection.recv(4096)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            connection.settimeout(5)
            answer = answer or connection.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert httpx.get(base + "/ready").status_code == 200


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_client_that_hangs_up_mid_upload_is_not_an_error(settings, runner):
    # On the package logger itself: Litestar's logging set-up replaces the root handlers pytest's caplog uses.
    errors = Recorder()
    logging.getLogger("zimage_server").addHandler(errors)
    try:
        hang_up_mid_upload(settings, runner)
    finally:
        logging.getLogger("zimage_server").removeHandler(errors)
    assert not errors.records, [record.getMessage() for record in errors.records]


def hang_up_mid_upload(settings, runner) -> None:
    with live_server(settings, runner) as base:
        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(
                f"POST {URL} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n".encode()
            )
            time.sleep(0.3)
        time.sleep(0.3)
        assert httpx.get(base + "/ready").status_code == 200


def test_concurrent_edits_share_one_pipeline_call_with_their_own_images(settings, runner):
    inputs = [encoded(picture(seed=index)) for index in range(3)]

    def post(index: int) -> httpx.Response:
        return httpx.post(base + URL, **form(inputs[index], prompt=f"prompt {index}", seed=index), timeout=60)

    with live_server(settings, runner) as base:
        solo = [pixels(decode(post(index).json()["data"][0]["b64_json"])) for index in range(3)]
        responses, calls = burst_of_sends(runner, base, [functools.partial(post, index) for index in range(3)])
    assert calls == 1  # one call for all three
    for index, response in enumerate(responses):
        assert np.abs(pixels(decode(response.json()["data"][0]["b64_json"])) - solo[index]).max() <= 1


def test_openai_sdk_edits_with_and_without_mask(settings, runner):
    from openai import OpenAI

    with live_server(settings, runner) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        plain = sdk.images.edit(
            image=("photo.png", encoded(picture(80, 64)), "image/png"),
            prompt="a lighthouse",
            n=2,
            extra_body={"seed": 3, "num_inference_steps": 2, "strength": 0.5, "cfg_normalization": False},
        )
        masked = sdk.images.edit(
            image=("photo.png", encoded(picture()), "image/png"),
            mask=("mask.png", encoded(left_half_mask()), "image/png"),
            prompt="a lighthouse",
            size="64x64",
            output_format="jpeg",
            extra_body={"num_inference_steps": 2},
        )
        listed = sdk.images.edit(  # a list goes out as repeated image[] parts
            image=[("photo.png", encoded(picture()), "image/png")],
            prompt="a lighthouse",
            extra_body={"num_inference_steps": 2},
        )
    assert len(plain.data) == 2 and decode(plain.data[0].b64_json).size == (80, 64)
    assert "Denoising strength: 0.5" in decode(plain.data[0].b64_json).text["parameters"]
    assert decode(masked.data[0].b64_json).format == "JPEG"
    assert decode(listed.data[0].b64_json).size == (64, 64)


def test_edit_variant_edits_several_images_and_still_generates(edit_settings, edit_runner):
    from openai import BadRequestError, OpenAI

    with live_server(edit_settings, edit_runner) as base:
        sdk = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        edited = sdk.images.edit(
            image=[
                ("a.png", encoded(picture()), "image/png"),
                ("b.webp", encoded(picture(96, 64, 1), "WEBP"), "image/webp"),
            ],
            prompt="put the cat in the second picture",
            extra_body={"num_inference_steps": 2},
        )
        generated = sdk.images.generate(prompt="a cat", size="64x64", extra_body={"num_inference_steps": 2})
        with pytest.raises(BadRequestError, match="mask"):
            sdk.images.edit(
                image=("a.png", encoded(picture()), "image/png"),
                mask=("m.png", encoded(left_half_mask()), "image/png"),
                prompt="a cat",
            )
    image = decode(edited.data[0].b64_json)
    assert image.size == (64, 64) and "Model: z-image-edit" in image.text["parameters"]
    assert decode(generated.data[0].b64_json).size == (64, 64)
