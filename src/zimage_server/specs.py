"""What the API asks the model to do, as plain data, and the errors that come back. No torch.

A `GenerationSpec` is one request: its prompts, one seed per image, optional edit inputs, and a
frozen `CallParams`: everything that must be equal for requests to share one pipeline call. The
batcher groups on `spec.params`, and the runner reads every call-level argument from it, so the
two can never disagree about what a shared call means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

# How a call runs: text-to-image, one of the variant's edit pipelines, or under a ControlNet
# (text-to-image, or inpainting with the 2.x Union checkpoints).
CallMode = Literal["generate", "img2img", "inpaint", "omni", "control", "control_inpaint"]


@dataclass(frozen=True)
class HiresParams:
    """The second pass of a hires fix: upscale the first pass's result, then re-noise and denoise it
    at the bigger size (img2img). Part of `CallParams`, so only equal hires settings share a call.

    `width` x `height` is the size the second pass runs at (multiples of 16). The client gets
    A1111's exact size: the result is resized (Lanczos) to `cover_width` x `cover_height` when
    that differs, then cut to `output_width` x `output_height` from (`crop_left`, `crop_top`), as
    A1111 crops the latents when both hr_resize sides are given (hires.a1111_target)."""

    width: int
    height: int
    upscaler: str  # a latent mode (hires.LATENT_MODES), Lanczos, Nearest, None, or an upscaler model's name
    steps: int  # denoising steps the second pass runs
    strength: float  # 0 < strength <= 1: how much of the upscaled image is re-noised
    guidance_scale: float
    output_width: int
    output_height: int
    cover_width: int
    cover_height: int
    crop_left: int = 0
    crop_top: int = 0

    @property
    def schedule_length(self) -> int:
        """The `num_inference_steps` img2img is given so that it runs exactly `steps`, as A1111 does.

        diffusers' img2img runs `img2img_steps(N, strength)` of N; A1111's own schedule length,
        int(steps / min(strength, 0.999)), lands on `steps` nearly always, and is nudged by one
        where float rounding makes it miss (51 steps at 0.68: 75 would run 52)."""
        n = max(int(self.steps / min(self.strength, 0.999)), self.steps)
        while n > self.steps and img2img_steps(n, self.strength) > self.steps:
            n -= 1
        while img2img_steps(n, self.strength) < self.steps:
            n += 1
        return n


def img2img_steps(schedule_length: int, strength: float) -> int:
    """Steps diffusers' Z-Image img2img runs for num_inference_steps=N (its get_timesteps)."""
    n = schedule_length
    return n - int(max(n - min(n * strength, n), 0))


@dataclass(frozen=True)
class CallParams:
    """The arguments every image of one pipeline call shares; equal params, shareable call."""

    mode: CallMode
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    cfg_normalization: bool = False
    cfg_truncation: float = 1.0
    max_sequence_length: int = 512
    strength: float | None = None  # img2img and inpaint: how much of the input is re-noised
    # Omni passes one set of reference images to the whole call, so only edits of identical
    # references can share it: their digest is part of the key.
    references_digest: str | None = None
    # The LoRAs applied to the whole call: canonical (name, scale) pairs (lora_library.merge_requests).
    loras: tuple[tuple[str, float], ...] = ()
    control_scale: float | None = None  # control modes: how strongly the control image steers
    hires: HiresParams | None = None  # a second, bigger pass after this one (hires fix)
    # Seed variation: noise from each image's seed added to its prompt embedding, this many of the
    # embedding's standard deviations (0: none, bit-identical to no variation).
    variation_strength: float = 0.0

    @property
    def output_size(self) -> tuple[int, int]:
        """(width, height) of the images the call returns."""
        if self.hires is not None:
            return self.hires.output_width, self.hires.output_height
        return self.width, self.height


class StepObserver(Protocol):
    """Watches one request inside a running pipeline call. Called from the worker thread."""

    @property
    def cancelled(self) -> bool:
        """True once nobody wants this request's images any more (its client left)."""
        ...

    def wants_previews(self, step: int, total: int) -> bool:
        """Whether `on_step` for this step should carry cheap previews of the images."""
        ...

    def on_step(self, step: int, total: int, latents: Any, previews: list[Any] | None) -> None:
        """After denoising step `step` (1-based) of `total`. `latents` holds this request's rows of
        the call's latents (a tensor, opaque here; its length is the images this pass makes), and
        `previews` one cheap image per row when `wants_previews` said so."""
        ...


@dataclass(frozen=True)
class GenerationSpec:
    """One request: n images (one per seed) made with `params`.

    Edit inputs: for img2img and inpaint `images` holds one RGB image already at width x height and
    `mask` (mode "L", 255 = repaint) matches it; for omni `images` are the references at their own
    sizes. `control_image` (control modes) is the control map at width x height. Images are PIL
    images; this module only carries them.
    """

    prompt: str
    negative_prompt: str | None
    seeds: tuple[int, ...]
    params: CallParams
    images: tuple[Any, ...] = field(default=(), repr=False)
    mask: Any = field(default=None, repr=False)
    control_image: Any = field(default=None, repr=False)
    observer: StepObserver | None = field(default=None, compare=False, repr=False)
    # The uploaded files an edit started from, as sent: C2PA names them as ingredients by hash.
    uploads: tuple[bytes, ...] = field(default=(), compare=False, repr=False)
    # The hires fix's second pass prompts (A1111's hr_prompt/hr_negative_prompt); None: the main ones.
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    # How the request asked for its hires target, as A1111's infotext keys (("Hires upscale", "2"), ...).
    hires_described_as: tuple[tuple[str, str | int | float], ...] = field(default=(), compare=False)
    # The prompt enhancer's expansion of `prompt` for each image (seed order); None where it did
    # not run or fell back. Empty: enhancement was not asked for.
    revised_prompts: tuple[str | None, ...] = ()

    def prompt_of(self, seed: int) -> str:
        """The prompt image `seed` is made from: its expansion, or the request's prompt."""
        revised = self.revised_prompt_of(seed)
        return self.prompt if revised is None else revised

    def revised_prompt_of(self, seed: int) -> str | None:
        return self.revised_prompts[self.seeds.index(seed)] if self.revised_prompts else None

    @property
    def n(self) -> int:
        return len(self.seeds)


@dataclass(frozen=True)
class ImageRow:
    """One image of a pipeline call: which request it belongs to and what it needs."""

    spec: GenerationSpec
    seed: int

    @property
    def prompt(self) -> str:
        return self.spec.prompt_of(self.seed)

    @property
    def negative_prompt(self) -> str:
        return self.spec.negative_prompt or ""

    @property
    def hires_prompt(self) -> str:
        return self.spec.hires_prompt or self.prompt

    @property
    def hires_negative_prompt(self) -> str:
        return self.spec.hires_negative_prompt or self.negative_prompt


class GenerationCancelled(Exception):
    """Every request in a running call was cancelled, so the call stopped early."""


class OutOfMemoryForRequest(Exception):
    """One request did not fit in memory even alone; retrying it unchanged would fail again."""

    def __init__(self, n: int, width: int, height: int):
        self.n, self.width, self.height = n, width, height
        images = "1 image" if n == 1 else f"{n} images"
        super().__init__(
            f"Not enough memory to generate {images} of {width}x{height} even with nothing else running; "
            "ask for a smaller size or fewer images (n)."
        )


class ModelUnavailable(Exception):
    """The sleeping model could not be loaded again (Z_IMAGE_IDLE_UNLOAD_S); the next request retries."""


class ResultCountMismatch(RuntimeError):
    """A model call handed back a different number of results than it was given work."""
