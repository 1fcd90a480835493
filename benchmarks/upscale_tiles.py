"""Benchmark 13: an upscaler pass tiled against untiled, on the CPU: time and peak host memory.

    PYTHONPATH=src python benchmarks/upscale_tiles.py [--size 512] [--tiles 256,128] [--out benchmarks/results]

A random Compact net of realesr-general-x4v3's shape (64 features, 16 convolutions, 4x), written
as safetensors, upscales a SIZE x SIZE image to 4x through `Upscalers.upscale_to`: untiled (one
tile of the whole image) and in tiles of the given sizes (overlap 32). Each arm runs in its own
process, after a warm-up upscale of a 16x16 image (the model loaded), and reports:

- peak RSS: the process's max RSS (`resource.getrusage`) at the end, torch's import included.
  It is noisy by +-150 MiB from run to run: it counts the pages of torch's libraries that the
  kernels happen to touch, which dwarfs the difference tiling makes;
- pass peak: what the pass itself held, the most anonymous memory (/proc/self/status RssAnon,
  sampled every 2 ms from another thread) above its level when the pass began.

Each arm's image is compared with the untiled one. One run per arm: a pass takes seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from common import REPO, add_standard_options, print_table, write_record

OVERLAP = 32


def write_model(folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(0)
    model = Compact(num_in_ch=3, num_out_ch=3, num_feat=64, num_conv=16, upscale=4)
    save_file(model.state_dict(), folder / "compact.safetensors")


def arm(folder: Path, size: int, tile: int, threads: int, result: Path) -> None:
    """One arm, in this process: warm up, then one timed pass; figures as JSON, the image as .npy."""
    import resource
    import time

    import numpy as np
    import torch
    from PIL import Image

    from zimage_server.upscalers import Upscalers

    torch.set_num_threads(threads)
    upscalers = Upscalers(folder, tile=tile, overlap=OVERLAP, max_pixels=(4 * size) ** 2)
    rng = np.random.default_rng(0)
    upscalers.upscale_to(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), "compact", 64, 64)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    start, highest, done = anonymous_kib(), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            highest[0] = max(highest[0], anonymous_kib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    output = upscalers.upscale_to(image, "compact", 4 * size, 4 * size)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    np.save(result.with_suffix(".npy"), np.asarray(output))
    figures = {"seconds": seconds, "peak_rss_mib": peak / 1024, "pass_peak_mib": max(highest[0] - start, 0) / 1024}
    result.write_text(json.dumps(figures))


def anonymous_kib() -> int:
    """The process's anonymous resident memory (heap, tensors), without its mapped library files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def run_arm(folder: Path, size: int, tile: int, threads: int, work: Path) -> dict:
    result = work / f"tile-{tile}.json"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, __file__, "--arm", str(folder), str(size), str(tile), str(threads), str(result)]
    subprocess.run(command, env=env, check=True)
    return json.loads(result.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--arm":
        folder, size, tile, threads, result = sys.argv[2:7]
        arm(Path(folder), int(size), int(tile), int(threads), Path(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="input side in pixels (the output is 4x)")
    parser.add_argument("--tiles", default="256,128", help="comma-separated tile sizes to compare with untiled")
    add_standard_options(parser, "a 128x128 input and one 96 px tiling, to check that the script runs")
    args = parser.parse_args()
    size, tiles = (128, [96]) if args.smoke else (args.size, [int(t) for t in args.tiles.split(",")])

    import numpy as np

    with tempfile.TemporaryDirectory(prefix="zimage-upscale-") as temp:
        work = Path(temp)
        write_model(work)
        results = {"untiled": run_arm(work, size, size, args.threads, work)}
        untiled = np.load(work / f"tile-{size}.npy").astype(int)
        results["untiled"]["max_difference"] = 0
        for tile in tiles:
            figures = run_arm(work, size, tile, args.threads, work)
            figures["max_difference"] = int(np.abs(np.load(work / f"tile-{tile}.npy").astype(int) - untiled).max())
            results[f"tile {tile}"] = figures

    table = [["arm", "seconds", "vs untiled", "pass peak MiB", "peak RSS MiB", "max diff (levels)"]]
    base = results["untiled"]["seconds"]
    for name, figures in results.items():
        table.append([name, figures["seconds"], figures["seconds"] / base, figures["pass_peak_mib"],
                      figures["peak_rss_mib"], figures["max_difference"]])  # fmt: skip
    print(f"Compact 64 features x 16 convs, 4x, {size}x{size} -> {4 * size}x{4 * size}, overlap {OVERLAP}, "
          f"{args.threads} thread(s), float32 on the CPU")  # fmt: skip
    print_table(table)
    config = {"size": size, "tiles": tiles, "overlap": OVERLAP, "threads": args.threads, "smoke": args.smoke}
    write_record(args.out, "upscale_tiles", config, results, table)


if __name__ == "__main__":
    main()
