"""Benchmark 2: what batching buys under concurrent load (CPU, tiny model).

    PYTHONPATH=src python benchmarks/batching.py [--rounds 3] [--out benchmarks/results]

Two real `zimage-server serve` child processes, Z_IMAGE_MAX_BATCH_SIZE=1 and =8, loaded side by
side; only one is driven at a time, alternating, round after round. Each phase runs C clients
(threads, one connection each) that send requests back to back, every one with its own prompt.
Reports images/s and p50/p95 latency at 1, 4 and 16 clients, and as the ceiling the pipeline alone
at batch 1 vs batch 8, interleaved in this process, twice: a plain diffusers call and the server's
own engine call (runner.run_call) without HTTP. Targets: at 16 clients, batched >= 2.0x images/s,
and that gain >= 90% of the gain without the server.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import httpx

from common import (
    add_standard_options,
    generate_over_http,
    median,
    percentile,
    print_table,
    running_server,
    set_threads,
    tiny_models_dir,
    write_record,
)

TARGET_RATIO = 2.0
GAIN_SHARE_TARGET = 0.9  # issue 16: the server keeps >= 90% of the gain batching gives without it
BATCH_SIZES = (1, 8)


def drive(base_url: str, clients: int, requests_per_client: int, size: int, steps: int, tag: str) -> tuple[float, list[float]]:
    """C clients, each sending its requests back to back; (wall seconds, per-request latencies)."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        try:
            with httpx.Client(timeout=300) as client:
                barrier.wait()
                for j in range(requests_per_client):
                    body = {
                        "prompt": f"a lighthouse at dawn, {tag}, client {index}, request {j}",
                        "size": f"{size}x{size}",
                        "num_inference_steps": steps,
                        "seed": j,
                    }
                    started = time.perf_counter()
                    generate_over_http(client, base_url, body)
                    with lock:
                        latencies.append(time.perf_counter() - started)
        except BaseException as exc:  # noqa: BLE001 - reported after the phase
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join(timeout=600)
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"a client failed: {errors[0]!r}")
    return wall, latencies


class Ceilings:
    """What batching buys without the server, batch 1 vs batch 8, in this process:

    - `pipeline`: a plain diffusers ZImagePipeline call (PIL images out);
    - `engine`: the server's own ModelRunner.run_call, the exact device work a batch of requests
      gets in `serve` (the server's prompt encoding and uint8 conversion), without HTTP or the batcher.

    One `round` runs both arms at both batch sizes (8 images each), in an order that alternates;
    rounds run between the server phases, so drift on a shared machine hits both sides alike.
    """

    def __init__(self, models_dir: Path, size: int, steps: int):
        import torch
        from diffusers import ZImagePipeline

        from zimage_server.runner import load_runner
        from zimage_server.settings import Settings
        from zimage_server.specs import CallParams, GenerationSpec, ImageRow

        pipeline = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo")
        pipeline.set_progress_bar_config(disable=True)
        runner = load_runner(Settings(models_dir=models_dir, device="cpu", prompt_cache=0))
        params = CallParams("generate", size, size, num_inference_steps=steps, guidance_scale=0.0)

        def pipeline_call(prompts: list[str]) -> None:
            generators = [torch.Generator("cpu").manual_seed(i) for i in range(len(prompts))]
            pipeline(prompts, width=size, height=size, num_inference_steps=steps, guidance_scale=0.0, generator=generators)

        def engine_call(prompts: list[str]) -> None:
            runner.run_call(params, [ImageRow(GenerationSpec(p, None, (i,), params), i) for i, p in enumerate(prompts)])

        self.arms = {"pipeline": pipeline_call, "engine": engine_call}
        self.rates: dict[tuple[str, int], list[float]] = {}

    def round(self, r: int, record: bool = True) -> None:
        for name in self.arms if r % 2 else list(self.arms)[::-1]:
            for batch in BATCH_SIZES if r % 2 else BATCH_SIZES[::-1]:
                prompts = [f"a lighthouse at dawn, {name} {r}, {i}" for i in range(8)]
                started = time.perf_counter()
                for first in range(0, 8, batch):
                    self.arms[name](prompts[first : first + batch])
                if record:
                    self.rates.setdefault((name, batch), []).append(8 / (time.perf_counter() - started))

    def ratio(self, name: str, r: int) -> float:
        return self.rates[name, 8][r] / self.rates[name, 1][r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="requests per phase (split across the clients)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    add_standard_options(parser, "one short round, to check the script runs")
    args = parser.parse_args()
    rounds, requests = (1, 8) if args.smoke else (args.rounds, args.requests)
    clients_list = [1, 4] if args.smoke else args.clients

    set_threads(args.threads)
    models_dir = tiny_models_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "batching.server.log"
    rates: dict[tuple[int, int], list[float]] = {}
    latencies: dict[tuple[int, int], list[float]] = {}
    ceiling = Ceilings(models_dir, args.size, args.steps)
    with (
        running_server(models_dir, log, args.threads, device="cpu", max_batch_size="1", max_queue="64") as unbatched,
        running_server(models_dir, log, args.threads, device="cpu", max_batch_size="8", max_queue="64") as batched,
    ):
        servers = {1: unbatched, 8: batched}
        for batch_size, url in servers.items():  # warm both (connection set-up, first-request paths)
            drive(url, 2, 2, args.size, args.steps, f"warm {batch_size}")
        ceiling.round(-1, record=False)
        for r in range(rounds):
            for clients in clients_list:
                order = BATCH_SIZES if (r + clients) % 2 else BATCH_SIZES[::-1]
                for batch_size in order:
                    per_client = max(1, requests // clients)
                    wall, lat = drive(servers[batch_size], clients, per_client, args.size, args.steps, f"r{r}")
                    rates.setdefault((clients, batch_size), []).append(clients * per_client / wall)
                    latencies.setdefault((clients, batch_size), []).extend(lat)
            ceiling.round(r)

    results: dict = {"phases": []}
    table = [["clients", "max batch", "images/s", "p50 ms", "p95 ms", "x unbatched"]]
    for clients in clients_list:
        base = median(rates[(clients, 1)])
        for batch_size in BATCH_SIZES:
            key = (clients, batch_size)
            row = {
                "clients": clients,
                "max_batch_size": batch_size,
                "images_per_s": median(rates[key]),
                "images_per_s_rounds": rates[key],
                "p50_s": percentile(latencies[key], 50),
                "p95_s": percentile(latencies[key], 95),
                "ratio_to_unbatched": median(rates[key]) / base,
            }
            results["phases"].append(row)
            table.append(
                [clients, batch_size, row["images_per_s"], row["p50_s"] * 1000, row["p95_s"] * 1000, row["ratio_to_unbatched"]]
            )
    top = max(clients_list)
    ratio = median(rates[(top, 8)]) / median(rates[(top, 1)])
    alone = {
        name: {f"batch_{b}_images_per_s": median(ceiling.rates[name, b]) for b in BATCH_SIZES}
        | {"ratio": median([ceiling.ratio(name, r) for r in range(rounds)])}
        for name in ceiling.arms
    }
    for name, arm in alone.items():
        rates_shown = f"{arm['batch_1_images_per_s']:.1f} -> {arm['batch_8_images_per_s']:.1f}"
        table.append([f"{name} alone", "1 -> 8", rates_shown, "", "", arm["ratio"]])
    # Each round's server gain against the same round's gain without the server, then the median.
    share = {
        name: median([rates[(top, 8)][r] / rates[(top, 1)][r] / ceiling.ratio(name, r) for r in range(rounds)])
        for name in ceiling.arms
    }
    results |= {
        "pipeline_alone": alone["pipeline"],
        "engine_alone": alone["engine"],
        "gain_share_of_pipeline": share["pipeline"],
        "gain_share_of_engine": share["engine"],
        "gain_share_target": GAIN_SHARE_TARGET,
        "ratio_at_most_clients": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }
    config = {
        "size": args.size,
        "steps": args.steps,
        "rounds": rounds,
        "clients": clients_list,
        "requests_per_phase": requests,
        "threads": args.threads,
        "smoke": args.smoke,
        "device": "cpu",
    }
    path = write_record(args.out, "batching", config, results, table)
    print(f"wrote {path}")
    print(f"batched / unbatched at {top} clients = {ratio:.2f}x (target >= {TARGET_RATIO}x: {'met' if ratio >= TARGET_RATIO else 'missed'})")
    print(f"that gain as a share of the pipeline's own: {share['pipeline']:.0%}, of the engine's own: "
          f"{share['engine']:.0%} (target >= {GAIN_SHARE_TARGET:.0%})")
    print_table(table)


if __name__ == "__main__":
    main()
