"""Upscalers: the folder, safe loading, tiled runs against spandrel's own call, the LRU, A1111's extras.

Every model is a tiny random one written here with a fixed seed: ESRGAN 2x, Real-ESRGAN's
pixel-unshuffle 2x (size step 4) and Compact 4x, as safetensors and as .pth.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel import MAIN_REGISTRY, ArchRegistry, ArchSupport, Architecture, ImageModelDescriptor, ModelLoader
from spandrel.architectures.Compact import Compact, CompactArch
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.util import KeyCondition

from conftest import Captured
from zimage_server.upscalers import (
    UnknownUpscaler,
    UpscaleTooLarge,
    UpscalerFileError,
    Upscalers,
    tile_spans,
    upscaler_memory,
)

LANCZOS, NEAREST = Image.Resampling.LANCZOS, Image.Resampling.NEAREST
# Receptive-field radii of the tiny nets, measured by perturbing one input pixel: ESRGAN 2x 18 px,
# the unshuffle variant 34 px, Compact 4 px. Tiles with more overlap than that crop exactly.
OVERLAP = {"esrgan-2x": 20, "unshuffle-2x": 36, "compact-4x": 8}
# The tiled result against the whole image's, on the CPU in float32. With oneDNN's convolutions
# off (torch.backends.mkldnn) they are bit-identical: each output pixel is the same dot product in
# the same order, whatever the tile. With oneDNN on (the default), its kernels for some tile shapes
# sum in another order: outputs 1 ulp (1.2e-7) apart, which after rounding to uint8 moves a value
# that sat on a .5 boundary by one level. Hence: at most 1 level, on at most 0.5% of the values.
TILING_LEVELS = 1
RARE = 0.005


def tiny_models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "esrgan-2x": ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2),
        # Real-ESRGAN x2's layout: 4x upsampling after a 2x pixel unshuffle (12 input channels).
        "unshuffle-2x": ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4),
        "compact-4x": Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=4),
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    for name, module in tiny_models().items():
        save_file(module.state_dict(), folder / f"{name}.safetensors")
    torch.save(tiny_models()["compact-4x"].state_dict(), folder / "compact-4x-pth.pth")
    (folder / "notes.txt").write_text("not a model")
    return folder


def picture(width: int = 101, height: int = 70, seed: int = 1) -> Image.Image:
    """A smooth gradient with noise: something a model and Lanczos both change visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8), "RGB")


def direct(path: Path, image: Image.Image, passes: int = 1) -> Image.Image:
    """spandrel's own call on the whole image, with the conversion ComfyUI and spandrel's users make."""
    model = ModelLoader().load_from_file(path).eval()
    for _ in range(passes):
        tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            output = model(tensor)
        pixels = (output[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels, "RGB")
    return image


@contextmanager
def onednn_convolutions(enabled: bool) -> Iterator[None]:
    """oneDNN's CPU kernels on or off, for every thread (the model thread included); only that
    flag (torch's own `flags()` also resets TF32 and warns about Intel GPUs)."""
    saved = torch.backends.mkldnn.set_flags(enabled, _fp32_precision=None)
    try:
        yield
    finally:
        torch.backends.mkldnn.set_flags(saved[0], _fp32_precision=None)


def assert_same(a: Image.Image, b: Image.Image, levels: int = 0) -> None:
    """Equal images, or (levels > 0) within that many uint8 levels on a few pixels."""
    assert a.size == b.size and a.mode == b.mode
    difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
    assert difference.max() <= levels, f"largest difference {difference.max()} levels"
    assert (difference > 0).mean() <= RARE, f"{(difference > 0).mean():.2%} of values differ"


# ---------------------------------------------------------------------------------------------
# The folder


class CountingRegistry(ArchRegistry):
    """spandrel's core architectures, counting how often a state dict is turned into a model."""

    def __init__(self, base: ArchRegistry = MAIN_REGISTRY):
        super().__init__()
        self.add(*base.architectures("insertion"))
        self.builds = 0

    def load(self, state_dict):
        self.builds += 1
        return super().load(state_dict)


def test_the_folder_is_listed_with_scales_and_architectures_and_read_once(folder):
    registry = CountingRegistry()
    upscalers = Upscalers(folder, registry=registry)
    cards = {card.name: card for card in upscalers.list_upscalers()}
    assert list(cards) == ["None", "Lanczos", "Nearest", "compact-4x", "compact-4x-pth", "esrgan-2x", "unshuffle-2x"]
    assert cards["None"].path is None and cards["Lanczos"].scale is None
    facts = {name: (card.scale, card.architecture, card.path.name) for name, card in cards.items() if card.path}
    assert facts == {
        "compact-4x": (4, "Compact", "compact-4x.safetensors"),
        "compact-4x-pth": (4, "Compact", "compact-4x-pth.pth"),
        "esrgan-2x": (2, "ESRGAN", "esrgan-2x.safetensors"),
        "unshuffle-2x": (2, "ESRGAN", "unshuffle-2x.safetensors"),
    }
    assert cards["esrgan-2x"].parameters == sum(p.numel() for p in tiny_models()["esrgan-2x"].parameters())
    assert registry.builds == 4
    upscalers.list_upscalers()
    assert registry.builds == 4  # the second listing reads nothing
    assert upscalers.exists("Nearest") and upscalers.exists("esrgan-2x")
    assert not upscalers.exists("esrgan-2x.safetensors")


def test_a_changed_file_is_read_again_and_a_new_one_is_found(tmp_path):
    registry = CountingRegistry()
    upscalers = Upscalers(tmp_path, registry=registry)
    assert upscalers.names() == ["None", "Lanczos", "Nearest"]  # no folder yet, or an empty one
    save_file(tiny_models()["compact-4x"].state_dict(), tmp_path / "a.safetensors")
    assert upscalers.card("a").scale == 4 and registry.builds == 1
    save_file(tiny_models()["esrgan-2x"].state_dict(), tmp_path / "a.safetensors")
    os.utime(tmp_path / "a.safetensors", ns=(1, 1))  # a new identity even within the clock's tick
    assert upscalers.card("a").scale == 2 and registry.builds == 2


def test_unknown_names_answer_in_a1111s_words(folder):
    upscalers = Upscalers(folder)
    for call in (
        lambda: upscalers.upscale_to(picture(), "4x-UltraSharp", 200, 140),
        lambda: upscalers.extras_upscale(picture(), upscaler_1="Lanczos", upscaler_2="nope"),
        lambda: upscalers.card("../esrgan-2x"),
    ):
        with pytest.raises(UnknownUpscaler, match="could not find upscaler named "):
            call()


# ---------------------------------------------------------------------------------------------
# Bad files


class Exploit:
    """Unpickled, it would run a shell command creating the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_bad_files_are_one_line_errors_and_the_library_keeps_working(folder, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = (folder / "compact-4x.safetensors").read_bytes()
    (bad / "good.safetensors").write_bytes(good)
    (bad / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (bad / "noise.safetensors").write_bytes(os.urandom(4096))
    (bad / "garbage.pth").write_bytes(os.urandom(4096))
    marker = tmp_path / "pwned"
    (bad / "exploit-legacy.pth").write_bytes(pickle.dumps(Exploit(marker), protocol=2))
    torch.save({"body.0.weight": torch.zeros(1), "payload": Exploit(marker)}, bad / "exploit-zip.pth")
    torch.save({"unknown.weight": torch.zeros(3, 3)}, bad / "unknown-arch.pth")
    assert not marker.exists()  # saving runs nothing

    upscalers = Upscalers(bad)
    with Captured("zimage_server.upscalers") as captured:
        assert [card.name for card in upscalers.list_upscalers()] == ["None", "Lanczos", "Nearest", "good"]
        upscalers.list_upscalers()
    skipped = sorted(record.getMessage() for record in captured.records)
    assert len(skipped) == 6 and all("\n" not in line for line in skipped)  # each file logged once
    for name in ("truncated", "noise", "garbage", "exploit-legacy", "exploit-zip", "unknown-arch"):
        file = next(bad.glob(f"{name}.*"))
        with pytest.raises(UpscalerFileError, match=f"upscaler file {file.name}: ") as failure:
            upscalers.upscale_to(picture(), name, 404, 280)
        assert "\n" not in str(failure.value)
    assert "forbidden" in str(pytest.raises(UpscalerFileError, upscalers.card, "exploit-zip").value)
    assert "recognises" in str(pytest.raises(UpscalerFileError, upscalers.card, "unknown-arch").value)
    assert not marker.exists()
    assert_same(upscalers.upscale_to(picture(), "good", 404, 280), direct(bad / "good.safetensors", picture()))


def test_a_pth_file_loads_the_same_model_as_its_safetensors_twin(folder):
    upscalers = Upscalers(folder)
    from_pth = upscalers.upscale_to(picture(), "compact-4x-pth", 404, 280)
    assert_same(from_pth, upscalers.upscale_to(picture(), "compact-4x", 404, 280))


# ---------------------------------------------------------------------------------------------
# Runs against spandrel's own call


@pytest.mark.parametrize("onednn", [False, True], ids=["exact-convolutions", "onednn"])
@pytest.mark.parametrize("name", ["esrgan-2x", "unshuffle-2x", "compact-4x"])
def test_tiled_and_untiled_runs_equal_spandrels_call(folder, name, onednn):
    """Every tile's core is computed as in the whole image: bit for bit with exact convolutions,
    within TILING_LEVELS with oneDNN's (see there)."""
    image = picture(150, 110)  # neither side a multiple of the tile, nor of the unshuffle's 4
    scale = 4 if name == "compact-4x" else 2
    with onednn_convolutions(onednn):
        expected = direct(folder / f"{name}.safetensors", image)
        untiled = Upscalers(folder).upscale_to(image, name, 150 * scale, 110 * scale)
        tiled = [
            Upscalers(folder, tile=2 * OVERLAP[name] + core, overlap=OVERLAP[name]).upscale_to(
                image, name, 150 * scale, 110 * scale
            )
            for core in (12, 40)  # many tiles, and a few
        ]
    assert_same(untiled, expected)
    for result in tiled:
        assert_same(result, expected, levels=TILING_LEVELS if onednn else 0)


def test_tile_spans_partition_the_axis_aligned_and_within_the_tile():
    for length, tile, overlap, multiple in [(150, 100, 36, 4), (511, 512, 32, 1), (2048, 512, 32, 1), (97, 40, 10, 4)]:
        spans = tile_spans(length, tile, overlap, multiple)
        assert spans[0][2] == 0 and spans[-1][3] == length
        for (start, end, core_start, core_end), following in zip(spans, spans[1:] + [None]):
            assert end - start <= tile and start % multiple == 0 and core_start % multiple == 0
            assert start == max(0, core_start - -(-overlap // multiple) * multiple) and core_end <= end
            assert end == length or end - core_end >= overlap
            if following is not None:
                assert following[2] == core_end


def test_a_model_runs_again_until_the_image_covers_the_target_then_lanczos(folder):
    upscalers = Upscalers(folder)
    image = picture()
    two_passes = direct(folder / "esrgan-2x.safetensors", image, passes=2)  # 404x280
    assert_same(upscalers.upscale_to(image, "esrgan-2x", 300, 250), two_passes.resize((300, 250), LANCZOS))
    # A 4x model for a 1.5x target: one pass, then down.
    once = direct(folder / "compact-4x.safetensors", image)
    assert_same(upscalers.upscale_to(image, "compact-4x", 151, 105), once.resize((151, 105), LANCZOS))
    # Not larger on any side: the model is not run (A1111's resize_image).
    assert_same(upscalers.upscale_to(image, "compact-4x", 50, 35), image.resize((50, 35), LANCZOS))


def test_builtin_resizes_and_alpha(folder):
    upscalers = Upscalers(folder)
    image = picture()
    assert_same(upscalers.upscale_to(image, "None", 256, 128), image.resize((256, 128), LANCZOS))
    assert_same(upscalers.upscale_to(image, "Lanczos", 256, 128), image.resize((256, 128), LANCZOS))
    assert_same(upscalers.upscale_to(image, "Nearest", 256, 128), image.resize((256, 128), NEAREST))
    rgba = image.convert("RGBA")
    rgba.putalpha(77)
    assert_same(upscalers.upscale_to(rgba, "esrgan-2x", 202, 140), direct(folder / "esrgan-2x.safetensors", image))


def test_targets_over_the_pixel_limit_are_refused(folder):
    upscalers = Upscalers(folder, max_pixels=512 * 512)
    with pytest.raises(UpscaleTooLarge, match="1024x512"):
        upscalers.upscale_to(picture(), "esrgan-2x", 1024, 512)
    with pytest.raises(UpscaleTooLarge, match="808x560"):
        upscalers.extras_upscale(picture(), upscaling_resize=8, upscaler_1="Lanczos")


# ---------------------------------------------------------------------------------------------
# Loading, the LRU, the lock, the thread


def test_the_lru_reads_a_model_again_only_after_evicting_it(folder):
    image = picture(32, 24)
    one = Upscalers(folder, cache_size=1)
    for name in ("esrgan-2x", "compact-4x", "esrgan-2x", "esrgan-2x"):
        one.upscale_to(image, name, 128, 96)
    assert one.loads == 3 and one.loaded_names == ["esrgan-2x"]
    two = Upscalers(folder, cache_size=2)
    for name in ("esrgan-2x", "compact-4x", "esrgan-2x", "compact-4x"):
        two.upscale_to(image, name, 128, 96)
    assert two.loads == 2 and two.loaded_names == ["esrgan-2x", "compact-4x"]


def test_model_passes_take_the_lock_unless_the_caller_holds_it(folder):
    lock = threading.Lock()
    upscalers = Upscalers(folder, lock=lock)
    image = picture(32, 24)
    with lock:
        assert upscalers.upscale_to(image, "Lanczos", 64, 48).size == (64, 48)  # a plain resize needs no device
        assert upscalers.upscale_to(image, "esrgan-2x", 64, 48, lock_held=True).size == (64, 48)
        waiting = threading.Thread(target=upscalers.upscale_to, args=(image, "esrgan-2x", 64, 48))
        waiting.start()
        time.sleep(0.3)
        assert waiting.is_alive()  # blocked on the lock we hold
    waiting.join(10)
    assert not waiting.is_alive()


class OutOfMemoryOverPixels(torch.nn.Module):
    """A test model: a Compact net that fails as a full GPU would on inputs of more than `limit`
    pixels, and records where and on what it ran."""

    def __init__(self, inner: torch.nn.Module, limit: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("limit", torch.tensor(limit))
        self.calls: list[tuple[str, tuple[int, int]]] = []

    def forward(self, x):
        self.calls.append((threading.current_thread().name, tuple(x.shape[-2:])))
        if x.shape[-1] * x.shape[-2] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test model)")
        return self.inner(x)


class OutOfMemoryArch(Architecture[OutOfMemoryOverPixels]):
    def __init__(self):
        super().__init__(id="OutOfMemoryTest", detect=KeyCondition.has_all("limit", "inner.body.0.weight"))
        self.built: list[OutOfMemoryOverPixels] = []

    def load(self, state_dict):
        inner = CompactArch().load({k.removeprefix("inner."): v for k, v in state_dict.items() if k != "limit"})
        model = OutOfMemoryOverPixels(inner.model, int(state_dict["limit"]))
        self.built.append(model)
        return ImageModelDescriptor(
            model, state_dict, architecture=self, purpose="SR", tags=[], supports_half=False,
            supports_bfloat16=False, scale=inner.scale, input_channels=3, output_channels=3,
        )  # fmt: skip


def test_out_of_memory_halves_the_tile_and_the_result_is_unchanged(folder, tmp_path):
    registry, arch = MAIN_REGISTRY.copy(), OutOfMemoryArch()
    registry.add(ArchSupport.from_architecture(arch))
    compact = tiny_models()["compact-4x"]
    for name, limit in (("fits-in-halves", 60 * 60), ("never-fits", 0)):
        save_file(OutOfMemoryOverPixels(compact, limit).state_dict(), tmp_path / f"{name}.safetensors")
    upscalers = Upscalers(tmp_path, registry=registry, tile=512, overlap=8)
    image = picture(101, 70)
    with Captured("zimage_server.upscalers") as captured:
        result = upscalers.upscale_to(image, "fits-in-halves", 404, 280)
    assert_same(result, direct(folder / "compact-4x.safetensors", image), levels=TILING_LEVELS)
    [model] = arch.built
    calls = model.calls
    assert calls[0][1] == (70, 101)  # the whole image first, as one tile of 101
    assert all(h * w <= 60 * 60 for _, (h, w) in calls[1:]) and len(calls) > 2
    assert {thread for thread, _ in calls} == {"model_0"}  # every run on the model thread
    assert [r.getMessage() for r in captured.records if "out of memory" in r.getMessage()] == [
        "upscaler fits-in-halves ran out of memory at 101 px tiles; trying 50"
    ]
    # Below the floor (4 x overlap) the error is the caller's, as any out-of-memory is.
    with pytest.raises(torch.cuda.OutOfMemoryError):
        upscalers.upscale_to(image, "never-fits", 404, 280)


# ---------------------------------------------------------------------------------------------
# A1111's extras


def test_extras_scale_by(folder):
    upscalers = Upscalers(folder)
    image = picture()  # 101x70
    model = direct(folder / "esrgan-2x.safetensors", image)  # 202x140
    # A1111 floors each side to a multiple of 8: 200x136.
    by_model = upscalers.extras_upscale(image, upscaling_resize=2, upscaler_1="esrgan-2x")
    assert_same(by_model, model.resize((200, 136), LANCZOS))
    by_lanczos = upscalers.extras_upscale(image, upscaling_resize=2, upscaler_1="Lanczos")
    assert_same(by_lanczos, image.resize((200, 136), LANCZOS))
    assert upscalers.extras_upscale(image, upscaling_resize=2, upscaler_1="None") is image  # A1111: no upscale


def test_extras_scale_to_with_and_without_crop(folder):
    upscalers = Upscalers(folder)
    image = picture()  # 101x70 to 300x150: factor max(2.97, 2.14) covers, both passes of the 2x model run
    twice = direct(folder / "esrgan-2x.safetensors", image, passes=2)  # 404x280
    fields = dict(resize_mode=1, upscaling_resize_w=300, upscaling_resize_h=150, upscaler_1="esrgan-2x")
    # Without crop: the whole image at the covering factor, floored to 8s (296x200), aspect kept.
    kept = upscalers.extras_upscale(image, upscaling_crop=False, **fields)
    assert_same(kept, twice.resize((296, 200), LANCZOS))
    # With crop: the centre 300x150 of the covering size (the width made up to 300, not pasted onto black).
    cropped = upscalers.extras_upscale(image, upscaling_crop=True, **fields)
    assert_same(cropped, twice.resize((300, 200), LANCZOS).crop((0, 25, 300, 175)))


def test_extras_second_upscaler_blends_in(folder):
    upscalers = Upscalers(folder)
    image = picture()
    fields = dict(resize_mode=1, upscaling_resize_w=300, upscaling_resize_h=150, upscaling_crop=True)
    twice = direct(folder / "esrgan-2x.safetensors", image, passes=2)
    first = twice.resize((300, 200), LANCZOS).crop((0, 25, 300, 175))
    second = image.resize((300, 200), NEAREST).crop((0, 25, 300, 175))
    blended = upscalers.extras_upscale(
        image, upscaler_1="esrgan-2x", upscaler_2="Nearest", extras_upscaler_2_visibility=0.3, **fields
    )
    assert_same(blended, Image.blend(first, second, 0.3))
    fields["upscaler_1"] = "esrgan-2x"
    alone = upscalers.extras_upscale(image, upscaler_2="Nearest", extras_upscaler_2_visibility=0, **fields)
    assert_same(alone, first)
    ignored = upscalers.extras_upscale(image, upscaler_2="None", extras_upscaler_2_visibility=0.5, **fields)
    assert_same(ignored, first)


# ---------------------------------------------------------------------------------------------
# The memory plan's figures


def test_upscaler_memory_counts_weights_in_bf16_and_a_tiles_activations(folder):
    weights, activations, card = upscaler_memory(folder / "compact-4x.safetensors", tile=64)
    assert weights == 2 * card.parameters and card.architecture == "Compact"
    # By hand, at 64x64 in: the peak holds the bf16 output (3 x 256 x 256 x 2 bytes) and its float32
    # copy for the conversion (x 4), and little else (the 8-channel features are 16x smaller).
    floor = 3 * 256 * 256 * (2 + 4)
    assert floor <= activations <= 1.5 * floor
    assert upscaler_memory(folder / "compact-4x.safetensors", tile=128)[1] > 3.5 * activations


@pytest.mark.parametrize(("name", "scale"), [("esrgan-2x", 2), ("compact-4x", 4)])
def test_an_overlap_short_of_the_receptive_field_stays_within_the_stated_tolerance(folder, name, scale):
    """Where the overlap is smaller than what the model sees (a real ESRGAN's field is wider than
    ComfyUI's 32 px), pixels near tile edges miss some context: close, not equal. docs/hires.md
    states the tolerance these nets show at an overlap of 2 px (fields of 18 and 4 px)."""
    image = picture(200, 150)
    expected = np.asarray(direct(folder / f"{name}.safetensors", image), np.int16)
    tiled = Upscalers(folder, tile=64, overlap=2).upscale_to(image, name, 200 * scale, 150 * scale)
    difference = np.abs(np.asarray(tiled, np.int16) - expected)
    assert difference.max() <= 16 and difference.mean() <= 0.25 and (difference > 1).mean() <= 0.02
    assert difference.max() > 1  # the shortfall is real: this is not the exact case
