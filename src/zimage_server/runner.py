"""The model runner: load the pipelines, hold the lock, encode prompts, run one call. Imports torch.

With acceleration.py (placement) this is the only module that imports torch and diffusers. It
knows nothing of requests, batching or retries (policy.py): `run_call(params, rows)` makes one
pipeline call for the given image rows, all sharing `params`, and returns one image per row.

All pipeline calls go through `ModelRunner.lock`: a diffusers pipeline keeps per-call state on the
object (and pipelines made with `from_pipe` share modules and the scheduler), so two calls must
never overlap. The lock covers the device work only: the decoded pixels leave the lock as a
tensor, and their copy to the host and conversion to images happen after it is released, so the
next call starts while this one's images are made.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence

import torch
from PIL import Image

from .acceleration import Acceleration, AttentionPlan, captions_need_mask, prepare_pipeline, resolve_attention
from .faults import FaultInjector
from .lora_library import LoraLibrary
from .loras import LoraSlot, installed_slot, read_info
from .logs import logged_step
from .model_layout import verify_model_dir
from .prompt_cache import PromptEmbeddingCache
from .settings import Settings, SettingsError
from .specs import CallParams, GenerationCancelled, GenerationSpec, ImageRow
from .variants import VARIANTS, Variant

log = logging.getLogger("zimage_server.runner")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PIXELS_PER_TOKEN = 16  # VAE downsamples 8x and the transformer patches 2x2 latents.
# With torch.compile, warm-up runs these (width, height, prompts): the default size first, so its
# kernels specialise on it, then a second size and a two-prompt batch of unequal lengths, so the
# compiled blocks turn dynamic in sequence length and batch and the masked path exists too. Other
# sizes then reuse the dynamic kernels instead of compiling on a user's request.
COMPILE_WARM_UP = ((1024, 1024, ("warm-up",)), (512, 512, ("warm-up", "a longer warm-up prompt " * 8)))

# Z-Image decodes with the FLUX VAE (16 latent channels, same scaling and shift), so the linear fit
# from FLUX latents to RGB that ComfyUI publishes for its previews (comfy/latent_formats.py, Flux)
# gives a recognisable image for about the cost of one matrix product, with no VAE decode.
LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("Z_IMAGE_DEVICE=cuda but no CUDA device is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("Z_IMAGE_DEVICE=mps but MPS is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, variant: Variant) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" or variant.bf16_only:
        return torch.bfloat16
    return torch.float32


def latent_previews(latents: torch.Tensor) -> list[Image.Image]:
    """One cheap RGB preview per image of a (batch, 16, h, w) latents tensor, at latent size (1/8 of the output)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias  # roughly -1..1
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(batch, 3, h, w) pixels in 0..1, as diffusers' `output_type="pt"` gives them, to PIL images.

    The same float32 arithmetic as diffusers' own "pil" output (pt_to_numpy, then numpy_to_pil:
    x 255, round half to even, to uint8), so the images are bit-for-bit what an `output_type="pil"`
    call returns; done on the tensor's own device, so only a quarter of the bytes cross to the host."""
    array = pixels.float().mul(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in array]


class ModelRunner:
    """A loaded pipeline on its device, its edit pipelines, the prompt cache, and the lock every call takes."""

    def __init__(
        self,
        pipeline,
        settings: Settings,
        device: torch.device,
        dtype: torch.dtype,
        acceleration: Acceleration | None = None,
        faults: FaultInjector | None = None,
    ):
        self.pipeline = pipeline
        self.settings = settings
        self.variant = VARIANTS[settings.variant]
        self.device = device
        self.dtype = dtype
        self.lock = threading.Lock()
        # The resident adapter each call's LoRAs are swapped into; it lives on the transformer, so
        # every runner over this pipeline (and the edit pipelines) shares it. None: LoRA is off.
        self.lora_slot: LoraSlot | None = installed_slot(pipeline)
        self.calls = 0  # pipeline calls made: how tests see that requests shared a call
        self.faults = faults  # test-only: fails or stalls calls whose prompts carry markers
        axes_lens = pipeline.transformer.config.axes_lens
        # Image token rows/columns index the rope tables along axes 1 and 2; beyond them the
        # embedder fails with an IndexError, so sizes past this are refused up front.
        self.max_height = int(axes_lens[1]) * PIXELS_PER_TOKEN
        self.max_width = int(axes_lens[2]) * PIXELS_PER_TOKEN
        self.acceleration = acceleration or Acceleration(
            offload="none", offload_reason="placed by the caller", attention=AttentionPlan("native", True), compile="off"
        )
        self.mode_pipelines = {"generate": pipeline, "omni": pipeline}
        if self.variant.edit_method == "img2img":
            self.mode_pipelines["img2img"], self.mode_pipelines["inpaint"] = self._edit_pipelines()
        # Text-to-image style pipelines take per-prompt embeddings, so prompts go through the cache;
        # Omni's embeddings depend on its condition images, so it encodes prompts itself.
        self.caches_prompts = self.variant.edit_method != "omni"
        self.prompt_cache: PromptEmbeddingCache[torch.Tensor] = PromptEmbeddingCache(settings.prompt_cache)
        # Where embeddings and latents must live; with model offload this is the GPU while weights rest on the CPU.
        self.execution_device = pipeline._execution_device
        # What running out of memory looks like here: CUDA's allocator error, or the host's.
        self.out_of_memory_errors: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)

    def _edit_pipelines(self) -> tuple:
        """Image-to-image and inpainting pipelines over the loaded modules: no second copy of the weights."""
        from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        # from_pipe casts the shared modules to dtype (float32 when none is given, which would also
        # silently convert the text-to-image pipeline); it warns about that cast even when it is a no-op.
        diffusers_logging.set_verbosity_error()
        try:
            pipelines = tuple(
                cls.from_pipe(self.pipeline, dtype=self.dtype) for cls in (ZImageImg2ImgPipeline, ZImageInpaintPipeline)
            )
        finally:
            diffusers_logging.set_verbosity(verbosity)
        for pipeline in pipelines:
            pipeline.set_progress_bar_config(disable=True)
        if self.pipeline.transformer.dtype != self.dtype:
            raise RuntimeError(f"edit pipelines changed the model's dtype to {self.pipeline.transformer.dtype}")
        return pipelines

    def run_call(self, params: CallParams, rows: Sequence[ImageRow]) -> list[Image.Image]:
        """One pipeline call making one image per row, every row with `params`; images in row order.

        Each image gets its own CPU generator seeded with its row's seed, as diffusers users seed
        it, so an image never depends on what it was batched with."""
        with self.lock:
            self.calls += 1
            if self.lora_slot is not None:
                self.lora_slot.activate(params.loras)
            prompts, needs_mask = self._prompt_inputs(params, rows)
            with self.acceleration.attention.applied(needs_mask):
                output = self.mode_pipelines[params.mode](
                    **prompts,
                    **self._image_inputs(params, rows),
                    generator=[torch.Generator("cpu").manual_seed(row.seed) for row in rows],
                    width=params.width,
                    height=params.height,
                    num_inference_steps=params.num_inference_steps,
                    guidance_scale=params.guidance_scale,
                    cfg_normalization=params.cfg_normalization,
                    cfg_truncation=params.cfg_truncation,
                    max_sequence_length=params.max_sequence_length,
                    output_type="pt",
                    callback_on_step_end=self._step_callback(rows),
                )
        images = to_images(output.images)
        if self.faults is not None:
            images = self.faults.after_call([row.prompt for row in rows], images)
        return images

    @staticmethod
    def _image_inputs(params: CallParams, rows: Sequence[ImageRow]) -> dict:
        """An edit call's image arguments: an input (and mask) per image, or Omni's shared references."""
        if params.mode == "omni":
            return {"image": list(rows[0].spec.images)}
        if params.mode == "generate":
            return {}
        inputs = {"image": [row.spec.images[0] for row in rows], "strength": params.strength}
        if params.mode == "inpaint":
            inputs["mask_image"] = [row.spec.mask for row in rows]
        return inputs

    def encode_prompts(self, texts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        """Per-text embeddings on the execution device, through the prompt cache. Call under the lock."""
        return self.prompt_cache.encode(texts, max_sequence_length, self._encode_batch)

    def _encode_batch(self, texts: list[str], max_sequence_length: int) -> list[torch.Tensor]:
        # The pipeline's own encoder: same chat template, padding and hidden layer as an uncached call.
        # Without no_grad the cached tensors would keep the text encoder's autograd graph alive.
        with torch.no_grad():
            embeddings, _ = self.pipeline.encode_prompt(
                prompt=texts,
                device=self.execution_device,
                do_classifier_free_guidance=False,
                max_sequence_length=max_sequence_length,
            )
        return [embedding.to(self.execution_device) for embedding in embeddings]

    def _prompt_inputs(self, params: CallParams, rows: Sequence[ImageRow]) -> tuple[dict, bool]:
        """Pipeline keyword arguments for the rows' prompts, and whether the call will need an attention mask."""
        prompts = [row.prompt for row in rows]
        negatives = [row.negative_prompt for row in rows]
        if not self.caches_prompts:
            return {"prompt": prompts, "negative_prompt": negatives}, True
        # Negative prompts only matter with classifier-free guidance (guidance_scale > 0).
        cfg = params.guidance_scale > 0
        embeddings = self.encode_prompts(prompts + negatives if cfg else prompts, params.max_sequence_length)
        positive, negative = embeddings[: len(prompts)], embeddings[len(prompts) :]
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        needs_mask = captions_need_mask([len(e) for e in embeddings], SEQ_MULTI_OF)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative if cfg else None}, needs_mask

    def _step_callback(self, rows: Sequence[ImageRow]):
        """A diffusers step callback that reports progress per request and stops a call nobody awaits."""
        # Rows of the latents batch that belong to each observed request in this call.
        observed: dict[int, tuple[GenerationSpec, list[int]]] = {}
        for index, row in enumerate(rows):
            if row.spec.observer is not None:
                observed.setdefault(id(row.spec), (row.spec, []))[1].append(index)
        faults = self.faults
        if not observed and faults is None:
            return None
        requests = len({id(row.spec) for row in rows})
        everyone_observed = len(observed) == requests
        prompts = [row.prompt for row in rows]

        def on_step_end(pipeline, step: int, _timestep, tensors: dict) -> dict:
            if faults is not None:
                faults.after_step(prompts, requests)
            total = pipeline.num_timesteps
            for spec, spec_rows in observed.values():
                observer = spec.observer
                if observer.cancelled:
                    continue
                latents = tensors["latents"][spec_rows]
                previews = latent_previews(latents) if observer.wants_previews(step + 1, total) else None
                observer.on_step(step + 1, total, latents, previews)
            if everyone_observed and all(spec.observer.cancelled for spec, _ in observed.values()):
                raise GenerationCancelled(f"stopped after step {step + 1}: every client left")
            return {}

        return on_step_end

    @property
    def lora_library(self) -> LoraLibrary | None:
        """The LoRA folder requests may name; None when LoRA is off (Z_IMAGE_LORA_MAX_RANK=0)."""
        return self.lora_slot.library if self.lora_slot is not None else None

    def free_memory(self) -> None:
        """Drop garbage and, on CUDA, the allocator's cached blocks, after running out of memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def memory_stats(self) -> dict[str, int] | None:
        """GPU memory in bytes (in use by tensors, reserved by the allocator, peak in use); None off CUDA."""
        if self.device.type != "cuda":
            return None
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def warm_up_params(self, mode: str, width: int, height: int) -> CallParams:
        return CallParams(
            mode=mode,
            width=width,
            height=height,
            num_inference_steps=1,
            guidance_scale=self.variant.default_guidance,
            max_sequence_length=64,
            strength=1.0 if mode in ("img2img", "inpaint") else None,
        )

    def warm_up(self, compile_shapes: tuple = COMPILE_WARM_UP) -> float:
        """Generations (at the sizes users send, when compiling) and one tiny edit, so that lazy
        initialisation and compilation are not paid by the first user."""
        started = time.perf_counter()
        shapes = compile_shapes if self.acceleration.compile != "off" else ((64, 64, ("warm-up",)),)
        for width, height, prompts in shapes:
            params = self.warm_up_params("generate", width, height)
            self.run_call(params, [ImageRow(GenerationSpec(p, None, (i,), params), i) for i, p in enumerate(prompts)])
        # The first edit would otherwise pay for the VAE encoder's (and Omni's SigLIP's) first run.
        params = self.warm_up_params(self.variant.edit_method, 64, 64)
        gray = Image.new("RGB", (64, 64), (128, 128, 128))
        self.run_call(params, [ImageRow(GenerationSpec("warm-up", None, (0,), params, images=(gray,)), 0)])
        return time.perf_counter() - started


def load_runner(settings: Settings, faults: FaultInjector | None = None) -> ModelRunner:
    """Load MODELS_DIR/z-image-<variant> onto the chosen device and warm it up. Never touches the network."""
    import diffusers

    variant = VARIANTS[settings.variant]
    model_dir = settings.model_dir
    verify_model_dir(model_dir)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, variant)
    pipeline_class = getattr(diffusers, variant.pipeline_class)
    weights = sum(path.stat().st_size for path in model_dir.rglob("*.safetensors"))
    with logged_step(log, f"{variant.pipeline_class} from {model_dir} in {dtype}", size_bytes=weights):
        pipeline = pipeline_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return start_runner(pipeline, settings, device, dtype, faults)


def start_runner(
    pipeline, settings: Settings, device: torch.device, dtype: torch.dtype, faults: FaultInjector | None = None
) -> ModelRunner:
    """Place a loaded pipeline (offload, attention, compile as settings say) and warm it up."""
    pipeline.set_progress_bar_config(disable=True)
    install_lora_slot(pipeline, settings)
    acceleration = prepare_pipeline(
        pipeline,
        device,
        dtype,
        offload=settings.offload,
        attention=settings.attention,
        compile=settings.compile,
        max_batch_size=settings.max_batch_size,
    )
    runner = ModelRunner(pipeline, settings, device, dtype, acceleration, faults)
    log.info("warm-up took %.2f s", runner.warm_up())
    return runner


def install_lora_slot(pipeline, settings: Settings) -> None:
    """The resident LoRA adapter, when the LoRA folder exists (LoRA on) and Z_IMAGE_LORA_MAX_RANK > 0.

    Before placement and compilation: the slot's tensors move with the model, and the compiled
    blocks see one adapter whose shapes never change. The slot costs every call a little (its
    matrices run even when they hold zeros: docs/benchmarks.md), so a server without a LoRA folder
    goes without it."""
    folder = settings.loras_dir
    if installed_slot(pipeline) is not None:
        return
    if settings.lora_max_rank == 0 or not folder.is_dir():
        reason = "Z_IMAGE_LORA_MAX_RANK=0" if settings.lora_max_rank == 0 else f"there is no folder {folder}"
        log.info("LoRA off: %s", reason)
        return
    library = LoraLibrary(folder, describe=read_info)
    slot = LoraSlot(pipeline, library, max_rank=settings.lora_max_rank, cache_files=settings.lora_cache)
    log.info("LoRA on: files from %s, a slot of rank %d over %d linear layers", folder, slot.max_rank, len(slot.targets))


def preflight(settings: Settings) -> None:
    """Checks that need torch but no weights: the device exists and the attention backend runs on it.

    Raises SettingsError, so `zimage-server serve` fails with one line before loading anything.
    """
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise SettingsError(f"invalid Z_IMAGE_DEVICE={settings.device!r}: {exc}") from None
    resolve_attention(settings.attention, device, resolve_dtype(settings.dtype, device, VARIANTS[settings.variant]))

