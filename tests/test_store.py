"""The image store: URL responses, history, keys that own their images, retention and crash repair.

Every test runs the real server (TestClient or uvicorn) on a real folder store and SQLite index of
its own; PostgreSQL and S3 are in tests/test_store_replicas.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from PIL import Image

from conftest import Captured, assert_envelope, live_server, metric, serving, wait_for
from zimage_server.gallery import Gallery, NewImages
from zimage_server.index import IndexUnavailable, images_table, open_index
from zimage_server.keys import ANONYMOUS, KeysFileError, digest, read_keys_file
from zimage_server.signed_urls import UrlSigner
from zimage_server.store import ImageStore

GEN = "/v1/images/generations"
SMALL = {"prompt": "a red barn", "size": "64x64", "num_inference_steps": 2}
ALICE, BOB, ROOT = "alice-secret-1", "bob-secret-22", "root-secret-333"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(
        "# name role secret\n"
        f"alice user {ALICE}\n"
        f"bob user sha256:{digest(BOB)}\n"
        f"root admin {ROOT}\n"
    )
    return path


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def stored(client, secret: str, **body) -> dict:
    response = client.post(GEN, json=SMALL | body, headers=auth(secret))
    assert response.status_code == 200, response.text[:300]
    return response.json()


# -- URLs -----------------------------------------------------------------------------------------


def test_the_openai_sdk_gets_a_signed_url_that_serves_the_stored_bytes_without_a_key(settings, runner, tmp_path):
    with live_server(settings, runner, store=str(tmp_path / "out"), api_key=ROOT) as base:
        client = OpenAI(base_url=base + "/v1", api_key=ROOT)
        before = time.time()
        result = client.images.generate(prompt="a red barn", size="64x64", response_format="url", n=2,
                                        extra_body={"num_inference_steps": 2, "seed": 7})  # fmt: skip
        urls = [item.url for item in result.data]
        assert all(url.startswith(base + "/v1/images/img_") for url in urls)
        for item in result.model_dump()["data"]:
            assert before + 3600 - 5 <= item["expires_at"] <= time.time() + 3600 + 5
        for index, url in enumerate(urls):
            plain = httpx.get(url)  # no Authorization header at all
            assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
            image = Image.open(io.BytesIO(plain.content))
            assert image.size == (64, 64) and f"Seed: {7 + index}" in image.info["parameters"]
            image_id = url.split("/")[-2]
            with_key = httpx.get(f"{base}/v1/images/{image_id}/content", headers=auth(ROOT))
            assert with_key.content == plain.content
            assert httpx.get(f"{base}/v1/images/{image_id}/content").status_code == 401  # no key, no signature


def test_b64_json_is_the_default_and_the_stored_bytes_are_what_the_client_got(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        item = stored(client, "", output_format="webp")["data"][0]
        assert "url" not in item and item["id"].startswith("img_")
        content = client.get(f"/v1/images/{item['id']}/content")
        assert content.content == base64.b64decode(item["b64_json"])
        assert content.headers["content-type"] == "image/webp"
        record = client.get(f"/v1/images/{item['id']}").json()
        assert record["output_format"] == "webp" and record["bytes"] == len(content.content)


def test_dall_e_model_names_default_to_url_as_openai_did(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        item = stored(client, "", model="dall-e-3")["data"][0]
        assert "b64_json" not in item and item["url"].startswith("http://testserver.local/v1/images/")
        assert "b64_json" in stored(client, "", model="gpt-image-1")["data"][0]


@pytest.mark.parametrize("change", ["signature", "expires", "id", "unicode digits"])
def test_an_altered_link_is_refused_in_the_envelope(settings, runner, tmp_path, change):
    with serving(settings, runner, store=str(tmp_path / "out"), api_key=ROOT) as client:
        mine = stored(client, ROOT, response_format="url")["data"][0]["url"]
        other = stored(client, ROOT)["data"][0]["id"]
        path, _, query = mine.removeprefix("http://testserver.local").partition("?")
        fields = dict(part.split("=", 1) for part in query.split("&"))
        if change == "signature":
            fields["signature"] = fields["signature"][:-2] + ("AA" if not fields["signature"].endswith("AA") else "BB")
        elif change == "expires":
            fields["expires"] = str(int(fields["expires"]) + 3600)
        elif change == "unicode digits":
            fields["expires"] = "\u00b2" * 3  # str.isdigit() says yes, int() says no
        else:
            path = f"/v1/images/{other}/content"
        response = client.get(path, params=fields)
        assert assert_envelope(response, 403)["code"] == "invalid_signature"


def test_an_expired_link_is_refused(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out"), url_ttl_s=1) as client:
        url = stored(client, "", response_format="url")["data"][0]["url"]
        assert client.get(url).status_code == 200
        time.sleep(2.1)
        assert "expired" in assert_envelope(client.get(url), 403)["message"]


def test_links_follow_forwarded_headers_only_from_trusted_proxies(settings, runner, tmp_path):
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "images.example.com", "X-Forwarded-Prefix": "/zimage"}
    body = SMALL | {"response_format": "url"}
    with serving(settings, runner, store=str(tmp_path / "a")) as client:  # TestClient's peer is "testclient"
        url = client.post(GEN, json=body, headers=forwarded).json()["data"][0]["url"]
        assert url.startswith("http://testserver.local/v1/images/")
    with live_server(settings, runner, store=str(tmp_path / "b"), trusted_proxies=("127.0.0.0/8",)) as base:
        url = httpx.post(base + GEN, json=body, headers=forwarded, timeout=60).json()["data"][0]["url"]
        assert url.startswith("https://images.example.com/zimage/v1/images/img_")
    with live_server(settings, runner, store=str(tmp_path / "c"), public_url="https://cdn.example.org/x/") as base:
        url = httpx.post(base + GEN, json=body, headers=forwarded, timeout=60).json()["data"][0]["url"]
        assert url.startswith("https://cdn.example.org/x/v1/images/img_")


def test_a_streamed_request_gets_links_in_its_completed_events(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        text = client.post(GEN, json=SMALL | {"stream": True, "response_format": "url", "n": 2}).text
        completed = [line for line in text.splitlines() if line.startswith("data:") and ".completed" in line]
        assert len(completed) == 2
        for line in completed:
            event = json.loads(line[len("data:") :])
            assert "b64_json" not in event and client.get(event["url"]).status_code == 200


def test_without_a_store_url_is_a_503_naming_the_cause_and_b64_json_works(settings, runner):
    with serving(settings, runner, store="none") as client:
        error = assert_envelope(client.post(GEN, json=SMALL | {"response_format": "url"}), 503)
        assert "Z_IMAGE_STORE=none" in error["message"] and error["code"] == "store_unavailable"
        assert "b64_json" in client.post(GEN, json=SMALL).json()["data"][0]
        assert assert_envelope(client.get("/v1/images"), 503)["code"] == "store_unavailable"


def test_store_false_keeps_nothing_and_cannot_ask_for_a_url(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        item = stored(client, "", store=False)["data"][0]
        assert "id" not in item and client.get("/v1/images").json()["data"] == []
        assert assert_envelope(client.post(GEN, json=SMALL | {"store": False, "response_format": "url"}), 400)["param"] == "store"
        edit = client.post(
            "/v1/images/edits",
            files={"image": ("a.png", png_bytes(), "image/png")},
            data={"prompt": "winter", "size": "64x64", "num_inference_steps": "2", "store": "false"},
        )
        assert edit.status_code == 200 and client.get("/v1/images").json()["data"] == []


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_failing_store_never_fails_b64_json_but_fails_url_with_503(settings, runner, tmp_path):
    folder = tmp_path / "out"
    with serving(settings, runner, store=str(folder)) as client:
        # Today's subfolder is a file: every write fails, as on a full or broken disk.
        (folder / time.strftime("%Y-%m-%d", time.gmtime())).write_bytes(b"")
        assert "zimage_store_errors_total 0.0" in client.get("/metrics").text
        with Captured("zimage_server.gallery") as log:
            for _ in range(3):
                assert "b64_json" in stored(client, "")["data"][0]
            error = assert_envelope(client.post(GEN, json=SMALL | {"response_format": "url"}), 503)
            assert error["code"] == "store_unavailable" and "store failed" in error["message"]
            wait_for(lambda: "zimage_store_errors_total 4.0" in client.get("/metrics").text)
        assert len([r for r in log.records if r.levelname == "ERROR"]) == 1  # one line per burst
        assert client.get("/v1/images").json()["data"] == []


# -- history and ownership ------------------------------------------------------------------------


def test_each_user_key_sees_only_its_own_images_and_admin_sees_all(settings, runner, tmp_path, keys_file):
    with serving(settings, runner, store=str(tmp_path / "out"), api_keys_file=keys_file) as client:
        alice = stored(client, ALICE, prompt="alice's barn")["data"][0]["id"]
        bob = stored(client, BOB, prompt="bob's boat")["data"][0]["id"]
        assert [i["id"] for i in client.get("/v1/images", headers=auth(ALICE)).json()["data"]] == [alice]
        assert [i["id"] for i in client.get("/v1/images", headers=auth(BOB)).json()["data"]] == [bob]
        assert [i["id"] for i in client.get("/v1/images", headers=auth(ROOT)).json()["data"]] == [bob, alice]
        record = client.get(f"/v1/images/{alice}", headers=auth(ALICE)).json()
        assert record["owner"] == "alice" and record["prompt"] == "alice's barn"
        for path in (f"/v1/images/{alice}", f"/v1/images/{alice}/content"):
            assert assert_envelope(client.get(path, headers=auth(BOB)), 404)["code"] == "image_not_found"
        assert assert_envelope(client.delete(f"/v1/images/{alice}", headers=auth(BOB)), 404)["code"] == "image_not_found"
        assert client.get(f"/v1/images/{alice}/content", headers=auth(ROOT)).status_code == 200
        assert client.get("/v1/images", headers=auth("wrong-key")).status_code == 401
        assert client.get("/v1/images").status_code == 401


def test_a_record_keeps_every_generation_parameter(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        body = SMALL | {"seed": 11, "negative_prompt": "fog", "guidance_scale": 1.5, "n": 2}
        response = client.post(GEN, json=body, headers={"X-Request-ID": "req-42"})
        ids = [item["id"] for item in response.json()["data"]]
        records = [client.get(f"/v1/images/{image_id}").json() for image_id in ids]
        for offset, record in enumerate(records):
            parameters = record["parameters"]
            assert record["request_id"] == "req-42" and record["route"] == GEN
            assert record["negative_prompt"] == "fog" and record["model"] == "z-image-turbo"
            assert parameters["seed"] == 11 + offset and parameters["width"] == parameters["height"] == 64
            assert parameters["num_inference_steps"] == 2 and parameters["guidance_scale"] == 1.5
            assert parameters["loras"] == [] and parameters["mode"] == "generate"
            assert len(record["checkpoint_sha256"]) == 64


def test_pages_walk_back_newest_first_and_q_searches_prompts(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        made = [stored(client, "", prompt=f"picture {i} of a {'Cat' if i % 2 else 'dog'}")["data"][0]["id"] for i in range(5)]
        newest_first = made[::-1]
        seen, after = [], None
        while True:
            page = client.get("/v1/images", params={"limit": 2} | ({"after": after} if after else {})).json()
            seen += [item["id"] for item in page["data"]]
            assert page["object"] == "list" and page["last_id"] == page["data"][-1]["id"]
            if not page["has_more"]:
                break
            after = page["last_id"]
        assert seen == newest_first
        cats = client.get("/v1/images", params={"q": "cAT"}).json()["data"]
        assert [item["id"] for item in cats] == [made[3], made[1]]
        assert client.get("/v1/images", params={"q": "50%_"}).json()["data"] == []  # wildcards are literal


def test_delete_removes_file_and_row_and_a_second_delete_finds_nothing(settings, runner, tmp_path):
    folder = tmp_path / "out"
    with serving(settings, runner, store=str(folder)) as client:
        image_id = stored(client, "")["data"][0]["id"]
        assert client.get(f"/v1/images/{image_id}").status_code == 200  # its write has committed
        [file] = folder.glob(f"*/{image_id}.png")
        response = client.delete(f"/v1/images/{image_id}")
        assert response.status_code == 200 and response.json() == {"id": image_id, "deleted": True, "object": "image"}
        # Again: nothing left to delete, answered as any id the caller cannot see (no probing).
        assert assert_envelope(client.delete(f"/v1/images/{image_id}"), 404)["code"] == "image_not_found"
        assert not file.exists()
        assert client.get(f"/v1/images/{image_id}").status_code == 404
        assert client.get("/v1/images").json()["data"] == []


def test_a1111_routes_store_and_honour_send_images(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "send_images": False}
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200 and response.json()["images"] == []
        [record] = client.get("/v1/images").json()["data"]
        assert record["route"] == "/sdapi/v1/txt2img" and record["prompt"] == "a lighthouse"
        assert client.get(f"/v1/images/{record['id']}/content").content[:8] == b"\x89PNG\r\n\x1a\n"


HOSTILE_IDS = ["..", "../index.db", "img_../../index.db", "img_\x00abc", "x" * 10_000, "img_" + "g" * 32, "' OR 1=1 --"]


@pytest.mark.parametrize("image_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_ids_get_a_4xx_envelope(settings, runner, tmp_path, image_id):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        stored(client, "")
        quoted = "/v1/images/" + urllib.parse.quote(image_id, safe="")
        for response in (client.get(quoted), client.get(quoted + "/content"), client.delete(quoted)):
            assert 400 <= response.status_code < 500
            assert "error" in response.json()
        assert len(client.get("/v1/images").json()["data"]) == 1 and client.get("/ready").status_code == 200


@pytest.mark.parametrize(
    "params, param",
    [({"limit": "0"}, "limit"), ({"limit": "-1"}, "limit"), ({"limit": str(10**9)}, "limit"), ({"limit": "abc"}, "limit"),
     ({"after": "img_nope"}, "after"), ({"after": "img_" + "0" * 32}, "after"), ({"q": "x" * 1001}, "q")],
)  # fmt: skip
def test_bad_list_parameters_get_400_naming_them(settings, runner, tmp_path, params, param):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        assert assert_envelope(client.get("/v1/images", params=params), 400)["param"] == param


def test_sql_in_q_is_only_text(settings, runner, tmp_path):
    with serving(settings, runner, store=str(tmp_path / "out")) as client:
        stored(client, "", prompt="a barn")
        for q in ("' OR '1'='1", "%' OR 1=1; DROP TABLE zimage_images; --", "\\"):
            assert client.get("/v1/images", params={"q": q}).json()["data"] == []
        assert len(client.get("/v1/images").json()["data"]) == 1


# -- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, says",
    [("alice user", "expected 'NAME ROLE SECRET'"), ("alice owner secret-123", "role must be admin or user"),
     ("alice user sha256:abc", "64 hex digits"), ("al/ice user secret-123", "invalid name"),
     ("alice user short", "shorter than 8"), ("admin user secret-123", "reserved"),
     ("anonymous admin secret-123", "reserved")],
)  # fmt: skip
def test_a_bad_keys_file_line_is_named_without_its_secret(tmp_path, line, says):
    path = tmp_path / "keys"
    path.write_text(f"# comment\nroot admin {ROOT}\n{line}\n")
    with pytest.raises(KeysFileError, match=says) as error:
        read_keys_file(path)
    assert "line 3" in str(error.value) and "secret-123" not in str(error.value)


# -- retention and repair ----------------------------------------------------------------------------


def new_images(n: int, size: int = 100, owner: str = "anonymous") -> NewImages:
    return NewImages(
        owner=owner, route=GEN, request_id="r", prompt="p", negative_prompt=None,
        parameters=[{"seed": i} for i in range(n)], model="z-image-turbo", checkpoint_sha256=None,
        format="png", blobs=[bytes([i]) * size for i in range(n)],
    )  # fmt: skip


async def open_gallery(tmp_path: Path) -> Gallery:
    store = ImageStore.from_setting(str(tmp_path / "out"))
    return Gallery(store, await open_index(f"sqlite:///{tmp_path / 'out' / 'index.db'}"))


def test_retention_deletes_the_oldest_by_age_then_by_bytes(tmp_path):
    async def scenario() -> None:
        gallery = await open_gallery(tmp_path)
        records = []
        for _ in range(6):  # six requests, one after another
            kept, written = gallery.keep(new_images(1))
            await written
            records += kept
            await asyncio.sleep(0.01)
        # Nothing is old yet; 600 bytes are kept, so a 350-byte cap removes the three oldest.
        assert await gallery.sweep(max_age_s=3600, max_bytes=0) == 0
        assert await gallery.sweep(max_age_s=0, max_bytes=350) == 3
        left, _ = await gallery.page(ANONYMOUS, 100, None, None)
        assert {r.id for r in left} == {r.id for r in records[3:]}
        assert await gallery.sweep(max_age_s=60, max_bytes=0, now=time.time() + 120) == 3
        assert list((tmp_path / "out").glob("*/img_*")) == []
        await gallery.index.close()

    asyncio.run(scenario())


def test_reconcile_removes_orphans_and_partials_and_drops_rows_without_files(tmp_path):
    async def scenario() -> None:
        gallery = await open_gallery(tmp_path)
        records, written = gallery.keep(new_images(3))
        await written
        folder = tmp_path / "out"
        day = records[0].object_key.split("/")[0]
        orphan = folder / day / "img_0123456789abcdef0123456789abcdef.png"
        orphan.write_bytes(b"no row")
        partial = folder / day / "img_fedcba9876543210fedcba9876543210.png#3"
        partial.write_bytes(b"half")
        fresh_orphan = folder / day / "img_11111111111111111111111111111111.png"
        fresh_orphan.write_bytes(b"a write in flight elsewhere")
        old = time.time() - 3600
        for path in (orphan, partial):
            os.utime(path, (old, old))
        (folder / records[0].object_key).unlink()  # a row whose file is gone
        (folder / "notes.txt").write_bytes(b"not an image of ours")
        os.utime(folder / "notes.txt", (old, old))
        # Within the grace period a row's file may still be on its way, and a file's row.
        assert await gallery.reconcile(grace_s=600) == (2, 0)
        assert not orphan.exists() and not partial.exists() and fresh_orphan.exists()
        assert await gallery.reconcile(grace_s=0) == (1, 1)
        assert not fresh_orphan.exists()
        assert (folder / "index.db").exists() and (folder / "notes.txt").exists()  # only image names are touched
        left, _ = await gallery.page(ANONYMOUS, 100, None, None)
        assert {r.id for r in left} == {r.id for r in records[1:]}
        await gallery.index.close()

    asyncio.run(scenario())


# -- the index's schema ------------------------------------------------------------------------------


def test_a_version_1_index_upgrades_in_place_and_a_newer_one_is_refused(tmp_path):
    from sqlalchemy import insert, inspect, select, text
    from sqlalchemy.ext.asyncio import create_async_engine

    from zimage_server.index import meta_table, schema_table

    url = f"sqlite:///{tmp_path / 'index.db'}"

    async def scenario() -> None:
        # An index as version 1 of the server left it: images, no jobs.
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'index.db'}")
        async with engine.begin() as conn:
            for table in (schema_table, meta_table, images_table):
                await conn.run_sync(table.create)
            await conn.execute(insert(schema_table).values(version=1))
        await engine.dispose()
        old = Gallery(ImageStore.from_setting(str(tmp_path / "out")), await open_index(url, migrations=()))
        _, written = old.keep(new_images(2))
        await written
        await old.index.close()
        upgraded = await open_index(url)  # version 1 -> 2: the jobs table arrives, the images stay
        async with upgraded.engine.connect() as conn:
            assert (await conn.execute(text("SELECT version FROM zimage_schema"))).scalar_one() == 2
            assert len((await conn.execute(select(images_table.c.id))).all()) == 2
            assert "zimage_jobs" in await conn.run_sync(lambda sync: inspect(sync).get_table_names())
            await conn.execute(text("UPDATE zimage_schema SET version = 3"))
            await conn.commit()
        await upgraded.close()
        with pytest.raises(IndexUnavailable, match="schema version 3, newer than this server's 2"):
            await open_index(url)

    asyncio.run(scenario())


def test_the_url_secret_is_generated_once_and_kept_in_the_index(tmp_path):
    url = f"sqlite:///{tmp_path / 'index.db'}"

    async def secrets() -> list[str]:
        found = []
        for _ in range(2):
            index = await open_index(url)
            found.append(await index.url_secret())
            await index.close()
        return found

    first, second = asyncio.run(secrets())
    assert first == second and len(first) >= 32
    signer = UrlSigner(first.encode(), 60)
    query, _ = signer.sign("img_x")
    fields = dict(part.split("=", 1) for part in query.split("&"))
    UrlSigner(second.encode(), 60).verify("img_x", fields["expires"], fields["signature"])


def test_metrics_count_pending_writes_gauge(settings, runner, tmp_path):
    with live_server(settings, runner, store=str(tmp_path / "out")) as base:
        httpx.post(base + GEN, json=SMALL, timeout=60)
        assert metric(base, "zimage_store_pending_writes") == 0
        assert metric(base, "zimage_store_errors_total") == 0


def test_servers_starting_together_on_one_sqlite_file_create_one_schema(tmp_path):
    from sqlalchemy import text

    url = f"sqlite:///{tmp_path / 'index.db'}"

    async def scenario() -> int:
        indexes = await asyncio.gather(*(open_index(url) for _ in range(6)))
        async with indexes[0].engine.connect() as conn:
            rows = (await conn.execute(text("SELECT COUNT(*) FROM zimage_schema"))).scalar_one()
        for index in indexes:
            await index.close()
        return rows

    assert asyncio.run(scenario()) == 1
