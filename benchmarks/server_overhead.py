"""Benchmark 1: what the server adds to a pipeline call (CPU, tiny model).

    PYTHONPATH=src python benchmarks/server_overhead.py [--iterations 40] [--out benchmarks/results]

Interleaves, in one run: a direct `ZImagePipeline` call in this process, and the same request end
to end over HTTP against a real `zimage-server serve` child process (JSON, b64 PNG, decoded
here). Each iteration uses a new prompt so the server's prompt cache cannot help; a third arm
repeats one prompt to show what the cache saves. Target: HTTP median <= 1.05x direct.

Then the last mile at full sizes: requests at 1024x1024 (PNG n=1 and n=4, JPEG, WebP) and
2048x2048 (PNG) against a server that writes its access log as JSON, and for each the median of
`total_ms - pipeline_ms` from those lines: what the server adds after the pipeline call (copy to
the host, conversion, encoding, sending). Targets: 40, 80, 40, 40 and 120 ms. And, in this
process, how long a 1024x1024 call holds the GPU lock against the whole call: the host copy and
conversion to images happen after the lock is released.
"""

from __future__ import annotations

import argparse
import base64
import time

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

TARGET_RATIO = 1.05
# (name, size, n, output_format, target ms for total_ms - pipeline_ms)
LAST_MILE = (
    ("png 1024 n=1", 1024, 1, "png", 40),
    ("png 1024 n=4", 1024, 4, "png", 80),
    ("jpeg 1024 n=1", 1024, 1, "jpeg", 40),
    ("webp 1024 n=1", 1024, 1, "webp", 40),
    ("png 2048 n=1", 2048, 1, "png", 120),
)


def last_mile(models_dir, log_path, threads: int, iterations: int) -> dict:
    """total_ms - pipeline_ms per case, from the server's own JSON access lines (2 steps: the pipeline's
    length does not matter here, only what comes after it)."""
    import json

    cases = LAST_MILE if iterations > 1 else LAST_MILE[:1]
    ids: dict[str, list[str]] = {name: [] for name, *_ in cases}
    with running_server(models_dir, log_path, threads, log_level="info", device="cpu", log_format="json") as base:
        with httpx.Client(timeout=600) as client:
            for i in range(-1, iterations):  # one warm-up round per case, not recorded
                for name, size, n, output_format, _ in cases:
                    request_id = f"lastmile-{name.replace(' ', '-')}-{i}"
                    body = {"prompt": f"a harbour at night {i}", "size": f"{size}x{size}", "n": n,
                            "num_inference_steps": 2, "output_format": output_format}
                    response = client.post(f"{base}/v1/images/generations", json=body, headers={"X-Request-ID": request_id})
                    response.raise_for_status()
                    if i >= 0:
                        ids[name].append(request_id)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("logger") == "zimage_server.access"}
    results = {}
    for name, size, n, output_format, target in cases:
        added = [access[i]["total_ms"] - access[i]["pipeline_ms"] for i in ids[name]]
        results[name] = {"median_ms": median(added), "target_ms": target, "samples_ms": added,
                         "pipeline_ms": median([access[i]["pipeline_ms"] for i in ids[name]])}
    return results


def lock_share(models_dir, iterations: int, size: int = 1024) -> dict:
    """Seconds the GPU lock is held against the whole run_call, size x size, 2 steps, n=1 and n=4."""
    from zimage_server.runner import load_runner
    from zimage_server.settings import Settings
    from zimage_server.specs import CallParams, GenerationSpec, ImageRow

    runner = load_runner(Settings(models_dir=models_dir, device="cpu"))
    held: list[float] = []

    class TimedLock:
        """The runner's lock, timing how long each holder keeps it."""

        def __init__(self, lock) -> None:
            self.lock = lock

        def __enter__(self):
            self.lock.acquire()
            self.since = time.perf_counter()

        def __exit__(self, *exc) -> None:
            held.append(time.perf_counter() - self.since)
            self.lock.release()

    runner.lock = TimedLock(runner.lock)
    results = {}
    for n in (1, 4):
        params = CallParams("generate", size, size, num_inference_steps=2, guidance_scale=0.0)
        whole: list[float] = []
        held.clear()
        for i in range(iterations + 1):
            rows = [ImageRow(GenerationSpec(f"a harbour {i}", None, tuple(range(n)), params), seed) for seed in range(n)]
            started = time.perf_counter()
            runner.run_call(params, rows)
            whole.append(time.perf_counter() - started)
        whole, locked = whole[1:], held[1:]  # the first call warms up the size
        results[f"n={n}"] = {"call_ms": 1000 * median(whole), "lock_held_ms": 1000 * median(locked),
                             "after_lock_ms": 1000 * (median(whole) - median(locked))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--large-iterations", type=int, default=5, help="requests per full-size case")
    add_standard_options(parser, "a few iterations, to check the script runs")
    args = parser.parse_args()
    iterations = 3 if args.smoke else args.iterations

    import torch
    from diffusers import ZImagePipeline

    set_threads(args.threads)
    models_dir = tiny_models_dir()
    pipeline = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo")
    pipeline.set_progress_bar_config(disable=True)
    size, steps = args.size, args.steps

    def direct(prompt: str, seed: int) -> float:
        started = time.perf_counter()
        pipeline(
            prompt,
            width=size,
            height=size,
            num_inference_steps=steps,
            guidance_scale=0.0,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
        return time.perf_counter() - started

    args.out.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[float]] = {"direct": [], "http": [], "http_repeated_prompt": []}
    with running_server(models_dir, args.out / "server_overhead.server.log", args.threads, device="cpu") as base_url:
        with httpx.Client(timeout=120) as client:

            def http(prompt: str, seed: int) -> float:
                body = {"prompt": prompt, "size": f"{size}x{size}", "num_inference_steps": steps, "seed": seed}
                started = time.perf_counter()
                data = generate_over_http(client, base_url, body)["data"]
                base64.b64decode(data[0]["b64_json"])
                return time.perf_counter() - started

            arms = {
                "direct": lambda i: direct(f"a lighthouse at dawn, study {i}", 100 + i),
                "http": lambda i: http(f"a lighthouse at dawn, study {i}", 100 + i),
                "http_repeated_prompt": lambda i: http("a lighthouse at dawn", 100 + i),
            }
            for i in range(-3, iterations):  # three warm-up rounds, not recorded
                # Rotate the order every iteration so drift on a shared machine hits every arm alike.
                names = list(arms)
                names = names[i % 3 :] + names[: i % 3]
                for name in names:
                    elapsed = arms[name](i)
                    if i >= 0:
                        samples[name].append(elapsed)

    base = median(samples["direct"])
    results = {
        name: {
            "median_s": median(values),
            "p10_s": percentile(values, 10),
            "p90_s": percentile(values, 90),
            "ratio_to_direct": median(values) / base,
            "samples_s": values,
        }
        for name, values in samples.items()
    }
    for name in ("http", "http_repeated_prompt"):
        # Each iteration ran every arm back to back, so per-iteration ratios cancel slow load drift.
        pairs = [b / a for a, b in zip(samples["direct"], samples[name])]
        results[name]["paired_ratio_median"] = median(pairs)
    ratio = results["http"]["ratio_to_direct"]
    results["target_ratio"] = TARGET_RATIO
    results["meets_target"] = ratio <= TARGET_RATIO
    table = [["arm", "median ms", "p10 ms", "p90 ms", "x direct"]] + [
        [
            name,
            results[name]["median_s"] * 1000,
            results[name]["p10_s"] * 1000,
            results[name]["p90_s"] * 1000,
            results[name]["ratio_to_direct"],
        ]
        for name in samples
    ]
    config = {
        "size": size,
        "steps": steps,
        "iterations": iterations,
        "threads": args.threads,
        "smoke": args.smoke,
        "device": "cpu",
    }
    print(
        f"HTTP / direct = {ratio:.3f}x, median of per-iteration ratios {results['http']['paired_ratio_median']:.3f}x "
        f"(target <= {TARGET_RATIO}x: {'met' if results['meets_target'] else 'missed'})"
    )
    print_table(table)

    large_iterations = 1 if args.smoke else args.large_iterations
    results["last_mile"] = last_mile(models_dir, args.out / "server_overhead.large.log", args.threads, large_iterations)
    lock_size = 256 if args.smoke else 1024  # the smoke checks the code, not the figure
    results["lock"] = lock_share(models_dir, large_iterations, lock_size)
    lock_table = [[f"{lock_size}x{lock_size} call", "whole ms", "lock held ms", "after the lock ms"]] + [
        [name, row["call_ms"], row["lock_held_ms"], row["after_lock_ms"]] for name, row in results["lock"].items()
    ]
    print_table(lock_table)
    print()
    table = [["case", "total - pipeline ms", "target ms", "pipeline ms"]] + [
        [name, row["median_ms"], row["target_ms"], row["pipeline_ms"]] for name, row in results["last_mile"].items()
    ]
    config["large_iterations"] = large_iterations
    path = write_record(args.out, "server_overhead", config, results, table)
    print(f"wrote {path}")
    print_table(table)


if __name__ == "__main__":
    main()
