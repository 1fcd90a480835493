"""Every benchmark script still runs (smoke mode) and writes the JSON record the docs are built from.

No timing is asserted: the machines are shared and only the scripts' shape is checked here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECORD_KEYS = {"benchmark", "date", "command", "machine", "config", "results", "table"}


def run_smoke(script: str, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("Z_IMAGE_") or k == "MODELS_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--smoke", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [record_path] = [p for p in out.glob("*.json")]
    record = json.loads(record_path.read_text())
    assert set(record) == RECORD_KEYS and record["config"]["smoke"] is True
    assert record["machine"].get("cpu") or record["machine"].get("gpu")
    # The table printed last is the one recorded: header plus at least one row.
    assert len(record["table"]) >= 2
    assert record["table"][0][0] in result.stdout.splitlines()[-len(record["table"]) - 1]
    return record["results"]


def test_server_overhead(tmp_path):
    results = run_smoke("server_overhead", tmp_path)
    for arm in ("direct", "http", "http_repeated_prompt"):
        assert results[arm]["median_s"] > 0 and len(results[arm]["samples_s"]) == 3
    assert results["target_ratio"] == 1.05
    assert results["meets_target"] == (results["http"]["ratio_to_direct"] <= results["target_ratio"])
    # Smoke mode runs the first full-size case once, and the lock-share measurement.
    (case,) = results["last_mile"].values()
    assert case["target_ms"] == 40 and case["pipeline_ms"] > 0 and len(case["samples_ms"]) == 1
    for row in results["lock"].values():
        assert 0 < row["lock_held_ms"] <= row["call_ms"]


def test_batching(tmp_path):
    results = run_smoke("batching", tmp_path)
    phases = {(row["clients"], row["max_batch_size"]) for row in results["phases"]}
    assert phases == {(1, 1), (1, 8), (4, 1), (4, 8)}
    assert all(row["images_per_s"] > 0 and row["p95_s"] >= row["p50_s"] for row in results["phases"])
    assert results["pipeline_alone"]["ratio"] > 0 and results["engine_alone"]["ratio"] > 0
    assert results["meets_target"] == (results["ratio_at_most_clients"] >= results["target_ratio"])


def test_startup(tmp_path):
    results = run_smoke("startup", tmp_path)
    assert results["ready_s"] > 0 and len(results["runs"]) == 1
    assert results["load_s"] is not None and results["warm_up_s"] is not None


def test_gpu_full_size_runs_every_section_on_cpu(tmp_path):
    sections = run_smoke("gpu_full_size", tmp_path)["sections"]
    assert list(sections) == ["startup", "stages", "offload", "compile", "http", "attention", "throughput", "quantized"]
    failed = {name: s["error"] for name, s in sections.items() if "error" in s or "skipped" in s}
    assert not failed
    assert sections["startup"]["attention_auto"]["backend"] == "native"
    for size in ("64", "128"):
        stage = sections["stages"][size]
        assert len(stage["step_s"]) == 2 and stage["text_encode_s"] > 0 and stage["whole_call_s"] > 0
    assert "native" in sections["attention"]["whole_call_s"] and "flash" in sections["attention"]["unusable"]
    assert set(sections["compile"]["128"]) == {"off", "regional", "speedup"}
    assert set(sections["http"]["median_s"]) == {"direct", "http_png", "http_jpeg", "http_repeated_prompt"}
    assert {"none", "model", "text_encoder", "restored"} <= set(sections["offload"])


def test_encoders(tmp_path):
    results = run_smoke("encoders", tmp_path)
    assert {"gradient", "smooth", "noisy", "real-ish"} == set(results["256"])
    assert results["256"]["noisy"]["fpng"]["vs_default"] < 1.1
    assert set(results["four_png"]) == set(results["four_webp"]) == {"loop_median_ms", "encode_images_median_ms"}


def test_lora(tmp_path):
    results = run_smoke("lora", tmp_path)
    assert set(results["calls"]) == {"no slot", "zero slot", "slot with a LoRA"}
    assert all(len(arm["samples_s"]) == 3 and arm["median_s"] > 0 for arm in results["calls"].values())
    assert len(results["switches"]) == 4 and results["repeat_activate_s"] >= 0
    slot = results["full_size_slot"]
    assert slot["linear_layers"] > 200 and 0 < slot["extra_linear_work"] < 0.1


def test_memory_plan(tmp_path):
    results = run_smoke("memory_plan", tmp_path)
    assert set(results["activation_fit"]) == {"text_encoder", "transformer_step", "vae_decode"}
    assert len(results["checks"]) == 11 and all(c["simulated_bytes"] > 0 for c in results["checks"])
    assert sum(c["fresh"] for c in results["checks"]) == 2
    # The tiny model's megabyte is mostly fixed costs the lines do not separate; full size is within 2 MiB.
    assert results["max_abs_error_bytes"] < 2**20


def test_model_thread(tmp_path):
    results = run_smoke("model_thread", tmp_path)
    wake = results.pop("wake_ms")
    placements = [results.pop("full-size_placement_ms"), results.pop("tiny_placement_ms")]
    [row] = results.values()
    assert wake > 0
    assert all(placement["walked"] > 10 * placement["pinned"] > 0 for placement in placements)
    assert set(row["median_ms"]) == {"plain", "rotating", "one_thread", "http", "pipeline"}
    assert all(value > 0 for value in row["median_ms"].values()) and row["http_to_plain"] > 0


def test_provenance(tmp_path):
    results = run_smoke("provenance", tmp_path)
    assert set(results) == {"png", "jpeg", "webp"} and all(row["on_ms"] > 0 for row in results.values())


def test_hires(tmp_path):
    results = run_smoke("hires", tmp_path)
    assert set(results) == {"Latent", "Lanczos"} and all(row["ratio"] > 0 for row in results.values())


def test_enhance(tmp_path):
    results = run_smoke("enhance", tmp_path)
    assert results["tiny_tokens_per_s"] > 0 and results["kv_cache_mib"] > 0
    assert results["variation_0"]["moved"] == 0 and results["variation_0.3"]["moved"] > 0


def test_upscale_tiles(tmp_path):
    results = run_smoke("upscale_tiles", tmp_path)
    assert set(results) == {"untiled", "tile 96"} and all(row["seconds"] > 0 for row in results.values())


def test_store(tmp_path):
    results = run_smoke("store", tmp_path)
    overhead, listing = results["request_overhead"], results["listing"]
    assert overhead["none_ms"] > 0 and overhead["folder_ms"] > 0 and overhead["images_kept"] == 4
    assert listing["images"] == 1000 and listing["first_page_ms"] > 0 and listing["middle_page_ms"] > 0


@pytest.mark.parametrize(
    "script",
    [
        "server_overhead",
        "batching",
        "startup",
        "gpu_full_size",
        "encoders",
        "lora",
        "memory_plan",
        "model_thread",
        "provenance",
        "store",
    ],
)
def test_help_names_the_command(script):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--help"],
        env=os.environ | {"PYTHONPATH": str(REPO / "src")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "--smoke" in result.stdout and "--out" in result.stdout
