"""The MCP endpoint through the `mcp` SDK's own client, over real HTTP, against a real server process."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import httpx2
import numpy as np
import pytest
from attack_support import ServerProcess
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from zimage_server.keys import digest

pytestmark = pytest.mark.attack

ALICE, BOB = "alice-secret-1", "bob-secret-22"
GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("mcp")
    keys = root / "keys"
    keys.write_text(f"alice user {ALICE}\nbob user sha256:{digest(BOB)}\n")
    env = {"Z_IMAGE_API_KEYS_FILE": str(keys), "Z_IMAGE_STORE": str(root / "out"), "Z_IMAGE_MAX_JOBS_QUEUED": "12",
           "Z_IMAGE_FAULT_INJECTION": "1"}  # fmt: skip
    process = ServerProcess(models_dir, root / "server.log", env).start()
    try:
        yield process
    finally:
        process.stop()


def call(server: ServerProcess, secret: str, tool: str, arguments: dict, mode: str = "auto"):
    async def run():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=120)
        async with Client(streamable_http_client(server.url + "/mcp", http_client=http), mode=mode) as client:
            return await client.call_tool(tool, arguments)

    return asyncio.run(run())


def tools(server: ServerProcess, mode: str) -> dict:
    async def run():
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
        async with Client(streamable_http_client(server.url + "/mcp", http_client=http), mode=mode) as client:
            return {tool.name: tool for tool in (await client.list_tools()).tools}

    return asyncio.run(run())


def pixels(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_both_protocol_eras_list_the_tools_with_their_schemas(server, mode):
    found = tools(server, mode)
    assert set(found) == {"generate_image", "edit_image", "enhance_prompt", "list_images", "get_job", "list_loras"}
    schema = found["generate_image"].input_schema
    assert schema["required"] == ["prompt"] and "description" in schema["properties"]["size"]
    assert schema["properties"]["n"]["minimum"] == 1 and found["generate_image"].description


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_generate_image_gives_the_http_apis_image_for_the_seed(server, mode):
    result = call(server, ALICE, "generate_image", {"prompt": "a red barn", "size": "64x64", "steps": 2, "seed": 21}, mode)
    assert not result.is_error, result.content
    [image] = result.structured_content["images"]
    assert image["seed"] == 21 and (image["width"], image["height"]) == (64, 64)
    kinds = [content.type for content in result.content]
    assert kinds == ["text", "resource_link", "image"]
    link = result.content[1]
    from_link = httpx.get(str(link.uri)).content  # a signed link: no key needed
    body = {"prompt": "a red barn", "size": "64x64", "num_inference_steps": 2, "seed": 21}
    http = httpx.post(server.url + GEN, json=body, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60).json()
    assert np.array_equal(pixels(from_link), pixels(base64.b64decode(http["data"][0]["b64_json"])))
    assert Image.open(io.BytesIO(base64.b64decode(result.content[2].data))).format == "JPEG"
    # Made through MCP, owned by the key: listed for alice, invisible to bob.
    mine = [i["id"] for i in httpx.get(server.url + "/v1/images", headers={"Authorization": f"Bearer {ALICE}"}).json()["data"]]
    assert image["id"] in mine
    assert httpx.get(f"{server.url}/v1/images/{image['id']}", headers={"Authorization": f"Bearer {BOB}"}).status_code == 404


def test_generate_image_with_a_hires_fix_and_seeded_variety_equals_the_http_api(server):
    arguments = {"prompt": "a windmill", "size": "64x64", "steps": 2, "seed": 9, "variation_strength": 0.2,
                 "hires": {"scale": 1.5, "upscaler": "Latent", "steps": 2}}  # fmt: skip
    result = call(server, ALICE, "generate_image", arguments)
    assert not result.is_error, result.content
    [image] = result.structured_content["images"]
    assert (image["width"], image["height"]) == (96, 96)
    body = {"prompt": "a windmill", "size": "64x64", "num_inference_steps": 2, "seed": 9, "variation_strength": 0.2,
            "hires": {"scale": 1.5, "upscaler": "Latent", "steps": 2}}  # fmt: skip
    http = httpx.post(server.url + GEN, json=body, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60).json()
    from_link = httpx.get(image["url"]).content
    assert np.array_equal(pixels(from_link), pixels(base64.b64decode(http["data"][0]["b64_json"])))
    bad = call(server, ALICE, "generate_image", {"prompt": "x", "hires": {"upscaler": "4x-Nowhere"}})
    assert bad.is_error and "could not find upscaler named 4x-Nowhere" in bad.content[0].text


def test_enhance_prompt_answers_with_the_expansion_or_why_not(server):
    sampled = call(server, ALICE, "enhance_prompt", {"prompt": "a lighthouse", "seed": 3})
    assert not sampled.is_error and sampled.structured_content["prompt"] == "a lighthouse"
    http = httpx.post(server.url + "/v1/prompts/enhance", json={"prompt": "a lighthouse", "seed": 3},
                      headers={"Authorization": f"Bearer {ALICE}"}, timeout=60).json()  # fmt: skip
    assert http["revised_prompt"] and sampled.structured_content["revised_prompt"] == http["revised_prompt"]
    # The tiny random encoder's greedy answer is blank: the prompt is kept, and the tool says why.
    greedy = call(server, ALICE, "enhance_prompt", {"prompt": "a lighthouse"})
    assert greedy.structured_content["revised_prompt"] is None and greedy.structured_content["fallback"] == "empty"
    assert "Kept as written (empty)" in greedy.content[0].text


def test_previews_stay_under_the_limit_at_2048_with_four_images(server):
    result = call(server, ALICE, "generate_image", {"prompt": "fog", "size": "2048x2048", "n": 4, "steps": 1})
    assert not result.is_error, result.content
    previews = [content for content in result.content if content.type == "image"]
    assert len(previews) == 4 and sum(len(p.data) for p in previews) <= 700_000
    assert len(json.dumps(result.model_dump(mode="json", by_alias=True))) < 1_048_576
    assert all(i["width"] == 2048 for i in result.structured_content["images"])


def test_edit_image_from_a_stored_images_link_and_not_from_another_keys(server):
    made = call(server, ALICE, "generate_image", {"prompt": "a boat", "size": "64x64", "steps": 2, "seed": 5})
    link = made.structured_content["images"][0]["url"]
    edited = call(server, ALICE, "edit_image", {"image": link, "prompt": "a boat in winter", "strength": 0.5, "seed": 6})
    assert not edited.is_error, edited.content
    assert edited.structured_content["images"][0]["width"] == 64
    stolen = call(server, BOB, "edit_image", {"image": link, "prompt": "mine now"})
    assert stolen.is_error and "no image with id" in stolen.content[0].text


def test_a_fetch_to_a_host_not_allowed_is_refused_before_any_connection(server):
    from test_webhooks import Receiver, answer

    with Receiver([answer(200, b"not an image")]) as receiver:
        for url in (receiver.url, receiver.url.replace("http://", "https://")):
            result = call(server, ALICE, "edit_image", {"image": url, "prompt": "x"})
            assert result.is_error and "Z_IMAGE_MCP_FETCH_ALLOW" in result.content[0].text
        assert receiver.requests == []


def test_mistakes_come_back_as_tool_errors_with_the_http_apis_message(server):
    bad = call(server, ALICE, "generate_image", {"prompt": "x", "size": "100x100"})
    assert bad.is_error and bad.content[0].text == "Invalid size 100x100: width and height must be multiples of 16."
    lora = call(server, ALICE, "generate_image", {"prompt": "x", "loras": [{"name": "nope"}]})
    assert lora.is_error and "nope" in lora.content[0].text
    full = call(server, ALICE, "generate_image", {"prompt": "x", "size": "64x64", "n": 16})
    assert full.is_error and "at most" in full.content[0].text
    assert call(server, ALICE, "get_job", {"id": "job_" + "0" * 32}).is_error


def test_a_full_job_queue_is_a_tool_error(server):
    body = {"prompt": "slow [[fault:slow=1]]", "size": "64x64", "num_inference_steps": 2, "n": 4}
    headers = {"Authorization": f"Bearer {BOB}", "Prefer": "respond-async"}
    accepted = []
    for _ in range(8):  # until the queue (12 images) turns new jobs away
        response = httpx.post(server.url + GEN, json=body, headers=headers)
        if response.status_code == 429:
            break
        accepted.append(response.json()["id"])
    try:
        result = call(server, ALICE, "generate_image", {"prompt": "x", "size": "64x64", "n": 4})
        assert result.is_error and "Z_IMAGE_MAX_JOBS_QUEUED" in result.content[0].text
    finally:
        for job_id in accepted:
            httpx.post(f"{server.url}/v1/images/jobs/{job_id}/cancel", headers=headers)


def test_without_a_key_mcp_is_a_401(server):
    response = httpx.post(server.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                          headers={"Accept": "application/json, text/event-stream"})  # fmt: skip
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "invalid_api_key"
    bad_host = httpx.post(server.url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                          headers={"Authorization": f"Bearer {ALICE}", "Host": "evil.example",
                                   "Accept": "application/json, text/event-stream"})  # fmt: skip
    assert bad_host.status_code == 421


def test_mcp_off_removes_the_route_and_public_hosts_are_allowed(settings, runner, tmp_path):
    from conftest import live_server

    with live_server(settings, runner, store=str(tmp_path / "a"), mcp="off") as base:
        assert httpx.post(base + "/mcp", json={}).status_code == 404
    overrides = dict(store=str(tmp_path / "b"), public_url="https://images.example.com", mcp_allowed_hosts=("gpu.lan:*",))
    with live_server(settings, runner, **overrides) as base:
        for host in ("images.example.com", "gpu.lan:8443"):
            response = httpx.post(base + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                                  headers={"Host": host, "Accept": "application/json, text/event-stream",
                                           "MCP-Protocol-Version": "2025-06-18"})  # fmt: skip
            assert response.status_code == 200, (host, response.text[:200])


def test_without_a_store_the_full_png_comes_inline_or_a_reason(settings, runner, tmp_path):
    from conftest import live_server

    async def run(base: str, arguments: dict):
        async with Client(base + "/mcp") as client:
            return await client.call_tool("generate_image", arguments)

    with live_server(settings, runner, store="none") as base:
        small = asyncio.run(run(base, {"prompt": "a barn", "size": "64x64", "steps": 2, "seed": 4}))
        assert not small.is_error and [c.type for c in small.content] == ["text", "image"]
        assert small.content[1].mime_type == "image/png"
        http = httpx.post(base + GEN, json={"prompt": "a barn", "size": "64x64", "num_inference_steps": 2, "seed": 4},
                          timeout=60).json()  # fmt: skip
        assert base64.b64decode(small.content[1].data) == base64.b64decode(http["data"][0]["b64_json"])
        big = asyncio.run(run(base, {"prompt": "noise", "size": "1024x1024", "steps": 1, "n": 2}))
        assert big.is_error and "Z_IMAGE_STORE=none" in big.content[0].text
