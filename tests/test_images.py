"""images.py: decoding and checking uploads, encoding outputs (lossless PNG with its parameters chunk,
JPEG and WebP at a quality), and the helpers that fit images to the model's sizes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from zimage_server import images
from zimage_server.images import (
    MAX_DECODED_PIXELS,
    ImageInputError,
    ImageParameters,
    decode_upload,
    edit_area,
    encode_image,
    encode_images,
    fit_size,
    has_alpha,
    png_chunk,
    to_rgb,
)

# --- inputs ----------------------------------------------------------------------------------------


def picture(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    """A busy RGB test picture, different per seed."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize((width, height))
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(250, 200, 0))
    return image


def encoded(image: Image.Image, image_format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG of a few dozen bytes whose header claims width x height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def gif_bomb() -> bytes:
    """A tiny GIF whose logical screen claims 65535x65535."""
    screen = struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
    return b"GIF89a" + screen + b",\x00\x00\x00\x00\xff\xff\xff\xff\x00\x02\x02L\x01\x00;"


def left_half_mask(width: int = 64, height: int = 64) -> Image.Image:
    """An OpenAI-style mask: transparent (edit) on the left half, opaque elsewhere."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


# --- decoding uploads ------------------------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode(image_format):
    image = decode_upload(encoded(picture(80, 48), image_format), "image")
    assert image.size == (80, 48)


@pytest.mark.parametrize(
    "data, status, words",
    [
        (b"", 400, "empty"),
        (b"a prompt, not a picture\n" * 10, 415, "PNG, JPEG or WebP"),
        (gif_bomb(), 415, "PNG, JPEG or WebP"),
        (encoded(picture(), "GIF"), 415, "PNG, JPEG or WebP"),
        (encoded(picture(), "BMP"), 415, "PNG, JPEG or WebP"),
        (encoded(picture(256, 256))[:300], 400, "truncated or corrupt"),
        (encoded(picture(256, 256), "JPEG")[:200], 400, "truncated or corrupt"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "truncated or corrupt"),
        (png_claiming(50_000, 50_000), 400, "pixels"),
        (png_claiming(9000, 9000), 400, "pixels"),  # under Pillow's own bomb limit, over ours
    ],
)
def test_hostile_uploads_are_refused_with_a_clear_reason(data, status, words):
    with pytest.raises(ImageInputError) as refused:
        decode_upload(data, "image")
    assert refused.value.status_code == status and words in refused.value.message


def test_a_huge_claimed_size_is_refused_without_allocating_it():
    # Pillow allocates pixels in C, out of tracemalloc's sight; its own counters see every image core.
    before = Image.core.get_stats()["new_count"]
    with pytest.raises(ImageInputError):
        decode_upload(png_claiming(8193, 8192), "image")
    assert 8193 * 8192 > MAX_DECODED_PIXELS and Image.core.get_stats()["new_count"] == before
    decode_upload(encoded(picture()), "image")
    assert Image.core.get_stats()["new_count"] > before  # the counter does see a real decode


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 8, 32))  # blue stripe on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display it turned 90 degrees clockwise
    decoded = decode_upload(encoded(image, "JPEG", exif=exif, quality=95), "image")
    assert decoded.size == (32, 64)
    top = np.asarray(decoded.convert("RGB"))[:4, 16]
    assert top[:, 2].min() > 200 and top[:, 0].max() < 60  # the stripe is now along the top


def test_every_mode_becomes_rgb_with_transparency_on_white():
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.paste(1, (0, 0, 4, 8))
    palette.info["transparency"] = 0  # palette entry 0 (black) is transparent
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 4, 8))
    gray16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    cmyk = Image.open(io.BytesIO(encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")))
    cases = [
        (decode_upload(encoded(palette), "image"), (10, 200, 30), (255, 255, 255)),
        (decode_upload(encoded(rgba), "image"), (255, 0, 0), (255, 255, 255)),
        (decode_upload(encoded(rgba.convert("LA")), "image"), (76, 76, 76), (255, 255, 255)),
        (decode_upload(encoded(gray16), "image"), (128, 128, 128), (128, 128, 128)),
        (cmyk, (255, 0, 0), (255, 0, 0)),
    ]
    for image, left, right in cases:
        rgb = to_rgb(image)
        assert rgb.mode == "RGB" and rgb.size == (8, 8)
        for (x, expected) in ((1, left), (6, right)):
            assert np.abs(np.asarray(rgb.getpixel((x, 4)), dtype=int) - expected).max() <= 3, (image.mode, x)


def test_mask_rules_alpha_zero_or_white():
    from_alpha = edit_area(left_half_mask(16, 16))
    assert from_alpha.getpixel((2, 2)) == 255 and from_alpha.getpixel((12, 2)) == 0
    white = Image.new("L", (16, 16), 0)
    white.paste(255, (0, 0, 8, 16))
    from_white = edit_area(white.convert("RGB"))
    assert from_white.getpixel((2, 2)) == 255 and from_white.getpixel((12, 2)) == 0


@pytest.mark.parametrize(
    "size, max_pixels, expected",
    [
        ((1000, 600), 2048 * 2048, (992, 592)),
        ((100, 70), 2048 * 2048, (96, 64)),
        ((10, 10), 2048 * 2048, (64, 64)),
        ((4000, 3000), 1024 * 1024, None),
        ((10_000, 20), 2048 * 2048, None),
        ((3000, 40), 64 * 64 * 4, None),
    ],
)
def test_default_size_fits_the_limits_and_keeps_the_aspect(size, max_pixels, expected):
    width, height = fit_size(*size, max_pixels=max_pixels, max_side=2048)
    if expected:
        assert (width, height) == expected
    assert width % 16 == 0 and height % 16 == 0
    assert 64 <= width <= 2048 and 64 <= height <= 2048 and width * height <= max_pixels
    if min(width, height) > 64:
        assert abs(width / height - size[0] / size[1]) < 0.05 * size[0] / size[1]


# --- encoding outputs ------------------------------------------------------------------------------

PARAMETERS = ImageParameters("a red chair, \u00fcber", "blurry", 8, 0.0, 10, 64, 64, "turbo")


def output_like(kind: str, side: int, seed: int = 0) -> Image.Image:
    """What a pipeline might return: smooth gradients with a VAE's faint grain, or pure noise
    (the worst case for every PNG encoder)."""
    rng = np.random.default_rng(seed)
    if kind == "noisy":
        return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    y, x = np.mgrid[0:side, 0:side] / side
    smooth = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], axis=-1) * 255
    return Image.fromarray(np.clip(smooth + rng.normal(0, 1, smooth.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "image",
    [
        output_like("smooth", 1024),
        output_like("noisy", 1024),
        output_like("noisy", 2048, seed=1),
        picture(96, 64),
        Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 80, 4), dtype=np.uint8)),  # RGBA
        picture(64, 64).convert("L"),  # a mode fpng does not write: Pillow's path
    ],
    ids=["smooth-1024", "noisy-1024", "noisy-2048", "picture", "rgba", "gray"],
)
def test_png_is_lossless_and_carries_the_parameters(image):
    decoded = Image.open(io.BytesIO(encode_image(image, "png", None, PARAMETERS)))
    assert decoded.format == "PNG" and decoded.info["parameters"] == PARAMETERS.as_text()
    decoded.load()
    assert decoded.mode == image.mode and np.array_equal(np.asarray(decoded), np.asarray(image))


def test_png_without_parameters_has_no_text():
    decoded = Image.open(io.BytesIO(encode_image(picture(), "png", None, None)))
    assert "parameters" not in decoded.info


def test_pillow_writes_pngs_where_fpng_is_missing(monkeypatch):
    monkeypatch.setattr(images, "fpng", None)
    decoded = Image.open(io.BytesIO(encode_image(picture(), "png", None, PARAMETERS)))
    assert decoded.text["parameters"] == PARAMETERS.as_text()
    assert np.array_equal(np.asarray(decoded), np.asarray(picture()))


def test_the_parameters_chunk_comes_right_after_the_header():
    # Readers that stop at the first IDAT still see the text.
    data = encode_image(picture(), "png", None, PARAMETERS)
    assert data[12:16] == b"IHDR" and data[37:41] == b"iTXt"
    assert png_chunk(b"IEND", b"") == data[-12:]


@pytest.mark.parametrize("kind", ["smooth", "noisy"])
def test_png_is_at_most_one_and_a_half_times_pillows_default(kind):
    image = output_like(kind, 1024)
    assert len(encode_image(image, "png", None, None)) <= 1.5 * len(encoded(image))


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_lossy_formats_follow_the_quality(output_format):
    image = output_like("smooth", 256)
    low, high = (encode_image(image, output_format, quality, PARAMETERS) for quality in (10, 95))
    assert len(low) < len(high)
    decoded = Image.open(io.BytesIO(high))
    assert decoded.format == output_format.upper() and decoded.size == (256, 256)
    assert np.abs(np.asarray(decoded, dtype=int) - np.asarray(image, dtype=int)).mean() < 4


def test_lossy_formats_drop_alpha():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    for output_format in ("jpeg", "webp"):
        assert Image.open(io.BytesIO(encode_image(rgba, output_format, None, None))).mode == "RGB"


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_encode_images_keeps_the_order_and_each_images_parameters(output_format):
    batch = [picture(64, 64, seed) for seed in range(4)]
    parameters = [ImageParameters("a cat", None, 8, 0.0, seed, 64, 64, "turbo") for seed in range(4)]
    encoded_batch = encode_images(batch, parameters, output_format, 90)
    assert encoded_batch == [encode_image(i, output_format, 90, p) for i, p in zip(batch, parameters)]
    if output_format == "png":
        seeds = [Image.open(io.BytesIO(data)).info["parameters"].split("Seed: ")[1][:1] for data in encoded_batch]
        assert seeds == ["0", "1", "2", "3"]


def test_encode_images_refuses_mismatched_lists():
    with pytest.raises(ValueError):
        encode_images([picture()], [], "png", None)


def test_palette_alpha_counts_as_alpha():
    index = Image.new("P", (4, 4), 0)
    index.info["transparency"] = 0
    rgba_palette = Image.new("P", (4, 4), 0)
    rgba_palette.putpalette([0, 0, 0, 0, 255, 0, 0, 255], "RGBA")
    opaque = Image.new("P", (4, 4), 0)
    assert has_alpha(index) and has_alpha(rgba_palette) and not has_alpha(opaque)
    assert to_rgb(rgba_palette).getpixel((0, 0)) == (255, 255, 255)  # transparent: on white
