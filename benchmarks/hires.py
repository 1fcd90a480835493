"""Benchmark 11: what a hires fix costs over its two passes run directly (CPU, tiny model).

    PYTHONPATH=src python benchmarks/hires.py [--repeats 7] [--size 256] [--scale 2] [--steps 4]

One image, a first pass at --size, upscaled --scale times, a second pass of --steps at strength
0.5, in two arms that alternate in this process:
- served: `ModelRunner.run_call` with `CallParams.hires`, what every route runs;
- direct: the same two passes as plain diffusers calls (`ZImagePipeline`, then the upscale, then
  `ZImageImg2ImgPipeline` over the same modules), what a user scripting it themselves would run.
For the `Latent` mode (no VAE round trip between the passes) and `Lanczos` (decode, resize,
encode again). Medians, and served / direct. Both arms make the same image (tests/test_hires.py).
"""

from __future__ import annotations

import argparse
import time

from common import add_standard_options, median, print_table, set_threads, tiny_models_dir, write_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=4)
    add_standard_options(parser, "two repeats at 64x64, to check the script runs")
    args = parser.parse_args()
    set_threads(args.threads)

    import torch
    from diffusers import ZImageImg2ImgPipeline, ZImagePipeline
    from PIL import Image

    from zimage_server.hires import LATENT_MODES, HiresTarget, hires_params
    from zimage_server.runner import load_runner
    from zimage_server.settings import Settings
    from zimage_server.specs import CallParams, GenerationSpec, ImageRow

    size, repeats = (64, 2) if args.smoke else (args.size, args.repeats)
    target = int(size * args.scale) // 16 * 16
    models = tiny_models_dir()
    runner = load_runner(Settings(models_dir=models, variant="turbo", device="cpu", store="none"))
    text_to_image = ZImagePipeline.from_pretrained(models / "z-image-turbo")
    image_to_image = ZImageImg2ImgPipeline(**text_to_image.components)
    for pipeline in (text_to_image, image_to_image):
        pipeline.set_progress_bar_config(disable=True)
    image_to_image.image_processor.register_to_config(vae_latent_channels=16)
    common = dict(guidance_scale=0.0, max_sequence_length=64)

    def direct(upscaler: str, seed: int) -> None:
        first = text_to_image(
            "a lighthouse", width=size, height=size, num_inference_steps=args.steps, **common,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="latent" if upscaler in LATENT_MODES else "pil",
        ).images  # fmt: skip
        if upscaler in LATENT_MODES:
            start = torch.nn.functional.interpolate(first, size=(target // 8, target // 8), mode="bilinear")
        else:
            start = first[0].resize((target, target), Image.Resampling.LANCZOS)
        image_to_image(
            "a lighthouse", image=start, strength=0.5, num_inference_steps=int(args.steps / 0.5), width=target,
            height=target, generator=torch.Generator("cpu").manual_seed(seed), **common,
        )  # fmt: skip

    def served(upscaler: str, seed: int) -> None:
        hires = hires_params(
            HiresTarget(target, target), upscaler=upscaler, steps=args.steps, strength=0.5, guidance_scale=0.0,
            upscaler_exists=lambda name: False, max_width=4096, max_height=4096, max_pixels=4096 * 4096,
        )  # fmt: skip
        params = CallParams(mode="generate", width=size, height=size, num_inference_steps=args.steps, hires=hires, **common)
        spec = GenerationSpec("a lighthouse", None, (seed,), params)
        runner.run_call(params, [ImageRow(spec, seed)])

    results, table = {}, [["upscaler", "first -> second", "direct s", "served s", "served / direct"]]
    for upscaler in ("Latent", "Lanczos"):
        samples: dict[str, list[float]] = {"direct": [], "served": []}
        for i in range(repeats + 1):
            arms = [("direct", direct), ("served", served)]
            for name, arm in arms if i % 2 == 0 else arms[::-1]:
                started = time.perf_counter()
                arm(upscaler, i)
                if i > 0:  # the first round warms up
                    samples[name].append(time.perf_counter() - started)
        plain, ours = median(samples["direct"]), median(samples["served"])
        results[upscaler] = {"direct_s": plain, "served_s": ours, "ratio": ours / plain}
        table.append([upscaler, f"{size} -> {target}", plain, ours, ours / plain])
    print_table(table)
    config = {
        "size": size, "target": target, "steps": args.steps, "repeats": repeats, "threads": args.threads,
        "smoke": args.smoke,
    }  # fmt: skip
    write_record(args.out, "hires", config, results, table)


if __name__ == "__main__":
    main()
