"""Benchmark 9: what the provenance marks cost per image (CPU, one 1024x1024 image, each format).

    PYTHONPATH=src python benchmarks/provenance.py [--repeats 15]

The same encode with and without the XMP packet (Z_IMAGE_PROVENANCE on / off), and the XMP
encode followed by signing a C2PA manifest (a throw-away EC P-256 CA and signer made here, as
the tests make them), the arms alternating, medians. Targets (issue 26): XMP adds at most 1 ms,
C2PA signing at most 15 ms, per image.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from common import add_standard_options, median, print_table, write_record

TARGET_XMP_MS = 1.0
TARGET_C2PA_MS = 15.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    add_standard_options(parser, "a few repeats at 256x256, to check the script runs", threads=False)
    args = parser.parse_args()

    from zimage_server.content_credentials import ContentCredentials
    from zimage_server.images import ImageParameters, encode_image
    from zimage_server.provenance import xmp_packet
    from zimage_server.testing import key_pem, make_ca, make_leaf, pem

    ca = make_ca()
    key, leaf = make_leaf(ca)
    credentials = ContentCredentials(pem(leaf) + pem(ca[1]), key_pem(key), None, False)

    size = 256 if args.smoke else 1024
    repeats = 3 if args.smoke else args.repeats
    # Picture-like content: blocks of noise, upscaled.
    pixels = np.random.default_rng(0).integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((size, size))
    parameters = ImageParameters("a lighthouse", None, 8, 0.0, 1, size, size, "turbo")
    xmp = xmp_packet("generate", "z-image-turbo")

    def signed(output_format: str) -> bytes:
        blob = encode_image(image, output_format, None, parameters, xmp)
        return credentials.sign(blob, output_format, mode="generate", model_name="z-image-turbo", prompt=None)

    results, table = {}, [["format", "off ms", "XMP ms", "XMP + C2PA ms", "XMP adds ms", "C2PA adds ms"]]
    for output_format in ("png", "jpeg", "webp"):
        arms = {
            "off": lambda f=output_format: encode_image(image, f, None, parameters, None),
            "xmp": lambda f=output_format: encode_image(image, f, None, parameters, xmp),
            "c2pa": lambda f=output_format: signed(f),
        }
        samples: dict[str, list[float]] = {name: [] for name in arms}
        for i in range(repeats + 1):
            names = list(arms)
            for name in names[i % 3 :] + names[: i % 3]:  # rotate the order every round
                started = time.perf_counter()
                arms[name]()
                if i > 0:  # the first round warms up
                    samples[name].append(time.perf_counter() - started)
        off, on, c2pa = (1000 * median(samples[name]) for name in ("off", "xmp", "c2pa"))
        results[output_format] = {
            "off_ms": off, "on_ms": on, "c2pa_ms": c2pa, "xmp_ms": on - off, "signing_ms": c2pa - on,
            "target_xmp_ms": TARGET_XMP_MS, "target_c2pa_ms": TARGET_C2PA_MS,
        }  # fmt: skip
        table.append([output_format, off, on, c2pa, on - off, c2pa - on])
    print_table(table)
    config = {"size": size, "repeats": repeats, "smoke": args.smoke}
    write_record(args.out, "provenance", config, results, table)


if __name__ == "__main__":
    main()
