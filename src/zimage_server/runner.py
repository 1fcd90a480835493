"""The model runner: load the pipelines, hold the lock, encode prompts, run one call. Imports torch.

With acceleration.py (placement) and checkpoints.py (single-file transformers, quantization) this
is the only module that imports torch and diffusers. It knows nothing of requests, batching or retries (policy.py): `run_call(params, rows)` makes one
pipeline call for the given image rows, all sharing `params`, and returns one image per row.

Everything here that does torch work runs on the model's one thread (model_thread.py), whoever
calls it: loading, warm-up, calls, prompt encoding, previews and the conversion of outputs.

All pipeline calls go through `ModelRunner.lock`: a diffusers pipeline keeps per-call state on the
object (and the edit and control pipelines share its modules and scheduler), so two calls must
never overlap (the one thread already serialises them; the lock also keeps out a caller that
holds the runner directly, as tests do). The lock covers the device work only: the decoded pixels
leave it as a tensor, converted to images on the same thread right after; encoding those to PNG,
JPEG or WebP happens elsewhere, in the encoding pool, while the next call runs.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path
from collections.abc import Sequence

import torch
from PIL import Image

from .acceleration import (
    Acceleration,
    AttentionPlan,
    captions_need_mask,
    pin_placement,
    prepare_pipeline,
    resolve_attention,
)
from .checkpoints import (
    TransformerFile,
    check_quantization,
    inspect_transformer_file,
    load_transformer,
    quantize_components,
)
from .faults import FaultInjector
from .logs import logged_step
from .lora_library import LoraLibrary
from .loras import LoraSlot, installed_slot, read_info
from .model_layout import verify_model_dir
from .model_thread import on_model_thread
from .prompt_cache import PromptEmbeddingCache
from .settings import Settings, SettingsError
from .hires import LATENT_MODES, fit_to_output
from .upscalers import Upscalers, free_device_memory
from .specs import CallParams, GenerationCancelled, GenerationSpec, ImageRow
from .variants import VARIANTS, Variant

log = logging.getLogger("zimage_server.runner")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The diffusers pipeline of each call mode that is not the variant's own pipeline.
MODE_PIPELINES = {
    "img2img": "ZImageImg2ImgPipeline",
    "inpaint": "ZImageInpaintPipeline",
    "control": "ZImageControlNetPipeline",
    "control_inpaint": "ZImageControlNetInpaintPipeline",
}
PIXELS_PER_TOKEN_SIDE = 16  # VAE downsamples 8x and the transformer patches 2x2 latents.
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


def vary(embedding: torch.Tensor, seed: int, strength: float) -> torch.Tensor:
    """Seed variation: noise drawn from the image's own seed (a generator of its own, so the
    latents' noise is untouched), scaled by the embedding's standard deviation, added to one
    prompt embedding. A new tensor: the prompt cache's copy stays as it was."""
    noise = torch.randn(embedding.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    scale = strength * embedding.float().std()
    return (embedding.float() + noise.to(embedding.device) * scale).to(embedding.dtype)


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
        controlnet=None,
    ):
        self.settings = settings
        self.variant = VARIANTS[settings.variant]
        self.device = device
        self.dtype = dtype
        self.lock = threading.Lock()
        self.calls = 0  # pipeline calls made: how tests see that requests shared a call
        self.faults = faults  # test-only: fails or stalls calls whose prompts carry markers
        # Upscaler models (hires fix, A1111's extras): loaded on first use, on this device, under this lock.
        self.upscalers = Upscalers.from_settings(settings, device, lock=self.lock)
        # Text-to-image style pipelines take per-prompt embeddings, so prompts go through the cache;
        # Omni's embeddings depend on its condition images, so it encodes prompts itself.
        self.caches_prompts = self.variant.edit_method != "omni"
        # What running out of memory looks like here: CUDA's allocator error, or the host's.
        self.out_of_memory_errors: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)
        # Sleep when idle (Z_IMAGE_IDLE_UNLOAD_S): whether the weights are loaded, and what waking cost.
        self.resident = False
        self.wakes = 0
        self.last_wake_s: float | None = None
        self._attach(pipeline, acceleration, controlnet)

    def _attach(self, pipeline, acceleration: Acceleration | None, controlnet) -> None:
        """Hold a loaded, placed pipeline: everything that lives and dies with the weights."""
        self.pipeline = pipeline
        # The resident adapter each call's LoRAs are swapped into; it lives on the transformer, so
        # every runner over this pipeline (and the edit pipelines) shares it. None: LoRA is off.
        self.lora_slot: LoraSlot | None = installed_slot(pipeline)
        # The LoRA folder requests may name; None when LoRA is off. Kept while the model sleeps.
        self.lora_library: LoraLibrary | None = self.lora_slot.library if self.lora_slot is not None else None
        axes_lens = pipeline.transformer.config.axes_lens
        # Image token rows/columns index the rope tables along axes 1 and 2; beyond them the
        # embedder fails with an IndexError, so sizes past this are refused up front.
        self.max_height = int(axes_lens[1]) * PIXELS_PER_TOKEN_SIDE
        self.max_width = int(axes_lens[2]) * PIXELS_PER_TOKEN_SIDE
        self.acceleration = acceleration or Acceleration(
            offload="none",
            offload_reason="placed by the caller",
            attention=AttentionPlan("native", True),
            compile="off",
        )
        # Where embeddings and latents must live; with model offload this is the GPU while weights rest on the CPU.
        self.execution_device = pin_placement(pipeline)
        self.mode_pipelines = {"generate": pipeline, "omni": pipeline}
        if self.variant.edit_method == "img2img":
            self.mode_pipelines.update(self._pipelines_over_the_model(img2img=None, inpaint=None))
        self.prompt_cache: PromptEmbeddingCache[torch.Tensor] = PromptEmbeddingCache(self.settings.prompt_cache)
        # The ControlNet's own blocks, with the transformer's embedders and refiners (from_transformer):
        # no second copy of those. The 1.0 Union layout takes control latents only; 2.x adds the
        # inpainting mask and masked image, so it also drives inpainting.
        self.controlnet = controlnet
        self.has_controlnet = controlnet is not None  # kept while the model sleeps, like controlnet_inpaints
        self.controlnet_inpaints = False
        if controlnet is not None:
            controlnet.to(self.execution_device)
            self.controlnet_inpaints = controlnet.config.control_in_dim != pipeline.transformer.in_channels
            modes = {"control": controlnet} | ({"control_inpaint": controlnet} if self.controlnet_inpaints else {})
            self.mode_pipelines.update(self._pipelines_over_the_model(**modes))
        self.resident = True

    @on_model_thread
    def sleep(self) -> None:
        """Free the model's memory, device and host alike: drop every tensor the weights live in.

        The next call reloads it the way start-up did (`wake`). Dropping beats parking the weights
        in host memory: it also frees the host (a CPU-only server's whole footprint), and the
        reload rebuilds placement, offload hooks, quantization, compiled blocks and the LoRA slot
        through the start-up code itself, so nothing can come back half-moved (docs/operations.md)."""
        with self.lock:
            if not self.resident:
                return
            self.resident = False
            self.pipeline = self.controlnet = self.lora_slot = None
            self.mode_pipelines = {}
            self.upscalers.unload()
            self.prompt_cache = PromptEmbeddingCache(self.settings.prompt_cache)
        self.free_memory()
        release_freed_host_memory()
        log.info("model asleep: its memory is freed until the next request")

    @on_model_thread
    def wake(self) -> float:
        """Load the model again after `sleep`, exactly as at start-up (warm-up included); seconds taken."""
        started = time.perf_counter()
        # The offload mode start-up chose, not a new pick from what the GPU has free now (a card
        # shared with another server): the model comes back as it was, or fails to.
        settings = self.settings.replace(offload=self.acceleration.offload)
        pipeline, controlnet = load_components(settings)
        acceleration = place_components(pipeline, settings, self.device, self.dtype, controlnet, self.lora_library)
        self._attach(pipeline, acceleration, controlnet)
        self.warm_up()
        self.wakes += 1
        self.last_wake_s = time.perf_counter() - started
        log.info("model awake: reloaded in %.2f s", self.last_wake_s)
        return self.last_wake_s

    def _pipelines_over_the_model(self, **modes) -> dict:
        """Pipelines for these modes over the loaded modules: no second copy of the weights.

        Each mode maps to the ControlNet its pipeline adds (None for the edit pipelines). Built from
        the loaded components, the heart of `from_pipe` without its last step: that casts every
        module to a dtype (float32 unless told), which a quantized transformer (GGUF, torchao)
        refuses. The modules and the scheduler are shared, as with `from_pipe`."""
        import diffusers

        pipelines = {}
        for mode, controlnet in modes.items():
            extra = {"controlnet": controlnet} if controlnet is not None else {}
            pipelines[mode] = getattr(diffusers, MODE_PIPELINES[mode])(**self.pipeline.components, **extra)
            pipelines[mode].set_progress_bar_config(disable=True)
            pin_placement(pipelines[mode])
        return pipelines

    @on_model_thread
    def run_call(self, params: CallParams, rows: Sequence[ImageRow]) -> list[Image.Image]:
        """One pipeline call making one image per row, every row with `params`; images in row order.

        Each image gets its own CPU generator seeded with its row's seed, as diffusers users seed
        it, so an image never depends on what it was batched with. A sleeping model wakes first.
        With `params.hires` the call is two passes under one hold of the lock (`_hires_pass`).

        The passes run in inference mode where they can (`_call_mode`)."""
        if not self.resident:
            self.wake()
        hires = params.hires
        with self.lock:
            self.calls += 1
            if self.lora_slot is not None:
                self.lora_slot.activate(params.loras)
            with self._call_mode():
                pixels = self._run_passes(params, rows)
        with torch.inference_mode():
            images = to_images(pixels)
        if hires is not None:
            images = [fit_to_output(image, hires) for image in images]
        if self.faults is not None:
            images = self.faults.after_call([row.prompt for row in rows], images)
        return images

    def _call_mode(self):
        """Inference mode rather than diffusers' own no_grad: the same kernels, the same bits,
        without autograd's version counters and view records on every tensor (benchmark 8 in
        docs/benchmarks.md times the runner against a plain call). Not with model offload: its
        hooks move the weights inside the call, which would leave them inference tensors that
        the next LoRA swap, outside it, may not write (and the swap stays outside because
        torchao's quantized weights refuse it inside)."""
        return torch.no_grad() if self.acceleration.offload == "model" else torch.inference_mode()

    def _run_passes(self, params: CallParams, rows: Sequence[ImageRow]) -> torch.Tensor:
        """The call's pipeline pass (and the hires fix's second), under the lock; the pixels in 0..1."""
        hires = params.hires
        prompts, needs_mask = self._prompt_inputs(
            params, rows, [row.prompt for row in rows], [row.negative_prompt for row in rows]
        )
        # A latent hires fix takes the first pass's latents as they are: no VAE round trip.
        output_type = "latent" if hires is not None and hires.upscaler in LATENT_MODES else "pt"
        first = self.mode_pipelines[params.mode]
        pixels = self._denoise(
            first, params, rows, prompts, needs_mask,
            **self._image_inputs(params, rows),
            width=params.width,
            height=params.height,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            output_type=output_type,
            callback_on_step_end=self._step_callback(rows, steps_after=hires.steps if hires else 0),
        )  # fmt: skip
        if hires is not None:
            pixels = self._hires_pass(params, rows, pixels, steps_before=first.num_timesteps)
        return pixels

    def _denoise(self, pipeline, params: CallParams, rows: Sequence[ImageRow], prompts: dict, needs_mask: bool, **call):
        """One pipeline pass over the rows: their prompts, a fresh CPU generator per row seeded
        with its seed, the call's CFG settings, under the attention plan; its `.images`."""
        with self.acceleration.attention.applied(needs_mask):
            return pipeline(
                **prompts,
                generator=[torch.Generator("cpu").manual_seed(row.seed) for row in rows],
                cfg_normalization=params.cfg_normalization,
                cfg_truncation=params.cfg_truncation,
                max_sequence_length=params.max_sequence_length,
                **call,
            ).images

    def _hires_pass(self, params: CallParams, rows: Sequence[ImageRow], first, steps_before: int) -> torch.Tensor:
        """The hires fix's second pass, under the lock `run_call` holds: the first pass's output
        (latents, or pixels in 0..1) upscaled to the second pass's size, then img2img over it with
        fresh generators seeded as the first pass's were (A1111 seeds its second pass alike)."""
        hires = params.hires
        if hires.upscaler in LATENT_MODES:
            mode, antialias = LATENT_MODES[hires.upscaler]
            size = (hires.height // self.pipeline.vae_scale_factor, hires.width // self.pipeline.vae_scale_factor)
            start = torch.nn.functional.interpolate(first, size=size, mode=mode, antialias=antialias)
        else:
            # Under the lock this call holds already (threading.Lock is not reentrant).
            upscale = self.upscalers.upscale_to
            start = [upscale(image, hires.upscaler, hires.width, hires.height, lock_held=True) for image in to_images(first)]
        prompts, needs_mask = self._prompt_inputs(
            params, rows, [row.hires_prompt for row in rows], [row.hires_negative_prompt for row in rows],
            guidance_scale=hires.guidance_scale,
        )  # fmt: skip
        return self._denoise(
            self.hires_pipeline, params, rows, prompts, needs_mask,
            image=start,
            strength=hires.strength,
            width=hires.width,
            height=hires.height,
            num_inference_steps=hires.schedule_length,
            guidance_scale=hires.guidance_scale,
            output_type="pt",
            callback_on_step_end=self._step_callback(rows, steps_before=steps_before),
        )  # fmt: skip

    @property
    def hires_pipeline(self):
        """img2img over the loaded modules, its image processor told that 16-channel tensors are
        latents: otherwise it resizes them as if they were pixels (diffusers' VaeImageProcessor
        assumes 4 latent channels), while PIL inputs go through it as before."""
        pipeline = self.mode_pipelines.get("hires")
        if pipeline is None:
            pipeline = self._pipelines_over_the_model(img2img=None)["img2img"]
            pipeline.image_processor.register_to_config(vae_latent_channels=self.pipeline.vae.config.latent_channels)
            self.mode_pipelines["hires"] = pipeline
        return pipeline

    @staticmethod
    def _image_inputs(params: CallParams, rows: Sequence[ImageRow]) -> dict:
        """A call's image arguments: an input (and mask) per image, Omni's shared references, or a
        control image per image (the control pipelines take one per image they make)."""
        if params.mode == "omni":
            return {"image": list(rows[0].spec.images)}
        if params.mode == "generate":
            return {}
        if params.mode.startswith("control"):
            inputs = {
                "control_image": [row.spec.control_image for row in rows],
                "controlnet_conditioning_scale": params.control_scale,
            }
        else:
            inputs = {"strength": params.strength}
        if params.mode in ("img2img", "inpaint", "control_inpaint"):
            inputs["image"] = [row.spec.images[0] for row in rows]
        if params.mode in ("inpaint", "control_inpaint"):
            inputs["mask_image"] = [row.spec.mask for row in rows]
        return inputs

    @on_model_thread
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

    def _prompt_inputs(
        self,
        params: CallParams,
        rows: Sequence[ImageRow],
        prompts: list[str],
        negatives: list[str],
        guidance_scale: float | None = None,
    ) -> tuple[dict, bool]:
        """Pipeline keyword arguments for these prompts (one per row), and whether the call will
        need an attention mask. `guidance_scale` defaults to the call's (a hires pass has its own)."""
        if not self.caches_prompts:
            return {"prompt": prompts, "negative_prompt": negatives}, True
        # Negative prompts only matter with classifier-free guidance (guidance_scale > 0).
        cfg = (params.guidance_scale if guidance_scale is None else guidance_scale) > 0
        embeddings = self.encode_prompts(prompts + negatives if cfg else prompts, params.max_sequence_length)
        positive, negative = embeddings[: len(prompts)], embeddings[len(prompts) :]
        if params.variation_strength:
            positive = [vary(e, row.seed, params.variation_strength) for e, row in zip(positive, rows, strict=True)]
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        needs_mask = captions_need_mask([len(e) for e in embeddings], SEQ_MULTI_OF)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative if cfg else None}, needs_mask

    def _step_callback(self, rows: Sequence[ImageRow], steps_before: int = 0, steps_after: int = 0):
        """A diffusers step callback that reports progress per request and stops a call nobody awaits.

        A hires fix's two passes report as one run: the second pass counts on from `steps_before`
        (the first's), the first counts `steps_after` (the second's) into its total."""
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
            total = steps_before + pipeline.num_timesteps + steps_after
            done = steps_before + step + 1
            for spec, spec_rows in observed.values():
                observer = spec.observer
                if observer.cancelled:
                    continue
                latents = tensors["latents"][spec_rows]
                previews = latent_previews(latents) if observer.wants_previews(done, total) else None
                observer.on_step(done, total, latents, previews)
            if everyone_observed and all(spec.observer.cancelled for spec, _ in observed.values()):
                raise GenerationCancelled(f"stopped after step {done}: every client left")
            return {}

        return on_step_end

    @on_model_thread
    def free_memory(self) -> None:
        """Drop garbage and, on CUDA, the allocator's cached blocks, after running out of memory."""
        free_device_memory(self.device)

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

    @on_model_thread
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
        if self.controlnet is not None:  # and the ControlNet's blocks theirs
            params = dataclasses.replace(self.warm_up_params("control", 64, 64), control_scale=0.75)
            self.run_call(params, [ImageRow(GenerationSpec("warm-up", None, (0,), params, control_image=gray), 0)])
        return time.perf_counter() - started


@on_model_thread
def load_runner(settings: Settings, faults: FaultInjector | None = None) -> ModelRunner:
    """Load MODELS_DIR/z-image-<variant> onto the chosen device and warm it up. Never touches the network.

    With Z_IMAGE_TRANSFORMER the transformer comes from that file and the folder gives the rest;
    with Z_IMAGE_QUANTIZE the chosen components are quantized before they are placed."""
    pipeline, controlnet = load_components(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, VARIANTS[settings.variant])
    return start_runner(pipeline, settings, device, dtype, faults, controlnet)


@on_model_thread
def load_components(settings: Settings) -> tuple:
    """The pipeline (quantized as settings say) and the ControlNet, if any, read from disk onto the host."""
    import diffusers

    variant = VARIANTS[settings.variant]
    model_dir = settings.model_dir
    checkpoint = inspect_checkpoint(settings)
    verify_model_dir(model_dir, weights_elsewhere=("transformer",) if checkpoint else ())
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, variant)
    check_quantization(settings.quantization, device, checkpoint)
    pipeline_class = getattr(diffusers, variant.pipeline_class)
    components = {}
    if checkpoint is not None:
        size = checkpoint.path.stat().st_size
        with logged_step(log, f"transformer from {checkpoint.path}, {checkpoint.describe()}", size_bytes=size):
            components["transformer"] = load_transformer(checkpoint, model_dir / "transformer", dtype)
    weight_files = [p for p in model_dir.rglob("*.safetensors") if not (checkpoint and p.parent.name == "transformer")]
    weights = sum(path.stat().st_size for path in weight_files)
    with logged_step(log, f"{variant.pipeline_class} from {model_dir} in {dtype}", size_bytes=weights):
        pipeline = pipeline_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True, **components)
    quantize_components(pipeline, settings.quantization)
    controlnet = (
        load_controlnet(settings.controlnet_path, dtype, settings.offline) if settings.controlnet_path else None
    )
    return pipeline, controlnet


def load_controlnet(path: Path, dtype: torch.dtype, offline: bool):
    """A Z-Image ControlNet from a diffusers folder or a single file (alibaba-pai's Fun ControlNet Union).

    A single file carries weights only: diffusers recognises the Union version from its keys and reads
    the matching config (a few hundred bytes, from the hub's hlky/Z-Image-Turbo-Fun-Controlnet-Union*
    repos) from the Hugging Face cache, fetching it once when it is not there unless offline."""
    from diffusers import ZImageControlNetModel

    size = sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size
    with logged_step(log, f"ControlNet from {path}", size_bytes=size):
        if path.is_dir():
            return ZImageControlNetModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        return ZImageControlNetModel.from_single_file(str(path), torch_dtype=dtype, local_files_only=offline)


def inspect_checkpoint(settings: Settings) -> TransformerFile | None:
    """The Z_IMAGE_TRANSFORMER file, checked against the model folder's transformer config; None when unset."""
    path = settings.transformer_file
    return None if path is None else inspect_transformer_file(path, settings.model_dir / "transformer")


@on_model_thread
def start_runner(
    pipeline,
    settings: Settings,
    device: torch.device,
    dtype: torch.dtype,
    faults: FaultInjector | None = None,
    controlnet=None,
) -> ModelRunner:
    """Place a loaded pipeline (offload, attention, compile as settings say) and warm it up."""
    acceleration = place_components(pipeline, settings, device, dtype, controlnet)
    runner = ModelRunner(pipeline, settings, device, dtype, acceleration, faults, controlnet)
    log.info("warm-up took %.2f s", runner.warm_up())
    return runner


def place_components(
    pipeline, settings: Settings, device: torch.device, dtype: torch.dtype, controlnet, lora_library=None
) -> Acceleration:
    """The LoRA slot (over `lora_library` when waking, so its cache of file details survives), then
    placement on the device (offload, attention, compile), as settings say."""
    pipeline.set_progress_bar_config(disable=True)
    install_lora_slot(pipeline, settings, lora_library)
    acceleration = prepare_pipeline(
        pipeline,
        device,
        dtype,
        offload=settings.offload,
        attention=settings.attention,
        compile=settings.compile,
        max_batch_size=settings.max_batch_size,
        controlnet=controlnet,  # its weights count in the memory plan
        # and so does the resident prompt enhancer's KV cache
        enhance_tokens=settings.enhance_max_tokens if settings.prompt_enhancer == "resident" else 0,
    )
    if controlnet is not None and VARIANTS[settings.variant].edit_method == "omni":
        raise SettingsError("Z_IMAGE_CONTROLNET works with the turbo and base variants, not with Omni (edit)")
    if controlnet is not None and acceleration.offload == "model":
        # Model offload moves the transformer in and out by hooks on its own forward, which the
        # ControlNet (running the transformer's embedders and refiners itself) never calls.
        raise SettingsError(
            "Z_IMAGE_CONTROLNET needs Z_IMAGE_OFFLOAD=none or text_encoder; model offload cannot run it"
        )
    return acceleration


def release_freed_host_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc keeps them otherwise), so RSS falls."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def install_lora_slot(pipeline, settings: Settings, library: LoraLibrary | None = None) -> None:
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
    library = library or LoraLibrary(folder, describe=read_info)
    slot = LoraSlot(pipeline, library, max_rank=settings.lora_max_rank, cache_files=settings.lora_cache)
    log.info(
        "LoRA on: files from %s, a slot of rank %d over %d linear layers", folder, slot.max_rank, len(slot.targets)
    )


@on_model_thread
def preflight(settings: Settings) -> None:
    """Checks that need torch but no weights: the device exists, the attention backend and the
    quantization run on it, and a Z_IMAGE_TRANSFORMER file is a Z-Image transformer of the folder's shape.

    Raises SettingsError or CheckpointError, so `zimage-server serve` fails with one line before loading anything.
    """
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise SettingsError(f"invalid Z_IMAGE_DEVICE={settings.device!r}: {exc}") from None
    resolve_attention(settings.attention, device, resolve_dtype(settings.dtype, device, VARIANTS[settings.variant]))
    # The transformer file is checked when the folder holding its config is there (not yet when
    # serve is about to fetch the folder: then the loader checks it).
    has_config = (settings.model_dir / "transformer" / "config.json").is_file()
    check_quantization(settings.quantization, device, inspect_checkpoint(settings) if has_config else None)
