"""Benchmark 12: the prompt enhancer's cost, and how far seed variation moves images (CPU, tiny model).

    PYTHONPATH=src python benchmarks/enhance.py [--tokens 400] [--repeats 3] [--seeds 8]

Enhancer: the resident backend (the text encoder as a causal LM, resident_lm.py) writing
--tokens new tokens, greedy (the tiny random encoder's greedy answer is one newline token after
another, so it never stops early: exactly --tokens tokens), timed end to end: tokens per
second on this machine's tiny model, and what a full-size Qwen3-4B costs, estimated from its
size (no GPU here; the formula is printed, docs/enhance.md explains it).

Variation: --seeds seeds at 64x64, 4 steps, at variation_strength 0, 0.1 and 0.3: the mean
absolute pixel difference (0..255) of each image from the same seed's image at 0 ("moved"), and
between images of neighbouring seeds ("between seeds"). The tiny model draws noise, so these say
how the mechanism scales, not how real images look.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from common import add_standard_options, median, print_table, set_threads, tiny_models_dir, write_record

# Qwen3-4B at bf16: weights read once per new token (the decode is memory-bound).
QWEN3_4B_WEIGHT_BYTES = 8.0e9
H100_BANDWIDTH = 3.35e12  # bytes/s, SXM HBM3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=8)
    add_standard_options(parser, "few tokens and seeds, to check the script runs")
    args = parser.parse_args()
    set_threads(args.threads)

    import dataclasses

    from zimage_server.memory_plan import ENHANCER_KV_BYTES_PER_TOKEN
    from zimage_server.prompt_enhancer import build_messages
    from zimage_server.resident_lm import ResidentLanguageModel
    from zimage_server.runner import load_runner
    from zimage_server.settings import Settings
    from zimage_server.specs import CallParams, GenerationSpec, ImageRow

    tokens, repeats, seeds = (16, 1, 2) if args.smoke else (args.tokens, args.repeats, args.seeds)
    runner = load_runner(Settings(models_dir=tiny_models_dir(), variant="turbo", device="cpu", store="none"))
    lm = ResidentLanguageModel(runner)
    messages = build_messages("a lighthouse at dawn")
    lm.generate(messages, 4, 0)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        answer = lm.generate(messages, tokens, None)
        times.append(time.perf_counter() - started)
    assert answer == "\n" * tokens, "the tiny model stopped early: the figure would not be per token"
    seconds = median(times)
    ceiling = H100_BANDWIDTH / QWEN3_4B_WEIGHT_BYTES
    tokenizer = runner.pipeline.tokenizer
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    # The tiny tokenizer splits finer than Qwen's; Qwen3 averages about 4 characters a token in English.
    prompt_tokens = len(chat) // 4
    results = {
        "tiny_tokens_per_s": tokens / seconds,
        "tiny_seconds": seconds,
        "h100_ceiling_tokens_per_s": ceiling,
        "h100_seconds_at_ceiling": tokens / ceiling,
        "kv_cache_mib": (prompt_tokens + tokens) * ENHANCER_KV_BYTES_PER_TOKEN / 2**20,
    }
    table = [["enhancer", "tokens", "seconds", "tokens/s"]]
    table.append(["tiny model, this CPU", tokens, seconds, tokens / seconds])
    table.append(["Qwen3-4B on H100, bandwidth ceiling (est.)", tokens, tokens / ceiling, ceiling])
    print(f"KV cache for ~{prompt_tokens} prompt + {tokens} new tokens at full size: {results['kv_cache_mib']:.0f} MiB")

    base = CallParams(mode="generate", width=64, height=64, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=64)

    def image(seed: int, strength: float) -> np.ndarray:
        params = dataclasses.replace(base, variation_strength=strength)
        [made] = runner.run_call(params, [ImageRow(GenerationSpec("a lighthouse at dawn", None, (seed,), params), seed)])
        return np.asarray(made, dtype=np.float64)

    rows = [["variation_strength", "moved from strength 0", "between seeds"]]
    unvaried = [image(seed, 0.0) for seed in range(seeds)]
    for strength in (0.0, 0.1, 0.3):
        varied = [image(seed, strength) for seed in range(seeds)]
        moved = np.mean([np.abs(a - b).mean() for a, b in zip(varied, unvaried, strict=True)])
        between = np.mean([np.abs(varied[i] - varied[i + 1]).mean() for i in range(seeds - 1)])
        results[f"variation_{strength:g}"] = {"moved": moved, "between_seeds": between}
        rows.append([f"{strength:g}", float(moved), float(between)])
    print_table(rows)
    print()
    print_table(table)
    write_record(args.out, "enhance", {"tokens": tokens, "repeats": repeats, "seeds": seeds, "smoke": args.smoke},
                 results, table)  # fmt: skip


if __name__ == "__main__":
    main()
