"""Benchmark 7: simulated peak GPU memory per offload mode, and the memory model's fit to it. No GPU needed.

    PYTHONPATH=src python benchmarks/memory_plan.py [--out DIR]     # full size, about 2-3 CPU minutes
    PYTHONPATH=src python benchmarks/memory_plan.py --smoke         # tiny config, seconds

Runs zimage_server.memory_sim (fake tensors, the real placement code and pipeline call) for each
offload mode at 1024x1024, batch 1 and 4, batch 4 also with VAE slicing; fits the activation
lines of zimage_server.memory_plan from the mode-none runs (batch 1 and 4), prints the fit to
paste into ACTIVATION_FIT, then checks the model against every run and against fresh points
(512x512 x1, 768x768 x2) the fit never saw.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from common import add_standard_options, print_table, write_record
from zimage_server.architecture import FULL_SIZE, TINY
from zimage_server.memory_plan import (
    ACTIVATION_FIT,
    CAPTION_TOKENS,
    GIB,
    OFFLOAD_MODES,
    PIXELS_PER_IMAGE_TOKEN,
    predict_peak,
)
from zimage_server.memory_sim import STAGES, simulate_call


def fit_line(x1: float, y1: int, x2: float, y2: int) -> tuple[int, float]:
    slope = (y2 - y1) / (x2 - x1)
    return round(y1 - slope * x1), slope


def stage_x(stage: str, width: int, height: int, batch: int) -> float:
    """The fit's variable for a stage (memory_plan's docstring), unsliced."""
    if stage == "text_encoder":
        return batch
    if stage == "transformer_step":
        return batch * (width * height / PIXELS_PER_IMAGE_TOKEN + CAPTION_TOKENS)
    return width * height * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per call (every step peaks alike)")
    add_standard_options(parser, "tiny config: checks the code, not the figures", threads=False)
    args = parser.parse_args()
    config, size, fresh = (TINY, 128, ((64, 1), (96, 2))) if args.smoke else (FULL_SIZE, 1024, ((512, 1), (768, 2)))
    started = time.perf_counter()
    cells = [(mode, batch, sliced) for mode in OFFLOAD_MODES for batch, sliced in ((1, False), (4, False), (4, True))]
    runs = {}
    for mode, batch, sliced in cells:
        runs[mode, size, batch, sliced] = simulate_call(
            config, offload=mode, width=size, height=size, batch=batch, vae_slicing=sliced, steps=args.steps
        )
        print(f"[{time.perf_counter() - started:6.1f} s] {mode} x{batch}{' sliced' if sliced else ''}: "
              f"{runs[mode, size, batch, sliced].peak_bytes / GIB:.3f} GiB", flush=True)
    for fresh_size, batch in fresh:
        runs["none", fresh_size, batch, False] = simulate_call(
            config, offload="none", width=fresh_size, height=fresh_size, batch=batch, vae_slicing=False, steps=args.steps
        )

    one, four = runs["none", size, 1, False], runs["none", size, 4, False]
    sizes = one.sizes
    weights = sizes.text_encoder + sizes.transformer + sizes.vae
    fit = {
        stage: fit_line(
            stage_x(stage, size, size, 1), one.stages[stage].peak - weights,
            stage_x(stage, size, size, 4), four.stages[stage].peak - weights,
        )
        for stage in STAGES
    }
    # Predictions use the fit just made, so the check is of the model's form, not of stale constants.
    ACTIVATION_FIT.update(fit)
    checks = []
    for (mode, width, batch, sliced), run in runs.items():
        predicted = predict_peak(sizes, mode, width, width, batch, sliced).peak_bytes
        checks.append({
            "offload": mode, "size": width, "batch": batch, "vae_slicing": sliced, "simulated_bytes": run.peak_bytes,
            "predicted_bytes": predicted, "error_bytes": predicted - run.peak_bytes,
            "fresh": (width, batch) in fresh,
            "stages": {name: {"start": s.start, "peak": s.peak} for name, s in run.stages.items()},
        })

    def gib(value: int) -> str:
        return f"{value / GIB:.2f}"

    table = [["placement", f"{size} x1", f"{size} x4", f"{size} x4, VAE slicing"]]
    for mode in OFFLOAD_MODES:
        table.append([mode, *(gib(runs[mode, size, b, s].peak_bytes) for b, s in ((1, False), (4, False), (4, True)))])
    table.append(["(check)", "simulated", "predicted", "error (MiB)"])
    for check in checks:
        label = f"{check['offload']} {check['size']} x{check['batch']}{' sliced' if check['vae_slicing'] else ''}"
        label += " (fresh)" if check["fresh"] else ""
        table.append([label, gib(check["simulated_bytes"]), gib(check["predicted_bytes"]),
                      f"{check['error_bytes'] / 2**20:+.0f}"])
    print("ACTIVATION_FIT = {")
    for stage, (a, b) in fit.items():
        print(f'    "{stage}": ({a}, {b!r}),')
    print("}")
    results = {
        "weight_bytes": dataclasses.asdict(sizes),
        "activation_fit": {stage: {"a": a, "b": b} for stage, (a, b) in fit.items()},
        "checks": checks,
        "max_abs_error_bytes": max(abs(c["error_bytes"]) for c in checks),
        "elapsed_s": time.perf_counter() - started,
    }
    settings = {"smoke": args.smoke, "size": size, "steps": args.steps, "dtype": "bf16", "max_sequence_length": 512,
                "architecture": "smoke (tiny)" if args.smoke else "full size (architecture.FULL_SIZE)"}
    write_record(args.out, "memory_plan", settings, results, table)
    print_table(table)


if __name__ == "__main__":
    main()
