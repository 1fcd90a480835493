"""Load the pipeline, warm it up, run batches. With acceleration.py, the only modules that import torch and diffusers.

All pipeline calls go through `ZImageEngine.lock`: a diffusers pipeline keeps per-call state on
the object (and pipelines made with `from_pipe` share modules and the scheduler), so two calls
must never overlap.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from PIL import Image

from .acceleration import Acceleration, AttentionPlan, captions_need_mask, prepare_pipeline, resolve_attention
from .faults import FaultInjector
from .model_layout import verify_model_dir
from .prompt_cache import PromptEmbeddingCache
from .settings import Settings, SettingsError

log = logging.getLogger("zimage_server.pipelines")

# Per-variant defaults, as the model cards recommend.
DEFAULT_STEPS = {"turbo": 8, "base": 50, "edit": 28}
DEFAULT_GUIDANCE = {"turbo": 0.0, "base": 4.0, "edit": 4.0}
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


def resolve_dtype(name: str, device: torch.device, variant: str) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # diffusers' ZImageOmniPipeline casts input images with .bfloat16(), so Omni only runs in bf16.
    if device.type == "cuda" or variant == "edit":
        return torch.bfloat16
    return torch.float32


class StepObserver(Protocol):
    """Watches one request inside a running pipeline call. Called from the worker thread."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants this request's images any more (its client left)."""
        ...

    def on_step(self, step: int, total: int, latents: torch.Tensor) -> None:
        """After denoising step `step` (1-based) of `total`; `latents` holds this request's images only."""
        ...


def latent_previews(latents: torch.Tensor) -> list[Image.Image]:
    """One cheap RGB preview per image of a (batch, 16, h, w) latents tensor, at latent size (1/8 of the output)."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32, device=latents.device)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float(), factors) + bias  # roughly -1..1
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


class GenerationCancelled(Exception):
    """Every request in a running call was cancelled, so the call stopped early."""


# What running out of memory looks like: CUDA's allocator error, or the host's.
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)


class OutOfMemoryForRequest(Exception):
    """One request did not fit in memory even alone; retrying it unchanged would fail again."""

    def __init__(self, n: int, width: int, height: int):
        self.n, self.width, self.height = n, width, height
        images = "1 image" if n == 1 else f"{n} images"
        super().__init__(
            f"Not enough memory to generate {images} of {width}x{height} even with nothing else running; "
            "ask for a smaller size or fewer images (n)."
        )


SpecT = TypeVar("SpecT")


@dataclass(frozen=True)
class GenerationSpec:
    """One request's share of a pipeline call. Every spec in one call shares width..max_sequence_length."""

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    cfg_normalization: bool
    cfg_truncation: float
    max_sequence_length: int
    observer: StepObserver | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, kw_only=True)
class EditSpec(GenerationSpec):
    """A generation that starts from uploaded images: image-to-image, inpainting, or Omni references.

    For image-to-image and inpainting `images` holds one RGB image already at width x height and `mask`
    (mode "L", 255 = repaint) matches it; for Omni `images` are the references, each at its own size.
    Specs that share a call must share `strength`, and for Omni also `images`.
    """

    images: tuple[Image.Image, ...] = field(compare=False, repr=False)
    mask: Image.Image | None = field(default=None, compare=False, repr=False)
    strength: float | None = None  # image-to-image and inpainting only; Omni has no such knob

    @classmethod
    def from_generation(cls, spec: GenerationSpec, **inputs) -> EditSpec:
        """`spec` with edit inputs (images, mask, strength) added."""
        return cls(**{name: getattr(spec, name) for name in GenerationSpec.__dataclass_fields__}, **inputs)


class ZImageEngine:
    """A loaded pipeline on its device, and the lock every call takes."""

    def __init__(
        self,
        pipeline,
        settings: Settings,
        device: torch.device,
        dtype: torch.dtype,
        acceleration: Acceleration | None = None,
    ):
        from diffusers import ZImagePipeline

        self.pipeline = pipeline
        self.settings = settings
        self.variant = settings.variant
        self.device = device
        self.dtype = dtype
        self.lock = threading.Lock()
        self.pipeline_calls = 0  # pipeline invocations, for metrics and for tests that prove batching
        oom_error = torch.cuda.OutOfMemoryError if device.type == "cuda" else MemoryError
        self.faults = FaultInjector.from_env(oom_error)  # None unless a test turned it on
        axes_lens = pipeline.transformer.config.axes_lens
        # Image token rows/columns index the rope tables along axes 1 and 2; beyond them the
        # embedder fails with an IndexError, so sizes past this are refused up front.
        self.max_height = int(axes_lens[1]) * PIXELS_PER_TOKEN
        self.max_width = int(axes_lens[2]) * PIXELS_PER_TOKEN
        # Omni takes images itself; turbo and base edit through pipelines that share their modules.
        edit_pipelines = (None, None) if self.variant == "edit" else self._edit_pipelines()
        self.img2img_pipeline, self.inpaint_pipeline = edit_pipelines
        self.acceleration = acceleration or Acceleration(
            offload="none", offload_reason="placed by the caller", attention=AttentionPlan("native", True), compile="off"
        )
        # The text-to-image pipeline takes per-prompt embeddings, so prompts go through the cache;
        # the Omni (edit) pipeline's embeddings depend on its condition images, so it encodes itself.
        self.caches_prompts = isinstance(pipeline, ZImagePipeline)
        self.prompt_cache: PromptEmbeddingCache[torch.Tensor] = PromptEmbeddingCache(settings.prompt_cache)
        # Where embeddings and latents must live; with model offload this is the GPU while weights rest on the CPU.
        self.execution_device = pipeline._execution_device

    @property
    def default_steps(self) -> int:
        return DEFAULT_STEPS[self.variant]

    @property
    def default_guidance(self) -> float:
        return DEFAULT_GUIDANCE[self.variant]

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

    def _pipeline_for(self, spec: GenerationSpec):
        if not isinstance(spec, EditSpec) or self.variant == "edit":
            return self.pipeline
        return self.inpaint_pipeline if spec.mask is not None else self.img2img_pipeline

    def _image_inputs(self, first: GenerationSpec, chunk: list[tuple[int, GenerationSpec, int]]) -> dict:
        """An edit call's image arguments: an input (and mask) per generated image, or Omni's shared references."""
        if not isinstance(first, EditSpec):
            return {}
        if self.variant == "edit":
            return {"image": list(first.images)}
        inputs = {"image": [spec.images[0] for _, spec, _ in chunk], "strength": first.strength}
        if first.mask is not None:
            inputs["mask_image"] = [spec.mask for _, spec, _ in chunk]
        return inputs

    def generate(self, specs: list[GenerationSpec]) -> list[list[Image.Image]]:
        """Run compatible specs as few pipeline calls as max_batch_size allows; images per spec, in order.

        EditSpecs run image-to-image, inpainting or Omni instead, under the same lock and seeding."""
        first = specs[0]
        # Flatten to one entry per image; each image gets its own generator, seeded as diffusers
        # users would seed it, so an image never depends on what it was batched with.
        flat = [(index, spec, seed) for index, spec in enumerate(specs) for seed in spec.seeds]
        results: list[list[Image.Image]] = [[] for _ in specs]
        step = self.settings.max_batch_size
        with self.lock:
            for start in range(0, len(flat), step):
                chunk = flat[start : start + step]
                self.pipeline_calls += 1
                prompts, needs_mask = self._prompt_inputs(
                    [spec.prompt for _, spec, _ in chunk],
                    [spec.negative_prompt or "" for _, spec, _ in chunk],
                    first.guidance_scale,
                    first.max_sequence_length,
                )
                with self.acceleration.attention.applied(needs_mask):
                    output = self._pipeline_for(first)(
                        **prompts,
                        generator=[torch.Generator("cpu").manual_seed(seed) for _, _, seed in chunk],
                        width=first.width,
                        height=first.height,
                        num_inference_steps=first.num_inference_steps,
                        guidance_scale=first.guidance_scale,
                        cfg_normalization=first.cfg_normalization,
                        cfg_truncation=first.cfg_truncation,
                        max_sequence_length=first.max_sequence_length,
                        output_type="pil",
                        callback_on_step_end=self._step_callback(chunk, self.faults),
                        **self._image_inputs(first, chunk),
                    )
                for (index, _, _), image in zip(chunk, output.images, strict=True):
                    results[index].append(image)
        return results

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
        self, prompts: list[str], negatives: list[str], guidance_scale: float, max_sequence_length: int
    ) -> tuple[dict, bool]:
        """Pipeline keyword arguments for these prompts, and whether the call will need an attention mask."""
        if not self.caches_prompts:
            return {"prompt": prompts, "negative_prompt": negatives}, True
        # Negative prompts only matter with classifier-free guidance (guidance_scale > 0).
        cfg = guidance_scale > 0
        embeddings = self.encode_prompts(prompts + negatives if cfg else prompts, max_sequence_length)
        positive, negative = embeddings[: len(prompts)], embeddings[len(prompts) :]
        from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF

        needs_mask = captions_need_mask([len(e) for e in embeddings], SEQ_MULTI_OF)
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative if cfg else None}, needs_mask

    @staticmethod
    def _step_callback(chunk: list[tuple[int, GenerationSpec, int]], faults: FaultInjector | None = None):
        """A diffusers step callback that reports progress per request and stops a call nobody awaits."""
        # Rows of the latents batch that belong to each observed spec in this chunk.
        rows: dict[int, tuple[GenerationSpec, list[int]]] = {}
        for row, (index, spec, _) in enumerate(chunk):
            if spec.observer is not None:
                rows.setdefault(index, (spec, []))[1].append(row)
        if not rows and faults is None:
            return None
        requests = len({index for index, _, _ in chunk})
        everyone_observed = len(rows) == requests

        def on_step_end(pipeline, step: int, _timestep, tensors: dict) -> dict:
            if faults is not None:
                faults.after_step([spec.prompt for _, spec, _ in chunk], requests)
            latents = tensors["latents"]
            for spec, spec_rows in rows.values():
                if not spec.observer.cancelled:
                    spec.observer.on_step(step + 1, pipeline.num_timesteps, latents[spec_rows])
            if everyone_observed and all(spec.observer.cancelled for spec, _ in rows.values()):
                raise GenerationCancelled(f"stopped after step {step + 1}: every client left")
            return {}

        return on_step_end

    def recovering(self, run: Callable[[list[SpecT]], list[Any]]) -> Callable[[list[SpecT]], list[Any]]:
        """`run` (specs -> results per spec), made to survive running out of memory.

        When a call of several requests runs out of memory, free what the allocator caches and run
        the requests one by one, so the ones that fit still get their images. A request that runs
        out of memory alone gets an OutOfMemoryForRequest as its result (the batcher fails only its
        job). A lone request is not retried: PyTorch already frees its cache and retries once
        before raising, so the same call would fail the same way.
        """

        def run_recovering(specs: list[SpecT]) -> list[Any]:
            try:
                return run(specs)
            except OUT_OF_MEMORY_ERRORS as exc:
                # Only the message survives the except block: the traceback's frames hold the
                # call's tensors, and they must be unreachable before the cache is freed.
                reason = f"{type(exc).__name__}: {exc}"
            self.free_memory()
            if len(specs) == 1:
                log.warning("out of memory for a lone request (%s)", reason)
                return [self._too_large(specs[0])]
            log.warning("out of memory in a call of %d requests (%s); retrying them one by one", len(specs), reason)
            results: list[Any] = []
            for spec in specs:
                observer = getattr(spec, "observer", None)
                if observer is not None and observer.cancelled:
                    results.append(GenerationCancelled("the client left"))
                    continue
                try:
                    results.extend(run([spec]))
                    continue
                except GenerationCancelled as exc:
                    results.append(exc.with_traceback(None))
                    continue
                except OUT_OF_MEMORY_ERRORS as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                self.free_memory()
                log.warning("out of memory for a request even alone (%s)", reason)
                results.append(self._too_large(spec))
            return results

        return run_recovering

    @staticmethod
    def _too_large(spec: Any) -> OutOfMemoryForRequest:
        seeds: Sequence[int] = getattr(spec, "seeds", (0,))
        return OutOfMemoryForRequest(len(seeds), spec.width, spec.height)

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

    def _warm_up_spec(self, prompt: str, seed: int, width: int, height: int) -> GenerationSpec:
        return GenerationSpec(
            prompt=prompt,
            negative_prompt=None,
            seeds=(seed,),
            width=width,
            height=height,
            num_inference_steps=1,
            guidance_scale=self.default_guidance,
            cfg_normalization=False,
            cfg_truncation=1.0,
            max_sequence_length=64,
        )

    def warm_up(self, compile_shapes: tuple = COMPILE_WARM_UP) -> float:
        """Generations (at the sizes users send, when compiling) and one tiny edit, so that lazy
        initialisation and compilation are not paid by the first user."""
        started = time.perf_counter()
        shapes = compile_shapes if self.acceleration.compile != "off" else ((64, 64, ("warm-up",)),)
        for width, height, prompts in shapes:
            self.generate([self._warm_up_spec(prompt, index, width, height) for index, prompt in enumerate(prompts)])
        # The first edit would otherwise pay for the VAE encoder's (and Omni's SigLIP's) first run.
        gray = Image.new("RGB", (64, 64), (128, 128, 128))
        spec = self._warm_up_spec("warm-up", 0, 64, 64)
        self.generate([EditSpec.from_generation(spec, images=(gray,), strength=None if self.variant == "edit" else 1.0)])
        return time.perf_counter() - started


def load_engine(settings: Settings) -> ZImageEngine:
    """Load MODELS_DIR/z-image-<variant> onto the chosen device and warm it up. Never touches the network."""
    from diffusers import ZImageOmniPipeline, ZImagePipeline

    model_dir = settings.model_dir
    verify_model_dir(model_dir)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device, settings.variant)
    pipeline_class = ZImageOmniPipeline if settings.variant == "edit" else ZImagePipeline
    started = time.perf_counter()
    pipeline = pipeline_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    log.info(
        "loaded %s from %s in %s (%.1f s)", pipeline_class.__name__, model_dir, dtype, time.perf_counter() - started
    )
    return start_engine(pipeline, settings, device, dtype)


def start_engine(pipeline, settings: Settings, device: torch.device, dtype: torch.dtype) -> ZImageEngine:
    """Place a loaded pipeline (offload, attention, compile as settings say) and warm it up."""
    pipeline.set_progress_bar_config(disable=True)
    acceleration = prepare_pipeline(
        pipeline, device, dtype, offload=settings.offload, attention=settings.attention, compile=settings.compile
    )
    engine = ZImageEngine(pipeline, settings, device, dtype, acceleration)
    log.info("warm-up took %.2f s", engine.warm_up())
    return engine


def preflight(settings: Settings) -> None:
    """Checks that need torch but no weights: the device exists and the attention backend runs on it.

    Raises SettingsError, so `zimage-server serve` fails with one line before loading anything.
    """
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise SettingsError(f"invalid Z_IMAGE_DEVICE={settings.device!r}: {exc}") from None
    resolve_attention(settings.attention, device, resolve_dtype(settings.dtype, device, settings.variant))
