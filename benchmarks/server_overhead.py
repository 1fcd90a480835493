"""Benchmark 1: what the server adds to a pipeline call (CPU, tiny model).

    PYTHONPATH=src python benchmarks/server_overhead.py [--iterations 40] [--out benchmarks/results]

Interleaves, in one run: a direct `ZImagePipeline` call in this process, and the same request end
to end over HTTP against a real `zimage-server serve` child process (JSON, b64 PNG, decoded
here). Each iteration uses a new prompt so the server's prompt cache cannot help; a third arm
repeats one prompt to show what the cache saves. Target: HTTP median <= 1.10x direct.
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

TARGET_RATIO = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
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
    path = write_record(args.out, "server_overhead", config, results, table)
    print(f"wrote {path}")
    print(
        f"HTTP / direct = {ratio:.3f}x, median of per-iteration ratios {results['http']['paired_ratio_median']:.3f}x "
        f"(target <= {TARGET_RATIO}x: {'met' if results['meets_target'] else 'missed'})"
    )
    print_table(table)


if __name__ == "__main__":
    main()
