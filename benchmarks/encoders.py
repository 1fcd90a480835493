"""Benchmark 5: what encoding one generated image costs, per encoder, on the CPU.

    PYTHONPATH=src python benchmarks/encoders.py [--repeats 5] [--out benchmarks/results]

For 1024x1024 and 2048x2048 RGB images of four kinds (clean synthetic gradients; the same with a
VAE's faint grain, "smooth"; uniform noise; and a real-ish picture: soft shapes and gradients with
a photo's grain), interleaves the PNG encoders we
could use (Pillow at zlib levels 6, 1 and 0, fpng, imagecodecs where installed) and the lossy
formats we serve (JPEG, WebP at two methods), checking that every PNG decodes to the exact input.
Reports median ms, bytes and size relative to Pillow's default PNG. Last, one request's four
1024x1024 PNGs, then four WebPs, through `encode_images` against a plain loop, to show whether
parallel pays.
Targets (issue "the last mile"): PNG 1024x1024 <= 40 ms, 2048x2048 <= 120 ms, JPEG and WebP
<= 40 ms, PNG files <= 1.5x Pillow's default.
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from common import add_standard_options, median, print_table, write_record
from zimage_server.images import ImageParameters, encode_image, encode_images

PARAMETERS = ImageParameters("a red chair", None, 8, 0.0, 1, 1024, 1024, "turbo")


def test_image(kind: str, side: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    if kind == "noisy":
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    gradient = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1) * 255
    if kind == "gradient":  # no pipeline output is this clean: zlib's best case, fpng's worst
        return Image.fromarray(gradient.astype(np.uint8))
    if kind == "smooth":
        return Image.fromarray(np.clip(gradient + rng.normal(0, 1, gradient.shape), 0, 255).astype(np.uint8))
    # Real-ish: a coarse random picture scaled up (soft shapes), over the gradients, plus grain.
    blocks = Image.fromarray(rng.integers(0, 256, (side // 64, side // 64, 3), dtype=np.uint8))
    shapes = np.asarray(blocks.resize((side, side), Image.Resampling.BICUBIC), dtype=float)
    grain = rng.normal(0, 4, (side, side, 3))
    return Image.fromarray(np.clip(0.6 * shapes + 0.4 * gradient + grain, 0, 255).astype(np.uint8))


def pillow(image_format: str, **options) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **options)
        return buffer.getvalue()

    return encode


def encoders() -> dict[str, tuple[str, Callable[[Image.Image], bytes]]]:
    """name -> (format, encode); the first PNG is the size reference."""
    table = {
        "pillow png level 6 (default)": ("png", pillow("PNG")),
        "pillow png level 1": ("png", pillow("PNG", compress_level=1)),
        "pillow png level 0": ("png", pillow("PNG", compress_level=0)),
    }
    try:
        import fpng

        table["fpng"] = ("png", fpng.from_pil)
    except ImportError:
        pass
    try:
        import imagecodecs

        table["imagecodecs png level 1"] = ("png", lambda image: imagecodecs.png_encode(np.asarray(image), level=1))
    except ImportError:
        pass
    table |= {
        "server png (encode_image)": ("png", lambda image: encode_image(image, "png", None, PARAMETERS)),
        "pillow jpeg q90": ("jpeg", pillow("JPEG", quality=90)),
        "pillow webp q90 method 4 (default)": ("webp", pillow("WEBP", quality=90)),
        "server webp q90 (method 0)": ("webp", lambda image: encode_image(image, "webp", 90, None)),
        "server webp q75 (method 0)": ("webp", lambda image: encode_image(image, "webp", 75, None)),
    }
    return table


def time_ms(call: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000, result


def check_lossless(data: bytes, image: Image.Image, name: str) -> None:
    decoded = Image.open(io.BytesIO(data))
    if not np.array_equal(np.asarray(decoded.convert(image.mode)), np.asarray(image)):
        raise SystemExit(f"{name} is not lossless")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed encodes per encoder and image (default 5)")
    add_standard_options(parser, "one repeat at 256x256, to check the script runs", threads=False)
    args = parser.parse_args()
    repeats = 1 if args.smoke else args.repeats
    sides = (256,) if args.smoke else (1024, 2048)
    table_of_encoders = encoders()
    results: dict = {}
    table = [["side", "image", "encoder", "median ms", "bytes", "vs pillow default"]]
    for side in sides:
        for kind in ("gradient", "smooth", "noisy", "real-ish"):
            image = test_image(kind, side)
            times: dict[str, list[float]] = {name: [] for name in table_of_encoders}
            sizes: dict[str, int] = {}
            for _ in range(repeats):  # interleaved, so a neighbour's burst hits every encoder alike
                for name, (image_format, encode) in table_of_encoders.items():
                    elapsed, data = time_ms(lambda encode=encode, image=image: encode(image))
                    times[name].append(elapsed)
                    sizes[name] = len(data)
                    if image_format == "png":
                        check_lossless(data, image, name)
            reference = sizes["pillow png level 6 (default)"]
            for name in table_of_encoders:
                row = {"median_ms": median(times[name]), "bytes": sizes[name], "vs_default": sizes[name] / reference}
                results.setdefault(f"{side}", {}).setdefault(kind, {})[name] = row
                table.append([side, kind, name, row["median_ms"], row["bytes"], round(row["vs_default"], 2)])

    # One request of four images: does the shared pool beat a loop on this machine?
    side = sides[0]
    batch = [test_image("real-ish", side, seed) for seed in range(4)]
    parameters = [PARAMETERS] * len(batch)
    for output_format in ("png", "webp"):
        loop_ms, pool_ms = [], []
        for _ in range(repeats):
            loop_ms.append(time_ms(lambda: [encode_image(image, output_format, None, PARAMETERS) for image in batch])[0])
            pool_ms.append(time_ms(lambda: encode_images(batch, parameters, output_format, None))[0])
        results[f"four_{output_format}"] = {"loop_median_ms": median(loop_ms), "encode_images_median_ms": median(pool_ms)}
        table.append([side, "real-ish x4", f"server {output_format}, loop", median(loop_ms), "", ""])
        table.append([side, "real-ish x4", f"server {output_format}, encode_images", median(pool_ms), "", ""])

    config = {"repeats": repeats, "sides": list(sides), "smoke": args.smoke}
    path = write_record(args.out, "encoders", config, results, table)
    print(f"record: {path}")
    print_table(table)


if __name__ == "__main__":
    main()
