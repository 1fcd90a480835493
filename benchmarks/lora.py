"""Benchmark 5: what LoRA costs on the tiny model: a switch between LoRA sets, and a call with the slot.

    PYTHONPATH=src python benchmarks/lora.py [--iterations 30] [--out benchmarks/results]

Three runners over three copies of the tiny pipeline, their calls interleaved in one process
(A, B, C, A, B, C, ...): no slot at all (Z_IMAGE_LORA_MAX_RANK=0), the slot holding zeros (a plain
request on a LoRA-ready server), and the slot holding a rank-8 LoRA. Then the slot's `activate`
between four LoRA sets in turn, the files already in the LRU (what a switch costs on the request
path), and an activate of the set already active. Medians, 64x64, 2 steps.
"""

from __future__ import annotations

import argparse
import time

from common import add_standard_options, median, print_table, set_threads, tiny_models_dir, write_record

SLOT_RANK = 32
LORA_RANK = 8
SWITCHES = ((("a", 0.8),), (("b", 1.0), ("c", -0.5)), (), (("a", 0.5), ("b", 0.5)))


def write_loras(folder, transformer) -> None:
    import torch
    from safetensors.torch import save_file

    from zimage_server.loras import lora_target_modules

    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate("abc"):
        generator = torch.Generator().manual_seed(seed)
        state_dict = {}
        for module, linear in lora_target_modules(transformer).items():
            if module.startswith(("layers.", "noise_refiner.", "context_refiner.")):
                state_dict[f"transformer.{module}.lora_A.weight"] = 0.1 * torch.randn(
                    LORA_RANK, linear.in_features, generator=generator
                )
                state_dict[f"transformer.{module}.lora_B.weight"] = 0.1 * torch.randn(
                    linear.out_features, LORA_RANK, generator=generator
                )
        save_file(state_dict, folder / f"{name}.safetensors")


def full_size_slot(rank: int = 64) -> dict:
    """What the slot costs the full-size transformer, computed from its real config on the meta device
    (no weights): rank x (in + out) values per linear layer, against the layers' own multiply-adds."""
    import torch
    from diffusers import ZImageTransformer2DModel

    from zimage_server.architecture import FULL_SIZE

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**FULL_SIZE["transformer"])
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    per_rank = sum(m.in_features + m.out_features for m in linears)
    weights = sum(m.in_features * m.out_features for m in linears)
    return {
        "linear_layers": len(linears),
        "rank": rank,
        "slot_params": rank * per_rank,
        "slot_gib_bf16": rank * per_rank * 2 / 2**30,
        "extra_linear_work": rank * per_rank / weights,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=30)
    add_standard_options(parser, "3 iterations, to check that the script runs")
    args = parser.parse_args()
    iterations = 3 if args.smoke else args.iterations
    set_threads(args.threads)

    from zimage_server.policy import BatchPolicy
    from zimage_server.runner import load_runner
    from zimage_server.settings import Settings
    from zimage_server.specs import CallParams, GenerationSpec

    models_dir = tiny_models_dir()
    settings = Settings(models_dir=models_dir, device="cpu", lora_max_rank=SLOT_RANK)
    no_slot = load_runner(settings.replace(lora_max_rank=0))
    write_loras(settings.loras_dir, no_slot.pipeline.transformer)
    zero_slot, with_lora = load_runner(settings), load_runner(settings)

    def call(runner, loras=()) -> float:
        params = CallParams("generate", 64, 64, num_inference_steps=2, guidance_scale=0.0, loras=loras)
        started = time.perf_counter()
        BatchPolicy(runner, 1).run([GenerationSpec("a photo of a cat", None, (0,), params)])
        return time.perf_counter() - started

    arms = {"no slot": (no_slot, ()), "zero slot": (zero_slot, ()), "slot with a LoRA": (with_lora, SWITCHES[0])}
    for runner, loras in arms.values():
        call(runner, loras)  # the LoRA file is read and swapped in here, outside the timing
    calls: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(iterations):
        for name, (runner, loras) in arms.items():
            calls[name].append(call(runner, loras))

    slot = zero_slot.lora_slot
    for key in SWITCHES:
        slot.activate(key)  # every file into the LRU
    switches: dict[str, list[float]] = {repr(key): [] for key in SWITCHES}
    for _ in range(iterations):
        for key in SWITCHES:
            started = time.perf_counter()
            slot.activate(key)
            switches[repr(key)].append(time.perf_counter() - started)
    started = time.perf_counter()
    slot.activate(SWITCHES[-1])
    repeat_s = time.perf_counter() - started

    base = median(calls["no slot"])
    table = [["what", "median ms", "vs no slot"]]
    table += [[f"call, {name}", 1000 * median(samples), median(samples) / base] for name, samples in calls.items()]
    table += [[f"switch to {name}", 1000 * median(samples), ""] for name, samples in switches.items()]
    table += [["activate the set already active", 1000 * repeat_s, ""]]
    full = full_size_slot()
    print(
        f"full-size slot at rank {full['rank']}: {full['linear_layers']} linear layers, {full['slot_params'] / 1e6:.0f} M "
        f"parameters ({full['slot_gib_bf16']:.2f} GiB bf16), +{100 * full['extra_linear_work']:.1f}% of their multiply-adds"
    )
    print_table(table)
    results = {
        "calls": {name: {"median_s": median(samples), "samples_s": samples} for name, samples in calls.items()},
        "switches": {name: {"median_s": median(samples), "samples_s": samples} for name, samples in switches.items()},
        "repeat_activate_s": repeat_s,
        "full_size_slot": full,
    }
    config = {"smoke": args.smoke, "iterations": iterations, "threads": args.threads, "slot_rank": SLOT_RANK,
              "lora_rank": LORA_RANK, "size": "64x64", "steps": 2}
    write_record(args.out, "lora", config, results, table)


if __name__ == "__main__":
    main()
