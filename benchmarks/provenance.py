"""Benchmark 9: what the provenance marks cost per image (CPU, one 1024x1024 image, each format).

    PYTHONPATH=src python benchmarks/provenance.py [--repeats 15]

The same encode with and without the XMP packet (Z_IMAGE_PROVENANCE on / off), the arms
alternating, medians. Target (issue 26): XMP adds at most 1 ms median per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from common import add_standard_options, median, print_table, write_record

TARGET_XMP_MS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    add_standard_options(parser, "a few repeats at 256x256, to check the script runs", threads=False)
    args = parser.parse_args()

    from zimage_server.images import ImageParameters, encode_image
    from zimage_server.provenance import xmp_packet

    size = 256 if args.smoke else 1024
    repeats = 3 if args.smoke else args.repeats
    # Picture-like content: blocks of noise, upscaled.
    pixels = np.random.default_rng(0).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size))
    parameters = ImageParameters("a lighthouse", None, 8, 0.0, 1, size, size, "turbo")
    xmp = xmp_packet("generate", "z-image-turbo")
    results, table = {}, [["format", "off ms", "on ms", "XMP adds ms"]]
    for output_format in ("png", "jpeg", "webp"):
        samples: dict[str, list[float]] = {"off": [], "on": []}
        for i in range(repeats + 1):
            arms = (("off", None), ("on", xmp)) if i % 2 else (("on", xmp), ("off", None))
            for arm, marks in arms:
                started = time.perf_counter()
                encode_image(image, output_format, None, parameters, marks)
                if i > 0:  # the first round warms up
                    samples[arm].append(time.perf_counter() - started)
        off, on = 1000 * median(samples["off"]), 1000 * median(samples["on"])
        results[output_format] = {"off_ms": off, "on_ms": on, "xmp_ms": on - off, "target_ms": TARGET_XMP_MS}
        table.append([output_format, off, on, on - off])
    print_table(table)
    config = {"size": size, "repeats": repeats, "smoke": args.smoke}
    write_record(args.out, "provenance", config, results, table)


if __name__ == "__main__":
    main()
