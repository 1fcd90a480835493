"""Shared pieces of the benchmark scripts: a real `serve` process, timing statistics, the JSON record.

Every script interleaves the variants it compares inside one run (A, B, A, B, ...) and reports
medians and their ratio, because the machines we measure on are shared and noisy: only ratios
from one run mean anything, never absolute numbers from two runs.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results"


def machine() -> dict:
    """What ran the benchmark: CPU model (as lscpu names it), cores, GPU if any, library versions."""
    info: dict = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import diffusers
        import torch

        info["torch"], info["diffusers"] = torch.__version__, diffusers.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    return info


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); with few samples that is the honest statement."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_models_dir() -> Path:
    """A temp MODELS_DIR holding the tiny random-weight Turbo pipeline (written once per process)."""
    from zimage_server.testing import write_tiny_pipeline

    root = Path(tempfile.mkdtemp(prefix="zimage-bench-"))
    write_tiny_pipeline(root / "z-image-turbo", "turbo")
    return root


def serve_command(port: int, log_level: str = "warning") -> list[str]:
    return [sys.executable, "-m", "zimage_server.cli", "serve", "--port", str(port), "--log-level", log_level]


def server_env(models_dir: Path, threads: int | None = None, **settings: str) -> dict[str, str]:
    """The environment of a `serve` child: ours minus any Z_IMAGE_* settings, plus these ones."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("Z_IMAGE_") or k == "MODELS_DIR")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env["MODELS_DIR"] = str(models_dir)
    env["Z_IMAGE_STORE"] = "none"  # measured without keeping images, unless a benchmark asks for a store
    env.update({f"Z_IMAGE_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def wait_ready(process: subprocess.Popen, base_url: str, timeout_s: float, poll_s: float = 0.01) -> float:
    """Seconds until GET /ready answers 200; raises if the process dies or the timeout passes."""
    started = time.perf_counter()
    with httpx.Client(timeout=2) as client:
        while time.perf_counter() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
            try:
                if client.get(f"{base_url}/ready").status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
    raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Stop a server we started, by its own process handle."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def add_standard_options(parser, smoke_help: str, threads: bool = True) -> None:
    """--out, --smoke and (for the CPU scripts) --threads, the same in every script."""
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON record")
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    if threads:
        parser.add_argument(
            "--threads",
            type=int,
            default=1,
            help="torch CPU threads, here and in each server (default 1: on shared cores, OpenMP teams of 2+ "
            "stall whenever a neighbour takes a core, which swamps the differences measured)",
        )


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


@contextmanager
def running_server(
    models_dir: Path,
    log_path: Path,
    threads: int | None = None,
    ready_timeout_s: float = 300,
    log_level: str = "warning",
    **settings: str,
) -> Iterator[str]:
    """A real `zimage-server serve` child process on a loopback port; yields its base URL."""
    port = free_port()
    env = server_env(models_dir, threads, **settings)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(serve_command(port, log_level), env=env, stdout=log, stderr=log)
        try:
            wait_ready(process, f"http://127.0.0.1:{port}", ready_timeout_s)
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(process)


def generate_over_http(client: httpx.Client, base_url: str, body: dict) -> dict:
    response = client.post(f"{base_url}/v1/images/generations", json=body)
    response.raise_for_status()
    return response.json()


def write_record(out_dir: Path, name: str, config: dict, results: dict, table: list[list]) -> Path:
    """benchmarks/results/<name>.json: machine, date, the exact command, config, results and the printed table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "config": config,
        "results": results,
        "table": table,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(rows: list[list]) -> None:
    """A plain fixed-width table; the first row is the header."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for index, row in enumerate(cells):
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
