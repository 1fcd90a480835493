"""Benchmark 10: what keeping images costs a request, and how fast the history lists.

    PYTHONPATH=src python benchmarks/store.py [--repeats 15] [--images 100000]

1. Request overhead: two `zimage-server serve` processes on the tiny model, one with a folder store
   and one with `Z_IMAGE_STORE=none`, each asked in turn for one 1024x1024 PNG as b64_json (one
   step: the pipeline is not what is measured). Medians of the client-side latency; the store's
   cost is the difference. Target (issue 23): at most 5 ms.
   Beside it, in this process: the background write itself (obstore put + fsync of the same PNG
   into a folder store), which runs after the answer has left, off the event loop.
2. Listing: an index of `--images` rows (and as many small files) written directly, then a server
   on it, then `GET /v1/images?limit=50` over HTTP: the first page, and a page from the middle
   (`after` a cursor half way down). Medians. Target: at most 20 ms on SQLite.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import httpx

from common import add_standard_options, median, print_table, running_server, tiny_models_dir, write_record

TARGET_STORE_MS = 5.0
TARGET_LIST_MS = 20.0


def request_overhead(models_dir: Path, work: Path, repeats: int, size: int) -> dict:
    """Latency outside the pipeline (client latency minus the access log's pipeline_ms): what the
    server adds around the model call, the store included. Taking the pipeline's own time out
    leaves the few milliseconds the store could add visible above the pipeline's jitter."""
    body = {"prompt": "a lighthouse at dawn", "size": f"{size}x{size}", "num_inference_steps": 1, "seed": 1}
    latency: dict[str, dict[str, float]] = {"none": {}, "folder": {}}
    logs = {"none": work / "none.log", "folder": work / "folder.log"}
    settings = {"log_level": "info", "log_format": "json"}
    with (
        running_server(models_dir, logs["none"], threads=1, store="none", **settings) as plain,
        running_server(models_dir, logs["folder"], threads=1, store=str(work / "outputs"), **settings) as keeping,
        httpx.Client(timeout=120) as client,
    ):
        bases = {"none": plain, "folder": keeping}
        for i in range(repeats + 1):
            order = ["none", "folder"] if i % 2 else ["folder", "none"]
            for arm in order:
                request_id = f"store-{arm}-{i}"
                started = time.perf_counter()
                response = client.post(bases[arm] + "/v1/images/generations", json=body, headers={"X-Request-ID": request_id})
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                if i > 0:  # the first round warms up
                    latency[arm][request_id] = elapsed
                if arm == "folder":  # its write finishes before the next request: no arm pays for the other's
                    settle(client, keeping)
        kept = client.get(keeping + "/v1/images", params={"limit": 100}).json()["data"]
    outside: dict[str, list[float]] = {}
    medians: dict[str, float] = {}
    for arm, log_path in logs.items():
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
        pipeline = {line["request_id"]: line["pipeline_ms"] for line in lines if line.get("logger") == "zimage_server.access"
                    and line.get("request_id") in latency[arm]}  # fmt: skip
        outside[arm] = [1000 * latency[arm][rid] - pipeline[rid] for rid in latency[arm]]
        medians[arm] = 1000 * median(list(latency[arm].values()))
    plain_ms, store_ms = median(outside["none"]), median(outside["folder"])
    return {
        "none_ms": medians["none"], "folder_ms": medians["folder"],
        "none_outside_pipeline_ms": plain_ms, "folder_outside_pipeline_ms": store_ms,
        "store_adds_ms": store_ms - plain_ms, "images_kept": len(kept),
        "target_ms": TARGET_STORE_MS, "meets_target": store_ms - plain_ms <= TARGET_STORE_MS,
    }  # fmt: skip


def settle(client: httpx.Client, base: str) -> None:
    deadline = time.monotonic() + 30
    while "zimage_store_pending_writes 0.0" not in client.get(base + "/metrics").text:
        assert time.monotonic() < deadline, "the store's writes never finished"
        time.sleep(0.005)


async def fill_index(folder: Path, images: int) -> None:
    """`images` rows over a day of made-up history, each with a small file, as the server writes them."""
    from zimage_server.gallery import new_image_id
    from zimage_server.index import ImageRecord, open_index

    index = await open_index(f"sqlite:///{folder / 'index.db'}")
    now = time.time()
    batch: list[ImageRecord] = []
    for i in range(images):
        image_id = new_image_id()
        key = f"2026-12-06/{image_id}.png"
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\x89PNG")
        batch.append(
            ImageRecord(
                id=image_id, owner=("alice", "bob", "carol")[i % 3], created_at=now - images + i, request_id=f"r{i}",
                route="/v1/images/generations", prompt=f"picture {i} of a lighthouse", negative_prompt=None,
                parameters={"seed": i, "width": 1024, "height": 1024}, model="z-image-turbo", checkpoint_sha256=None,
                format="png", bytes=4, object_key=key,
            )
        )  # fmt: skip
        if len(batch) == 5000:
            await index.add(batch)
            batch = []
    if batch:
        await index.add(batch)
    await index.close()


def background_write(work: Path, size: int, repeats: int) -> dict:
    """Median ms of one kept image's write (put, fsync, index row), off the request path."""
    import numpy as np
    from PIL import Image

    from zimage_server.gallery import Gallery, NewImages
    from zimage_server.images import encode_image
    from zimage_server.index import open_index
    from zimage_server.store import ImageStore

    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    blob = encode_image(Image.fromarray(pixels), "png", None, parameters=None)
    folder = work / "writes"

    async def run() -> list[float]:
        gallery = Gallery(ImageStore.from_setting(str(folder)), await open_index(f"sqlite:///{folder / 'index.db'}"))
        samples = []
        for i in range(repeats + 1):
            images = NewImages(owner="anonymous", route="/v1/images/generations", request_id=f"r{i}", prompt="p",
                               negative_prompt=None, parameters=[{}], model="z-image-turbo", checkpoint_sha256=None,
                               format="png", blobs=[blob])  # fmt: skip
            started = time.perf_counter()
            _, written = gallery.keep(images)
            await written
            if i > 0:
                samples.append(time.perf_counter() - started)
        await gallery.index.close()
        return samples

    return {"png_bytes": len(blob), "write_ms": 1000 * median(asyncio.run(run()))}


def listing(models_dir: Path, work: Path, images: int, repeats: int) -> dict:
    folder = work / "history"
    started = time.perf_counter()
    asyncio.run(fill_index(folder, images))
    fill_s = time.perf_counter() - started
    results = {"images": images, "fill_s": fill_s, "target_ms": TARGET_LIST_MS}
    with running_server(models_dir, work / "listing.log", threads=1, store=str(folder)) as base, httpx.Client() as client:
        middle = client.get(base + "/v1/images", params={"limit": 100}).json()["data"][-1]["id"]
        for _ in range(images // 200):  # walk down to the middle of the history for a deep cursor
            page = client.get(base + "/v1/images", params={"limit": 100, "after": middle}).json()
            middle = page["last_id"]
        for name, params in (("first_page", {"limit": 50}), ("middle_page", {"limit": 50, "after": middle})):
            samples = []
            for i in range(repeats + 1):
                begun = time.perf_counter()
                response = client.get(base + "/v1/images", params=params)
                elapsed = time.perf_counter() - begun
                assert response.status_code == 200 and len(response.json()["data"]) == 50, response.text[:200]
                if i > 0:
                    samples.append(elapsed)
            results[name + "_ms"] = 1000 * median(samples)
        results["meets_target"] = max(results["first_page_ms"], results["middle_page_ms"]) <= TARGET_LIST_MS
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--images", type=int, default=100_000)
    add_standard_options(parser, "a few repeats at 256x256 and 1,000 stored images, to check the script runs")
    args = parser.parse_args()
    repeats = 3 if args.smoke else args.repeats
    images = 1000 if args.smoke else args.images
    size = 256 if args.smoke else 1024
    models_dir = tiny_models_dir()
    work = Path(tempfile.mkdtemp(prefix="zimage-bench-store-"))
    try:
        overhead = request_overhead(models_dir, work, repeats, size)
        overhead |= background_write(work, size, repeats)
        listed = listing(models_dir, work, images, repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(models_dir, ignore_errors=True)
    table = [
        ["measure", "value", "target"],
        [f"b64_json {size}x{size} PNG, store none: median ms (outside the pipeline)",
         f"{overhead['none_ms']:.1f} ({overhead['none_outside_pipeline_ms']:.1f})", ""],
        [f"b64_json {size}x{size} PNG, folder store: median ms (outside the pipeline)",
         f"{overhead['folder_ms']:.1f} ({overhead['folder_outside_pipeline_ms']:.1f})", ""],
        ["the store adds, outside the pipeline: ms", overhead["store_adds_ms"], f"<= {TARGET_STORE_MS:g}"],
        [f"its background write ({overhead['png_bytes']:,} B PNG + fsync + row): median ms", overhead["write_ms"], ""],
        [f"list 50 of {images:,}, first page: median ms", listed["first_page_ms"], f"<= {TARGET_LIST_MS:g}"],
        [f"list 50 of {images:,}, from the middle: median ms", listed["middle_page_ms"], f"<= {TARGET_LIST_MS:g}"],
    ]
    print_table(table)
    config = {"size": size, "repeats": repeats, "images": images, "smoke": args.smoke, "threads": args.threads}
    write_record(args.out, "store", config, {"request_overhead": overhead, "listing": listed}, table)


if __name__ == "__main__":
    main()
