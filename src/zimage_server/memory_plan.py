"""The memory model: predicted peak accelerator memory per offload mode, and the plan built from it. No torch.

Peak memory is weights resident during a stage plus that stage's activations, maximised over the
three stages of a call (text encoding, one denoising step, VAE decode):

  none          all weights + the largest stage's activations
  text_encoder  transformer + VAE + max(text encoder's streamed part + encoding, step, decode)
  model         max(text encoder + encoding, transformer + step, VAE + decode)

Weight bytes are exact for the full-size configs (parameter counts below) and for each weight
format; a loaded pipeline passes its own measured sizes instead. Activation bytes per stage are
straight lines fitted to simulation runs (memory_sim.py, `python benchmarks/memory_plan.py`), in
bf16 with flash/memory-efficient attention and 512-token prompts (the server's maximum):

  text encoding     a + b * batch
  denoising step    a + b * batch * (pixels / 256 + 512)   (image tokens + caption tokens)
  VAE decode        a + b * pixels * images decoded at once (1 with VAE slicing, else the batch)

An upscaler model (`zimage-server plan --upscaler FILE`) stays on the device once loaded, so its
weights count in every stage, and the hires fix adds a stage of its own: one tile's activations
(simulated from the file, upscalers.tile_activation_bytes) beside whatever is resident then.

The resident prompt enhancer (prompt_enhancer.py) runs the text encoder as a causal LM: an
`enhance` stage holds what text encoding holds plus its KV cache, 144 KiB a token at full size
(K and V, 36 layers, 8 KV heads of 128, bf16) for the conversation and its new tokens.

`MARGIN_BYTES` is added for what the simulation does not see: the CUDA context and kernels,
cuDNN workspace in the VAE, allocator fragmentation (0.5-1.5 GiB together, REFERENCE.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from pathlib import Path

from .model_layout import read_safetensors_header
from .settings import parse_quantize

GIB = 1024**3
MARGIN_BYTES = GIB + GIB // 4  # 1.25 GiB: the middle of REFERENCE.md's 0.5-1.5 GiB, rounded up
OFFLOAD_MODES = ("none", "text_encoder", "model")  # lightest first: the plan picks the first that fits
PIXELS_PER_IMAGE_TOKEN = 16 * 16  # 8x VAE downsampling, then 2x2 patches: one token per 16x16 pixels
CAPTION_TOKENS = 512  # max_sequence_length: prompts are padded to it in the simulation's worst case
COMPUTE_BYTES = 2  # bf16/fp16: what unquantized weights and all activations are held in

# Exact parameter counts of the full-size models (architecture.FULL_SIZE), as a fake-tensor build
# counts them; tests/test_memory_plan.py checks them against one.
TEXT_ENCODER_PARAMS = 4_022_468_096
TEXT_ENCODER_STREAMED_PARAMS = 590_820_608  # embeddings + final norm + the two blocks on the device at a time
TEXT_ENCODER_BLOCKS = 36
TEXT_ENCODER_BLOCKS_ON_DEVICE = 2  # streamed: the block being run and the one prefetched by the copy stream
# Its linear weights (7 projections per block, every input width a multiple of 256): what torchao
# converts. The 151936x2560 embedding table and the norms stay in bf16.
TEXT_ENCODER_QUANTIZABLE_PARAMS = 3_633_315_840
TEXT_ENCODER_QUANTIZABLE_ROWS = 1_105_920  # their output rows: one scale each for int8/fp8
TRANSFORMER_PARAMS = 6_154_908_736
# The transformer's linear weights whose input width is a multiple of 256: what a quantizer
# converts (everything except the 64-wide patch embedder, the norms and the biases).
TRANSFORMER_QUANTIZABLE_PARAMS = 6_153_617_408
TRANSFORMER_QUANTIZABLE_ROWS = 1_849_664  # their output rows: one scale each for int8/fp8
TRANSFORMER_LARGEST_LINEAR_PARAMS = 39_321_600  # the feed-forward's 3840x10240: GGUF dequantizes one at a time
VAE_PARAMS = 83_819_683

# Fitted by `python benchmarks/memory_plan.py` (2026-12, full size, bf16): bytes = a + b * x,
# x as in the module docstring. Checked against fresh simulation points in docs/benchmarks.md.
ACTIVATION_FIT = {
    "text_encoder": (313402, 205263360.0),
    "transformer_step": (441914, 122622.0),
    "vae_decode": (441914, 1541.0),
}

@dataclass(frozen=True)
class ComponentSizes:
    """Bytes of weights per component; `text_encoder_streamed` is what the text encoder holds on
    the device while it encodes block by block (embeddings, norms, two blocks)."""

    text_encoder: int
    text_encoder_streamed: int
    transformer: int
    vae: int
    # Transient bytes a quantized transformer adds per layer (GGUF dequantizes each weight as it runs).
    transformer_transient: int = 0
    # A ControlNet's own blocks (Z_IMAGE_CONTROLNET): resident beside the transformer, which it shares.
    controlnet: int = 0
    # An upscaler model (the hires fix's, or the extras'): resident once loaded, and one tile's activations.
    upscaler: int = 0
    upscaler_tile: int = 0
    # The resident prompt enhancer's KV cache (enhancer_kv_bytes); 0 with it off or elsewhere.
    enhancer_kv: int = 0


@dataclass(frozen=True)
class WeightFormat:
    """How a transformer format stores its quantizable weights; everything else stays in bf16."""

    name: str
    bytes_per_weight: Fraction
    scale_bytes_per_row: int = 0
    dequantized_per_layer: bool = False  # GGUF: each weight is expanded to bf16 just before its matmul

    def weight_bytes(self, params: int | Fraction, rows: int | Fraction) -> int:
        """Bytes of `params` quantizable weights in `rows` output rows."""
        return int(params * self.bytes_per_weight + rows * self.scale_bytes_per_row)


WEIGHT_FORMATS = {
    f.name: f
    for f in (
        WeightFormat("bf16", Fraction(2)),
        WeightFormat("fp16", Fraction(2)),
        WeightFormat("fp32", Fraction(4)),
        # torchao 0.18 int8 weight-only: an fp32 scale and an int8 zero point per row (Int8Tensor's inner tensors).
        WeightFormat("int8", Fraction(1), scale_bytes_per_row=5),
        WeightFormat("fp8", Fraction(1), scale_bytes_per_row=4),  # torchao float8 weight-only: an fp32 scale per row
        # GGUF block formats, bytes per block / values per block (gguf.GGML_QUANT_SIZES; a test checks
        # them). F16 GGUF tensors load as plain parameters.
        WeightFormat("q8_0", Fraction(34, 32), dequantized_per_layer=True),
        WeightFormat("q6_k", Fraction(210, 256), dequantized_per_layer=True),
        WeightFormat("q5_k", Fraction(176, 256), dequantized_per_layer=True),
        WeightFormat("q4_k", Fraction(144, 256), dequantized_per_layer=True),
        WeightFormat("q5_1", Fraction(24, 32), dequantized_per_layer=True),
        WeightFormat("q5_0", Fraction(22, 32), dequantized_per_layer=True),
        WeightFormat("q4_1", Fraction(20, 32), dequantized_per_layer=True),
        WeightFormat("q4_0", Fraction(18, 32), dequantized_per_layer=True),
        WeightFormat("f16", Fraction(2)),
    )
}


def transformer_bytes(fmt: WeightFormat) -> int:
    """Bytes of the full-size transformer's weights in `fmt`."""
    other = TRANSFORMER_PARAMS - TRANSFORMER_QUANTIZABLE_PARAMS
    other_bytes = other * (4 if fmt.name == "fp32" else COMPUTE_BYTES)
    return other_bytes + fmt.weight_bytes(TRANSFORMER_QUANTIZABLE_PARAMS, TRANSFORMER_QUANTIZABLE_ROWS)


def text_encoder_bytes(fmt: WeightFormat, blocks: int = TEXT_ENCODER_BLOCKS) -> int:
    """Bytes of the full-size text encoder in `fmt`, or of what it holds on the device while it
    streams `blocks` of its blocks at a time (embeddings and norms always there)."""
    share = Fraction(blocks, TEXT_ENCODER_BLOCKS)
    params, rows = TEXT_ENCODER_QUANTIZABLE_PARAMS * share, TEXT_ENCODER_QUANTIZABLE_ROWS * share
    total = TEXT_ENCODER_PARAMS if blocks == TEXT_ENCODER_BLOCKS else TEXT_ENCODER_STREAMED_PARAMS
    return int((total - params) * COMPUTE_BYTES) + fmt.weight_bytes(params, rows)


def full_size_components(
    fmt: WeightFormat = WEIGHT_FORMATS["bf16"], text_encoder_fmt: WeightFormat = WEIGHT_FORMATS["bf16"]
) -> ComponentSizes:
    """The full-size model's sizes: the transformer in `fmt`, the text encoder in `text_encoder_fmt`, the VAE in bf16."""
    return ComponentSizes(
        text_encoder=text_encoder_bytes(text_encoder_fmt),
        text_encoder_streamed=text_encoder_bytes(text_encoder_fmt, blocks=TEXT_ENCODER_BLOCKS_ON_DEVICE),
        transformer=transformer_bytes(fmt),
        vae=VAE_PARAMS * COMPUTE_BYTES,
        transformer_transient=TRANSFORMER_LARGEST_LINEAR_PARAMS * COMPUTE_BYTES if fmt.dequantized_per_layer else 0,
    )


ENHANCER_KV_BYTES_PER_TOKEN = 2 * 36 * 8 * 128 * 2
# The conversation before the answer: the instructions (about 270 Qwen tokens) and the prompt,
# which the enhancer keeps as written above 512 tokens (too_long). One answer at a time.
ENHANCER_CONVERSATION_TOKENS = 1024


def enhancer_kv_bytes(max_new_tokens: int) -> int:
    """The resident enhancer's KV cache at its longest: the conversation plus every new token."""
    return 0 if max_new_tokens <= 0 else ENHANCER_KV_BYTES_PER_TOKEN * (ENHANCER_CONVERSATION_TOKENS + max_new_tokens)


def activation_bytes(stage: str, width: int, height: int, batch: int, vae_slicing: bool = False) -> int:
    """A stage's activations (and the small tensors carried through it) for one call, from the fit."""
    a, b = ACTIVATION_FIT[stage]
    if stage == "text_encoder":
        x = batch
    elif stage == "transformer_step":
        x = batch * (width * height / PIXELS_PER_IMAGE_TOKEN + CAPTION_TOKENS)
    else:
        x = width * height * (1 if vae_slicing else batch)
    return int(a + b * x)


@dataclass(frozen=True)
class Prediction:
    peak_bytes: int
    stage: str  # the stage that sets the peak


def predict_peak(sizes: ComponentSizes, offload: str, width: int, height: int, batch: int, vae_slicing: bool) -> Prediction:
    """Predicted peak device bytes of one call in `offload` mode (the margin not included)."""
    encode = activation_bytes("text_encoder", width, height, batch)
    step = activation_bytes("transformer_step", width, height, batch) + sizes.transformer_transient
    decode = activation_bytes("vae_decode", width, height, batch, vae_slicing)
    upscaler = sizes.upscaler  # never offloaded: resident in every stage once loaded
    if offload == "none":
        resident = sizes.text_encoder + sizes.transformer + sizes.controlnet + sizes.vae + upscaler
        stages = {"text_encoder": resident + encode, "transformer_step": resident + step, "vae_decode": resident + decode}
        upscale = resident
    elif offload == "text_encoder":
        # Streamed, the text encoder's blocks are on the device only while it encodes.
        resident = sizes.transformer + sizes.controlnet + sizes.vae + upscaler
        stages = {
            "text_encoder": resident + sizes.text_encoder_streamed + encode,
            "transformer_step": resident + step,
            "vae_decode": resident + decode,
        }
        upscale = resident
    elif offload == "model":
        stages = {
            "text_encoder": sizes.text_encoder + upscaler + encode,
            "transformer_step": sizes.transformer + sizes.controlnet + upscaler + step,
            "vae_decode": sizes.vae + upscaler + decode,
        }
        upscale = sizes.vae + upscaler  # the VAE that decoded the first pass is still on the device
    else:
        raise ValueError(f"unknown offload mode {offload!r}")
    if upscaler:
        stages["upscale"] = upscale + sizes.upscaler_tile
    if sizes.enhancer_kv:
        # The encoder's weights as they are when it encodes; one token's activations are negligible.
        stages["enhance"] = stages["text_encoder"] - encode + sizes.enhancer_kv
    stage = max(stages, key=stages.get)
    return Prediction(stages[stage], stage)


@dataclass(frozen=True)
class PlanRow:
    """One offload mode for one configuration: its predicted peak and whether it fits with the margin."""

    offload: str
    transformer: str  # the transformer's weight format, or the file it was read from
    quantize: str | None
    width: int
    height: int
    batch: int
    vae_slicing: bool
    predicted_peak_bytes: int
    limiting_stage: str
    margin_bytes: int
    gpu_memory_bytes: int
    fits: bool

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"{self.offload}: ~{self.predicted_peak_bytes / GIB:.2f} GiB at {self.width}x{self.height} x{self.batch}"
            f" (peak in {self.limiting_stage}; VAE slicing {'on' if self.vae_slicing else 'off'})"
            f" + {self.margin_bytes / GIB:.2f} GiB margin {verdict} in {self.gpu_memory_bytes / GIB:.1f} GiB"
        )


def plan_mode(
    sizes: ComponentSizes, offload: str, gpu_memory: int, width: int, height: int, batch: int,
    transformer: str = "bf16", quantize: str | None = None, margin: int = MARGIN_BYTES,
) -> PlanRow:
    """`offload` mode's row, VAE slicing on exactly when the unsliced decode would not fit (it never saves time)."""
    vae_slicing = False
    prediction = predict_peak(sizes, offload, width, height, batch, vae_slicing=False)
    if batch > 1 and prediction.peak_bytes + margin > gpu_memory:
        sliced = predict_peak(sizes, offload, width, height, batch, vae_slicing=True)
        vae_slicing, prediction = sliced.peak_bytes < prediction.peak_bytes, min(prediction, sliced, key=lambda p: p.peak_bytes)
    return PlanRow(
        offload=offload, transformer=transformer, quantize=quantize, width=width, height=height, batch=batch,
        vae_slicing=vae_slicing, predicted_peak_bytes=prediction.peak_bytes, limiting_stage=prediction.stage,
        margin_bytes=margin, gpu_memory_bytes=gpu_memory, fits=prediction.peak_bytes + margin <= gpu_memory,
    )


def plan(
    gpu_memory: int, width: int = 1024, height: int = 1024, batch: int = 1,
    transformer: str | Path = "bf16", quantize: str | None = None, margin: int = MARGIN_BYTES,
    controlnet: Path | None = None, upscaler: Path | None = None, enhance_tokens: int = 0,
) -> list[PlanRow]:
    """Every offload mode's row for the full-size model, lightest first; the first that fits is the one to use.

    controlnet: a ControlNet checkpoint file, whose tensors (at bf16) are resident beside the transformer.
    upscaler: an upscaler model file (reading it imports torch): its weights and a tile's activations.
    enhance_tokens: the resident prompt enhancer's budget of new tokens (0: it is off or elsewhere)."""
    sizes, label = model_sizes(transformer, quantize)
    sizes = replace(sizes, enhancer_kv=enhancer_kv_bytes(enhance_tokens))
    if controlnet is not None:
        sizes = replace(sizes, controlnet=file_weight_bytes(Path(controlnet))[0])
    if upscaler is not None:
        weights, tile = upscaler_sizes(Path(upscaler))
        sizes = replace(sizes, upscaler=weights, upscaler_tile=tile)
    # "int8" reads as what it means: transformer=int8,text_encoder=int8.
    quantized = ",".join(f"{component}={kind}" for component, kind in parse_quantize(quantize or "none").items()) or None
    return [plan_mode(sizes, mode, gpu_memory, width, height, batch, label, quantized, margin) for mode in OFFLOAD_MODES]


@functools.lru_cache(maxsize=8)
def upscaler_sizes(path: Path) -> tuple[int, int]:
    """An upscaler file's bytes on a CUDA card: its weights in the dtype they run in there (bf16 where
    the architecture allows), and one default tile's activations. Read once per path (the plan asks
    again for each configuration it tries); spandrel reads the file, so this imports torch."""
    from .upscalers import DEFAULT_TILE, upscaler_memory

    weights, tile, _ = upscaler_memory(path, DEFAULT_TILE)
    return weights, tile


def choose(rows: list[PlanRow]) -> tuple[PlanRow, str]:
    """The lightest row that fits (else the heaviest offload, which needs least), and the reason in words."""
    chosen = next((row for row in rows if row.fits), rows[-1])
    lighter = [row.describe() for row in rows[: rows.index(chosen)]]
    reason = chosen.describe() + (f"; lighter modes do not fit ({'; '.join(lighter)})" if lighter else "")
    return chosen, reason


def model_sizes(transformer: str | Path = "bf16", quantize: str | None = None) -> tuple[ComponentSizes, str]:
    """Sizes for a transformer named by format (`bf16`, `q4_k`, ...) or by file, with Z_IMAGE_QUANTIZE's
    `quantize` ("int8", "transformer=int8,text_encoder=fp8", ...) applied on top, and the transformer's label.

    A file's weight bytes are read from its header (GGUF tensor types, safetensors dtypes), with
    float32 tensors counted in bf16 as the loader casts them."""
    choices = parse_quantize(quantize or "none")
    text_encoder_fmt = WEIGHT_FORMATS[choices.get("text_encoder", "bf16")]
    path = Path(str(transformer))
    if path.is_file():
        weights, dequantized = file_weight_bytes(path)
        if dequantized and "transformer" in choices:
            raise ValueError(f"{path.name} is already a GGUF quant; quantize only the text encoder (text_encoder=int8)")
        if "transformer" not in choices:
            transient = TRANSFORMER_LARGEST_LINEAR_PARAMS * COMPUTE_BYTES if dequantized else 0
            sizes = replace(full_size_components(text_encoder_fmt=text_encoder_fmt), transformer=weights,
                            transformer_transient=transient)
            return sizes, path.name
        label = path.name
    else:
        label = weight_format(str(transformer)).name
        if label not in ("bf16", "fp16", "fp32") and "transformer" in choices:
            raise ValueError(f"a {label} transformer is already quantized; quantize only the text encoder (text_encoder=int8)")
    fmt = WEIGHT_FORMATS[choices["transformer"]] if "transformer" in choices else weight_format(label)
    return full_size_components(fmt, text_encoder_fmt), label


def weight_format(name: str) -> WeightFormat:
    key = name.lower().removeprefix("gguf-").removeprefix("gguf_")
    if key not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {name!r}; known: {', '.join(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[key]


def file_weight_bytes(path: Path) -> tuple[int, bool]:
    """Bytes a transformer file's tensors take once loaded, and whether they are dequantized per layer."""
    if path.suffix == ".gguf":
        from gguf import GGMLQuantizationType, GGUFReader

        total, quantized = 0, False
        for tensor in GGUFReader(path).tensors:
            # As diffusers loads them: F32 and F16 become plain parameters (in the compute dtype);
            # every other type stays as stored and is dequantized per layer.
            if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                total += int(tensor.n_elements) * COMPUTE_BYTES
            else:
                total += int(tensor.n_bytes)
                quantized = True
        return total, quantized
    if path.suffix == ".safetensors":
        itemsize = {"F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1}
        header = read_safetensors_header(path)
        return sum(math.prod(info["shape"]) * itemsize.get(info["dtype"], COMPUTE_BYTES) for info in header.values()), False
    raise ValueError(f"{path}: only .gguf and .safetensors transformer files are read")
