"""LoRAs: the folder, prompt tags, every file layout against plain diffusers, and the hot-swapped slot."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ZImageImg2ImgPipeline, ZImagePipeline
from PIL import Image
from safetensors.torch import save_file

from zimage_server.lora_library import LoraError, LoraLibrary, check_lora_limits, merge_requests, parse_lora_tags
from zimage_server.loras import LoraSlot, load_lora_file, lora_target_modules, read_info

RANK = 4
ALPHA = 2.0  # != RANK, so a loader that forgets to fold alpha/rank in gives another image
SLOT_RANK = 12
# Max abs difference in 0..1 image space; fp32 on the tiny model lands around 1e-7.
TOLERANCE = 1e-5
BLOCKS = ("layers.0", "layers.1", "noise_refiner.0", "context_refiner.0")
FEED_FORWARD = ("w1", "w2", "w3")


# ---------------------------------------------------------------------------------------------
# Random LoRAs for the tiny transformer, written in each layout people publish


def random_lora(transformer, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA in Z-Image's original tree (fused qkv), as unscaled down/up tensors and one alpha."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())

    def pair(in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.randn(RANK, in_features, generator=generator) * 0.3,
            torch.randn(out_features, RANK, generator=generator) * 0.3,
        )

    lora = {}
    for block in BLOCKS:
        dim = modules[f"{block}.attention.to_q"].in_features
        lora[f"{block}.attention.qkv"] = pair(dim, 3 * dim)
        lora[f"{block}.attention.out"] = pair(dim, dim)
        for name in FEED_FORWARD:
            linear = modules[f"{block}.feed_forward.{name}"]
            lora[f"{block}.feed_forward.{name}"] = pair(linear.in_features, linear.out_features)
        if f"{block}.adaLN_modulation.0" in modules:
            linear = modules[f"{block}.adaLN_modulation.0"]
            lora[f"{block}.adaLN_modulation.0"] = pair(linear.in_features, linear.out_features)
    return lora


def split_modules(lora: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The same LoRA on diffusers' tree: q, k, v share the down weight and split the up weight."""
    split = {}
    for module, (down, up) in lora.items():
        if module.endswith(".qkv"):
            attention = module.removesuffix(".qkv")
            for projection, chunk in zip(("to_q", "to_k", "to_v"), up.chunk(3)):
                split[f"{attention}.{projection}"] = (down, chunk.contiguous())
        elif module.endswith(".attention.out"):
            split[module.removesuffix("out") + "to_out.0"] = (down, up)
        else:
            split[module] = (down, up)
    return split


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def with_alpha(modules: dict, key_of, down_part: str, up_part: str) -> dict[str, torch.Tensor]:
    state_dict = {}
    for module, (down, up) in modules.items():
        state_dict[f"{key_of(module)}.{down_part}.weight"] = down.clone()
        state_dict[f"{key_of(module)}.{up_part}.weight"] = up.contiguous()
        state_dict[f"{key_of(module)}.alpha"] = torch.tensor(ALPHA)
    return state_dict


def alpha_folded(modules: dict, key_of) -> dict[str, torch.Tensor]:
    state_dict = {}
    for module, (down, up) in modules.items():
        state_dict[f"{key_of(module)}.lora_A.weight"] = down.clone()
        state_dict[f"{key_of(module)}.lora_B.weight"] = (up * (ALPHA / RANK)).contiguous()
    return state_dict


LAYOUTS = {
    # What diffusers itself saves: the equivalent every other layout is checked against.
    "diffusers": lambda lora: alpha_folded(split_modules(lora), lambda m: f"transformer.{m}"),
    "kohya-original": lambda lora: with_alpha(lora, kohya_name, "lora_down", "lora_up"),
    "kohya-diffusers": lambda lora: with_alpha(split_modules(lora), kohya_name, "lora_down", "lora_up"),
    "ai-toolkit": lambda lora: alpha_folded(split_modules(lora), lambda m: f"diffusion_model.{m}"),
    # The two fused-qkv layouts diffusers 0.42 does not convert.
    "fused-peft": lambda lora: alpha_folded(lora, lambda m: f"diffusion_model.{m}"),
    "fused-kohya": lambda lora: with_alpha(lora, lambda m: f"diffusion_model.{m}", "lora_down", "lora_up"),
}


# ---------------------------------------------------------------------------------------------
# Fixtures


def generate(pipe, steps: int = 2, **inputs) -> np.ndarray:
    return pipe(
        "a photo of a cat",
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=0.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
        **inputs,
    ).images


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


@pytest.fixture(scope="module")
def model_path(models_dir: Path) -> Path:
    return models_dir / "z-image-turbo"


def load_pipe(model_path: Path) -> ZImagePipeline:
    return ZImagePipeline.from_pretrained(model_path)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    """`one` in every layout, `two` for stacking, and `styles/ink` in a subfolder."""
    folder = tmp_path_factory.mktemp("loras")
    transformer = load_pipe(model_path).transformer
    one, two = random_lora(transformer, seed=1), random_lora(transformer, seed=2)
    for layout, write in LAYOUTS.items():
        save_file(write(one), folder / f"one-{layout}.safetensors")
    save_file(LAYOUTS["diffusers"](two), folder / "two.safetensors")
    (folder / "styles").mkdir()
    save_file(LAYOUTS["kohya-original"](two), folder / "styles" / "ink.safetensors")
    return folder


def reference_image(model_path: Path, lora_dir: Path, adapters: dict[str, float]) -> np.ndarray:
    """What plain diffusers gives: each LoRA its own adapter, scales through set_adapters."""
    pipe = load_pipe(model_path)
    for name in adapters:
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name.replace("-", "_"))
    pipe.set_adapters([name.replace("-", "_") for name in adapters], list(adapters.values()))
    return generate(pipe)


class Slotted:
    """A pipeline with the slot installed, and what it gave before any LoRA."""

    def __init__(self, model_path: Path, lora_dir: Path) -> None:
        self.pipe = load_pipe(model_path)
        self.library = LoraLibrary(lora_dir, read_info)
        self.slot = LoraSlot(self.pipe, self.library, max_rank=SLOT_RANK, cache_files=4)
        self.base_image = generate(self.pipe)
        self.base_weights = {
            key: value.clone() for key, value in self.pipe.transformer.state_dict().items() if "lora_" not in key
        }

    def image(self, key) -> np.ndarray:
        self.slot.activate(merge_requests(key))
        return generate(self.pipe)


@pytest.fixture(scope="module")
def slotted(model_path: Path, lora_dir: Path) -> Slotted:
    return Slotted(model_path, lora_dir)


@pytest.fixture(scope="module")
def one_reference(model_path: Path, lora_dir: Path) -> np.ndarray:
    return reference_image(model_path, lora_dir, {"one-diffusers": 0.8})


# ---------------------------------------------------------------------------------------------
# Images: the slot against plain diffusers


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_diffusers_image(slotted: Slotted, one_reference: np.ndarray, layout: str) -> None:
    image = slotted.image([(f"one-{layout}", 0.8)])
    diff = max_diff(image, one_reference)
    print(f"{layout}: max abs diff vs diffusers {diff:.2e}")
    assert diff <= TOLERANCE
    assert max_diff(image, slotted.base_image) > 1e-2  # the LoRA does change the image


def test_alpha_in_diffusers_saved_config_is_folded_in(
    slotted: Slotted, one_reference: np.ndarray, model_path: Path, lora_dir: Path
) -> None:
    """Files diffusers saves keep alpha in a LoraConfig in the header, not in the tensors."""
    lora = random_lora(load_pipe(model_path).transformer, seed=1)
    state_dict = {}
    for module, (down, up) in split_modules(lora).items():
        state_dict[f"transformer.{module}.lora_A.weight"] = down.clone()
        state_dict[f"transformer.{module}.lora_B.weight"] = up.clone()
    config = {
        "transformer.r": RANK,
        "transformer.lora_alpha": ALPHA,
        "transformer.target_modules": ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3", "adaLN_modulation.0"],
    }
    save_file(
        state_dict, lora_dir / "one-saved-config.safetensors", metadata={"lora_adapter_metadata": json.dumps(config)}
    )
    assert max_diff(reference_image(model_path, lora_dir, {"one-saved-config": 0.8}), one_reference) <= TOLERANCE
    assert max_diff(slotted.image([("one-saved-config", 0.8)]), one_reference) <= TOLERANCE


def test_stacked_loras_match_diffusers_set_adapters(slotted: Slotted, model_path: Path, lora_dir: Path) -> None:
    reference = reference_image(model_path, lora_dir, {"one-diffusers": 0.7, "two": -0.5})
    image = slotted.image([("two", -0.5), ("one-kohya-original", 0.7)])
    diff = max_diff(image, reference)
    print(f"stack of two: max abs diff vs diffusers {diff:.2e}")
    assert diff <= TOLERANCE


def test_scale_zero_and_no_lora_give_the_base_image_bit_exactly(slotted: Slotted) -> None:
    slotted.image([("two", 1.0)])
    assert np.array_equal(slotted.image([("one-diffusers", 0.0)]), slotted.base_image)
    slotted.image([("one-diffusers", 1.0), ("two", 0.5)])
    assert np.array_equal(slotted.image([]), slotted.base_image)
    for key, value in slotted.pipe.transformer.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, slotted.base_weights[key]), key


def test_the_same_key_twice_swaps_once(slotted: Slotted, monkeypatch: pytest.MonkeyPatch) -> None:
    slotted.slot.activate(merge_requests([("two", 0.5)]))
    swaps = []
    monkeypatch.setattr(slotted.pipe, "load_lora_weights", lambda *args, **kwargs: swaps.append(args))
    slotted.slot.activate(merge_requests([("two", 0.25), ("two", 0.25)]))
    assert swaps == []


def test_img2img_from_pipe_shares_the_slot(slotted: Slotted, model_path: Path, lora_dir: Path) -> None:
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))

    def img2img(pipe) -> np.ndarray:
        return generate(ZImageImg2ImgPipeline.from_pipe(pipe), steps=4, image=init, strength=0.7)

    plain = load_pipe(model_path)
    plain.load_lora_weights(str(lora_dir / "two.safetensors"), adapter_name="two")
    plain.set_adapters(["two"], [0.9])
    slotted.slot.activate(merge_requests([("two", 0.9)]))
    assert max_diff(img2img(slotted.pipe), img2img(plain)) <= TOLERANCE


def test_switching_loras_adds_no_compiled_graphs(model_path: Path, lora_dir: Path) -> None:
    torch._dynamo.reset()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    pipe = load_pipe(model_path)
    slot = LoraSlot(pipe, LoraLibrary(lora_dir, read_info), max_rank=SLOT_RANK)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=counting_backend)
    base = generate(pipe)
    generate(pipe)
    after_warm_up = len(compiles)
    assert after_warm_up > 0
    images = []
    for key in ([("two", 1.0)], [("one-fused-peft", 0.5), ("two", 1.0)], [], [("styles/ink", -1.0)], []):
        slot.activate(merge_requests(key))
        images.append(generate(pipe))
    assert len(compiles) == after_warm_up
    assert max_diff(images[0], base) > 1e-2  # the compiled blocks do see the swapped-in weights
    assert np.array_equal(images[2], base) and np.array_equal(images[4], base)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Refusals: a clear LoraError naming the LoRA, and the slot keeps working


BAD_FILES = {
    "truncated": (
        lambda folder: (folder / "one-diffusers.safetensors").read_bytes()[:300],
        "not a readable .safetensors",
    ),
    "not-safetensors": (
        lambda folder: b"PK\x03\x04 a zip, or a pickle, not safetensors",
        "not a readable .safetensors",
    ),
    "lokr": (lambda folder: {"diffusion_model.layers.0.attention.to_q.lokr_w1": torch.zeros(2, 2)}, "LoKr"),
    "loha": (lambda folder: {"lora_unet_layers_0_attention_to_q.hada_w1_a": torch.zeros(2, 32)}, "LoHa"),
    "text-encoder": (
        lambda folder: {
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 16),
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(16, 2),
        },
        "text-encoder",
    ),
    "flux": (
        lambda folder: {
            "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2),
        },
        "another model",
    ),
    "half-matching": (
        lambda folder: {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(2, 32),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.ones(32, 2),
            "transformer.layers.9.attention.to_q.lora_A.weight": torch.ones(2, 32),
            "transformer.layers.9.attention.to_q.lora_B.weight": torch.ones(32, 2),
        },
        "layers.9.attention.to_q",
    ),
    "sdxl": (
        lambda folder: {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0),
        },
        "another model",
    ),
    "wrong-size": (
        lambda folder: {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(2, 64),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.ones(64, 2),
        },
        "32x32",
    ),
}


@pytest.fixture(scope="module")
def bad_dir(lora_dir: Path) -> Path:
    folder = lora_dir / "bad"
    folder.mkdir()
    for name, (content, _) in BAD_FILES.items():
        made = content(lora_dir)
        if isinstance(made, bytes):
            (folder / f"{name}.safetensors").write_bytes(made)
        else:
            save_file(made, folder / f"{name}.safetensors")
    (lora_dir.parent / "outside.safetensors").write_bytes((lora_dir / "two.safetensors").read_bytes())
    (folder / "escape.safetensors").symlink_to(lora_dir.parent / "outside.safetensors")
    return folder


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_refused_whole(slotted: Slotted, bad_dir: Path, one_reference: np.ndarray, name: str) -> None:
    before = slotted.image([("one-diffusers", 0.8)])
    with pytest.raises(LoraError, match=BAD_FILES[name][1]) as refused:
        slotted.slot.activate(merge_requests([(f"bad/{name}", 1.0)]))
    assert f"bad/{name}" in str(refused.value)
    assert slotted.slot.active == (("one-diffusers", 0.8),)
    assert np.array_equal(generate(slotted.pipe), before)


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "bad/escape", "a\0b", "", "nope", "styles/../two"])
def test_names_outside_the_folder_or_unknown_are_refused(slotted: Slotted, bad_dir: Path, name: str) -> None:
    with pytest.raises(LoraError) as refused:
        slotted.slot.activate(merge_requests([(name, 1.0)]))
    assert repr(name.removesuffix(".safetensors")) in str(refused.value) or "empty" in str(refused.value)
    assert np.array_equal(slotted.image([]), slotted.base_image)


def test_a_stack_over_the_slot_rank_is_refused(slotted: Slotted) -> None:
    too_many = [("one-diffusers", 1.0), ("two", 1.0), ("styles/ink", 1.0), ("one-ai-toolkit", 1.0)]
    with pytest.raises(LoraError, match="Z_IMAGE_LORA_MAX_RANK"):
        slotted.slot.activate(merge_requests(too_many))
    assert np.array_equal(slotted.image([]), slotted.base_image)


def test_load_lora_file_refuses_a_partial_match(model_path: Path, bad_dir: Path) -> None:
    with pytest.raises(LoraError, match="half-matching"):
        load_lora_file(bad_dir / "half-matching.safetensors", lora_target_modules(load_pipe(model_path).transformer), "half-matching")


# ---------------------------------------------------------------------------------------------
# The folder


def test_library_lists_names_ranks_modules_and_hashes(tmp_path: Path, lora_dir: Path) -> None:
    library = LoraLibrary(tmp_path, read_info)
    assert library.list() == []
    (tmp_path / "styles").mkdir()
    target = tmp_path / "styles" / "ink.safetensors"
    target.write_bytes((lora_dir / "one-kohya-original.safetensors").read_bytes())
    (tmp_path / "notes.txt").write_text("not a LoRA")
    [info] = library.list()  # found without a restart
    assert info.name == "styles/ink"
    assert info.size_bytes == target.stat().st_size
    assert info.rank == RANK
    assert info.sha256_short == hashlib.sha256(target.read_bytes()).hexdigest()[:12]
    assert "attention.to_q" in info.modules and "feed_forward.w2" in info.modules
    assert "adaLN_modulation.0" in info.modules and len(info.modules) == len(set(info.modules))
    target.write_bytes((lora_dir / "two.safetensors").read_bytes())
    assert library.info("styles/ink").sha256_short == hashlib.sha256(target.read_bytes()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Prompt tags and keys


def test_parse_lora_tags() -> None:
    prompt, pairs = parse_lora_tags(
        "a cat <lora:pixel-art:0.8>  on a chair <lora:styles/ink>\nwatercolor <lora:x:-1.5:0.2>"
    )
    assert prompt == "a cat on a chair\nwatercolor"
    assert pairs == [("pixel-art", 0.8), ("styles/ink", 1.0), ("x", -1.5)]
    assert parse_lora_tags("no tags here") == ("no tags here", [])
    with pytest.raises(LoraError, match="pixel"):
        parse_lora_tags("<lora:pixel:strong>")


def test_merge_requests_adds_repeats_and_is_canonical() -> None:
    assert merge_requests([("b", 0.1), ("a", 1.0), ("b", 0.2)]) == (("a", 1.0), ("b", 0.3))
    assert merge_requests([("a", 1.0), ("b", 0.3)]) == merge_requests([("b", 0.3), ("a", 1.0)])


def test_check_lora_limits_names_the_lora() -> None:
    check_lora_limits([("a", 4.0), ("b", -4.0)], max_loras=2)
    with pytest.raises(LoraError, match="'b'"):
        check_lora_limits([("a", 1.0), ("b", 4.5)], max_loras=4)
    with pytest.raises(LoraError, match="'a'"):
        check_lora_limits([("a", float("nan"))], max_loras=4)
    with pytest.raises(LoraError, match="at most 2"):
        check_lora_limits([("a", 1.0), ("b", 1.0), ("c", 1.0)], max_loras=2)
