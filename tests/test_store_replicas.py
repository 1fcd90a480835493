"""The image store on a real S3 server (SeaweedFS) and the index on a real PostgreSQL, shared by
two server processes, as replicas behind a load balancer share them."""

from __future__ import annotations

import asyncio
import io
import secrets
import time

import httpx
import pytest
from attack_support import ServerProcess
from PIL import Image
from real_servers import create_database

from zimage_server.gallery import Gallery, NewImages
from zimage_server.index import IndexUnavailable, open_index
from zimage_server.keys import ANONYMOUS
from zimage_server.store import ImageStore

GEN = "/v1/images/generations"
ROOT = "root-secret-333"


def unique(name: str) -> str:
    return f"{name}_{secrets.token_hex(4)}"


@pytest.mark.attack
def test_two_servers_on_one_postgresql_and_one_bucket_share_every_image(models_dir, tmp_path, postgres, s3):
    env = {
        "Z_IMAGE_STORE": f"s3://{s3.bucket}/{unique('replicas')}",
        "Z_IMAGE_DATABASE_URL": create_database(postgres, unique("replicas")),
        "Z_IMAGE_API_KEY": ROOT,
        **s3.env,
    }
    first = ServerProcess(models_dir, tmp_path / "first.log", env).start()
    second = ServerProcess(models_dir, tmp_path / "second.log", env).start()
    headers = {"Authorization": f"Bearer {ROOT}"}
    try:
        body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2, "seed": 5,
                "response_format": "url"}  # fmt: skip
        made = httpx.post(first.url + GEN, json=body, headers=headers, timeout=60).json()["data"][0]
        image_id, link = made["id"], made["url"]
        # Listed and read through the other replica; the first's link is served by the second.
        [listed] = httpx.get(second.url + "/v1/images", headers=headers).json()["data"]
        assert listed["id"] == image_id and listed["prompt"] == "a lighthouse"
        through_second = httpx.get(second.url + link.removeprefix(first.url))
        assert through_second.status_code == 200 and through_second.headers["content-type"] == "image/png"
        assert httpx.get(link).content == through_second.content
        image = Image.open(io.BytesIO(through_second.content))
        assert image.size == (64, 64) and "Seed: 5" in image.info["parameters"]
        # Deleted through the second: gone for the first, link included.
        assert httpx.delete(f"{second.url}/v1/images/{image_id}", headers=headers).json()["deleted"] is True
        assert httpx.get(first.url + "/v1/images", headers=headers).json()["data"] == []
        assert httpx.get(link).status_code == 404
    finally:
        first.stop()
        second.stop()


def images(n: int, size: int = 64) -> NewImages:
    return NewImages(
        owner="alice", route=GEN, request_id="r", prompt="A Lighthouse at 50%_off", negative_prompt=None,
        parameters=[{"seed": i} for i in range(n)], model="z-image-turbo", checkpoint_sha256=None,
        format="png", blobs=[bytes([i]) * size for i in range(n)],
    )  # fmt: skip


def test_the_gallery_on_s3_and_postgresql_keeps_lists_sweeps_and_reconciles(postgres, s3, monkeypatch):
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    url = create_database(postgres, unique("gallery"))

    async def scenario() -> None:
        store = ImageStore.from_setting(f"s3://{s3.bucket}/{unique('gallery')}")
        gallery = Gallery(store, await open_index(url))
        kept = []
        for _ in range(3):
            records, written = gallery.keep(images(2))
            await written
            kept += records
            await asyncio.sleep(0.01)
        page, more = await gallery.page(ANONYMOUS, 4, None, None)
        newest_first = [r.id for request in (kept[4:], kept[2:4], kept[:2]) for r in request]  # requests' images in order
        assert [r.id for r in page] == newest_first[:4] and more
        # ILIKE on PostgreSQL: case-insensitive, with % and _ taken literally.
        assert len((await gallery.page(ANONYMOUS, 10, None, "lighthouse AT 50%_"))[0]) == 6
        assert (await gallery.page(ANONYMOUS, 10, None, "50%x"))[0] == []
        assert await gallery.read(kept[0]) == bytes([0]) * 64
        # A row whose object is gone, and an object without a row: reconcile repairs both.
        await store.delete(kept[0].object_key)
        await store.put("2026-01-01/img_0123456789abcdef0123456789abcdef.png", b"orphan")
        removed, dropped = await gallery.reconcile(grace_s=0)
        assert (removed, dropped) == (1, 1)
        assert [o.key async for o in store.objects()] == [r.object_key for r in sorted(kept[1:], key=lambda r: r.object_key)]
        assert await gallery.sweep(max_age_s=0, max_bytes=64 * 2) == 3
        assert await gallery.sweep(max_age_s=60, max_bytes=0, now=time.time() + 120) == 2
        assert [o async for o in store.objects()] == []
        await gallery.index.close()

    asyncio.run(scenario())


def test_replicas_starting_together_create_one_schema_and_one_url_secret(postgres):
    url = create_database(postgres, unique("schema"))

    async def scenario() -> list[str]:
        indexes = await asyncio.gather(*(open_index(url) for _ in range(4)))
        found = await asyncio.gather(*(index.url_secret() for index in indexes))
        for index in indexes:
            await index.close()
        return found

    assert len(set(asyncio.run(scenario()))) == 1


def test_a_newer_schema_on_postgresql_is_refused(postgres):
    url = create_database(postgres, unique("newer"))

    async def scenario() -> None:
        from sqlalchemy import text

        index = await open_index(url)
        async with index._engine.begin() as conn:
            await conn.execute(text("UPDATE zimage_schema SET version = 7"))
        await index.close()
        with pytest.raises(IndexUnavailable, match="schema version 7, newer than this server's 2"):
            await open_index(url)

    asyncio.run(scenario())


def test_an_unreachable_database_is_one_line(tmp_path):
    with pytest.raises(IndexUnavailable) as error:
        asyncio.run(open_index("postgresql://nobody:hunter2@127.0.0.1:1/none"))
    message = str(error.value)
    assert "\n" not in message and "hunter2" not in message and "127.0.0.1:1" in message
