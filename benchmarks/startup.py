"""Benchmark 4: seconds from process start to GET /ready answering 200 (CPU, tiny model).

    PYTHONPATH=src python benchmarks/startup.py [--runs 5] [--out benchmarks/results]

Starts `zimage-server serve` as a fresh process each run and polls /ready every 10 ms. The
server's own log lines give the split: pipeline load and warm-up; the rest is interpreter start,
imports (torch, diffusers, litestar) and binding. The full-size figure on a GPU comes from
benchmark 3 (gpu_full_size.py), which times building the real architecture and warming it up.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
from pathlib import Path

from common import (
    add_standard_options,
    free_port,
    median,
    print_table,
    serve_command,
    server_env,
    stop,
    tiny_models_dir,
    wait_ready,
    write_record,
)

LOADED = re.compile(r"loaded \S+ from .* in (\d+\.\d+) s")
WARMED = re.compile(r"warm-up took (\d+\.\d+) s")


def one_start(models_dir: Path, log_path: Path, threads: int) -> dict:
    port = free_port()
    command = serve_command(port, log_level="info")  # the load and warm-up lines are logged at info
    log_path.write_bytes(b"")
    with open(log_path, "ab") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=server_env(models_dir, threads, device="cpu"), stdout=log, stderr=log)
        try:
            wait_ready(process, f"http://127.0.0.1:{port}", timeout_s=300)
            ready_s = time.perf_counter() - started
        finally:
            stop(process)
    text = log_path.read_text(errors="replace")
    loaded, warmed = LOADED.search(text), WARMED.search(text)
    return {
        "ready_s": ready_s,
        "load_s": float(loaded.group(1)) if loaded else None,
        "warm_up_s": float(warmed.group(1)) if warmed else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    add_standard_options(parser, "one run, to check the script runs")
    args = parser.parse_args()
    runs = 1 if args.smoke else args.runs
    models_dir = tiny_models_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    samples = [one_start(models_dir, args.out / "startup.server.log", args.threads) for _ in range(runs)]

    def column(key: str) -> float | None:
        values = [s[key] for s in samples if s[key] is not None]
        return median(values) if values else None

    results = {
        "ready_s": column("ready_s"),
        "load_s": column("load_s"),
        "warm_up_s": column("warm_up_s"),
        "runs": samples,
    }
    rest = results["ready_s"] - (results["load_s"] or 0) - (results["warm_up_s"] or 0)
    results["imports_and_bind_s"] = rest
    table = [
        ["stage", "median s"],
        ["process start to /ready", results["ready_s"]],
        ["  pipeline load", results["load_s"] if results["load_s"] is not None else "n/a"],
        ["  warm-up", results["warm_up_s"] if results["warm_up_s"] is not None else "n/a"],
        ["  interpreter, imports, bind", rest],
    ]
    config = {"runs": runs, "threads": args.threads, "smoke": args.smoke, "device": "cpu", "model": "tiny random"}
    path = write_record(args.out, "startup", config, results, table)
    print(f"wrote {path}")
    print_table(table)


if __name__ == "__main__":
    main()
