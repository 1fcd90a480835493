"""Benchmark 8: the model's one thread (CPU, tiny model, torch's default thread count).

    PYTHONPATH=src python benchmarks/model_thread.py [--rounds 5] [--iterations 15] [--sizes 64,256] [--steps 4]

Each arm runs alone, in its own process, one after another, with the same requests (a new prompt
and seed each, so no prompt cache helps); the arms take turns for --rounds rounds, and each ratio
is the median over rounds of that round's medians (this machine drifts by 10-15% between runs):
- plain: a plain `ZImagePipeline` call in a fresh process, the reference;
- server: the same request over HTTP against a real `zimage-server serve` child; its end-to-end
  time, and `pipeline_ms` from its own JSON access log;
- rotating / one thread: `ModelRunner.run_call` in a child process, from a new pool thread per call
  (what `asyncio.to_thread` gave the batcher before) against from one thread for everything.
Last, in this process, the wake after a sleep (Z_IMAGE_IDLE_UNLOAD_S): `ModelRunner.sleep()` then
`wake()` (reload from disk and warm-up), five times, median.
Targets (issue 25): server pipeline_ms within 5% of plain at 256x256; HTTP at most 1.05x plain at
64x64 and 256x256. Threads are left at torch's default (one OpenMP team per thread that runs torch
work is the effect measured), unlike benchmarks 1 and 2's --threads 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx

from common import (
    REPO,
    add_standard_options,
    median,
    print_table,
    running_server,
    server_env,
    tiny_models_dir,
    write_record,
)

TARGET_PIPELINE = 1.05  # server pipeline_ms / plain, at 256x256
TARGET_HTTP = 1.05  # server end to end / plain, at 64x64 and 256x256
PROMPT = "a lighthouse at dawn, study {}"

# The in-process arms, run as `python model_thread.py --child ARM MODELS_DIR SIZE STEPS ITERATIONS`;
# each prints its per-call seconds as one JSON list.
CHILD_ARMS = ("plain", "rotating", "one_thread")


def child(arm: str, models_dir: Path, size: int, steps: int, iterations: int) -> list[float]:
    import concurrent.futures

    import torch

    if arm == "plain":
        from diffusers import ZImagePipeline

        pipeline = ZImagePipeline.from_pretrained(models_dir / "z-image-turbo")
        pipeline.set_progress_bar_config(disable=True)

        def call(i: int) -> None:
            generator = torch.Generator("cpu").manual_seed(100 + i)
            kwargs = dict(width=size, height=size, num_inference_steps=steps, guidance_scale=0.0)
            pipeline(PROMPT.format(i), generator=generator, **kwargs).images[0]

        run = call
    else:
        from zimage_server.runner import load_runner
        from zimage_server.settings import Settings
        from zimage_server.specs import CallParams, GenerationSpec, ImageRow

        settings = Settings(models_dir=models_dir, device="cpu")
        params = CallParams("generate", size, size, num_inference_steps=steps, guidance_scale=0.0)

        if arm == "rotating":
            # As before the model thread: every runner function runs on its caller's thread, the
            # model loads on one pool thread and each call runs on whichever the pool hands out.
            from zimage_server.model_thread import ModelThread

            ModelThread.is_current = property(lambda self: True)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                runner = pool.submit(load_runner, settings).result()
        else:
            runner = load_runner(settings)  # on the model thread, as every call below

        def call(i: int) -> None:
            runner.run_call(params, [ImageRow(GenerationSpec(PROMPT.format(i), None, (100 + i,), params), 100 + i)])

        if arm == "rotating":

            def run(i: int) -> None:
                with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a new thread per call
                    pool.submit(call, i).result()

        else:
            run = call

    seconds = []
    for i in range(-3, iterations):  # three warm-up calls, not recorded
        started = time.perf_counter()
        run(i)
        if i >= 0:
            seconds.append(time.perf_counter() - started)
    return seconds


def run_child(arm: str, models_dir: Path, size: int, steps: int, iterations: int) -> list[float]:
    command = [sys.executable, __file__, "--child", arm, str(models_dir), str(size), str(steps), str(iterations)]
    out = subprocess.run(command, env=server_env(models_dir), capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.splitlines()[-1])


def server_arm(models_dir: Path, log_path: Path, size: int, steps: int, iterations: int) -> dict:
    ids, seconds = [], []
    with running_server(models_dir, log_path, log_level="info", device="cpu", log_format="json") as base:
        with httpx.Client(timeout=120) as client:
            for i in range(-3, iterations):
                body = {
                    "prompt": PROMPT.format(i),
                    "size": f"{size}x{size}",
                    "num_inference_steps": steps,
                    "seed": 100 + i,
                }
                started = time.perf_counter()
                response = client.post(
                    f"{base}/v1/images/generations", json=body, headers={"X-Request-ID": f"thread-{size}-{i}"}
                )
                response.raise_for_status()
                response.json()["data"][0]["b64_json"]
                if i >= 0:
                    seconds.append(time.perf_counter() - started)
                    ids.append(f"thread-{size}-{i}")
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line.get("logger") == "zimage_server.access"}
    return {"http": seconds, "pipeline": [access[i]["pipeline_ms"] / 1000 for i in ids]}


def wake_ms(models_dir: Path, cycles: int) -> float:
    """Median ms of a reload after sleeping (load from disk and warm-up), tiny model on the CPU."""
    from zimage_server.runner import load_runner
    from zimage_server.settings import Settings

    runner = load_runner(Settings(models_dir=models_dir, device="cpu"))
    seconds = []
    for _ in range(cycles):
        runner.sleep()
        seconds.append(runner.wake())
    return 1000 * median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=15, help="timed calls per arm and round")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", nargs=5, metavar=("ARM", "MODELS_DIR", "SIZE", "STEPS", "ITERATIONS"))
    add_standard_options(parser, "a few iterations at 64x64, to check the script runs", threads=False)
    args = parser.parse_args()
    if args.child:
        arm, models_dir, size, steps, iterations = args.child
        print(json.dumps(child(arm, Path(models_dir), int(size), int(steps), int(iterations))))
        return
    iterations = 3 if args.smoke else args.iterations
    args.rounds = 1 if args.smoke else args.rounds
    sizes = [64] if args.smoke else [int(s) for s in args.sizes.split(",")]
    models_dir = tiny_models_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    table = [["size", "plain ms", "pipeline_ms", "x plain", "HTTP ms", "x plain", "rotating ms", "one thread ms", "x"]]
    for size in sizes:
        rounds: list[dict[str, float]] = []  # per round, each arm's median seconds
        samples: dict[str, list[float]] = {}
        for round_ in range(args.rounds):
            arms = {arm: run_child(arm, models_dir, size, args.steps, iterations) for arm in CHILD_ARMS}
            log_path = args.out / f"model_thread.server-{size}.log"
            log_path.unlink(missing_ok=True)
            arms.update(server_arm(models_dir, log_path, size, args.steps, iterations))
            rounds.append({arm: median(values) for arm, values in arms.items()})
            for arm, values in arms.items():
                samples.setdefault(arm, []).extend(values)

        def ratio(arm: str, reference: str = "plain") -> float:
            return median([r[arm] / r[reference] for r in rounds])

        medians = {arm: 1000 * median(values) for arm, values in samples.items()}
        result = {
            "median_ms": medians,
            "pipeline_to_plain": ratio("pipeline"),
            "http_to_plain": ratio("http"),
            "rotating_to_one_thread": ratio("rotating", "one_thread"),
            "one_thread_to_plain": ratio("one_thread"),
            "round_medians_s": rounds,
        }
        result["meets_http_target"] = result["http_to_plain"] <= TARGET_HTTP
        if size == 256:
            result["meets_pipeline_target"] = result["pipeline_to_plain"] <= TARGET_PIPELINE
        results[f"{size}x{size}"] = result
        table.append(
            [
                f"{size}x{size}",
                medians["plain"],
                medians["pipeline"],
                result["pipeline_to_plain"],
                medians["http"],
                result["http_to_plain"],
                medians["rotating"],
                medians["one_thread"],
                result["rotating_to_one_thread"],
            ]
        )
    results["wake_ms"] = wake_ms(models_dir, cycles=2 if args.smoke else 5)
    table.append(["wake after sleep", results["wake_ms"], "", "", "", "", "", "", ""])
    print_table(table)
    config = {"rounds": args.rounds, "iterations": iterations, "sizes": sizes, "steps": args.steps, "smoke": args.smoke}
    write_record(args.out, "model_thread", config, results, table)


if __name__ == "__main__":
    main()
