"""The hires fix as plain data: A1111's contract for the second pass's size, steps and upscaler
names, turned into the `HiresParams` of a call. No torch: the runner does the passes.

A1111 (modules/processing.py, StableDiffusionProcessingTxt2Img) computes the target from the
first pass: `hr_scale` times its size, or `hr_resize_x`/`_y` (one alone keeps the aspect ratio;
both scale to cover, then the latents are cropped to the asked size). Its latent space is 8x
smaller than the image, so its outputs are multiples of 8; Z-Image runs at multiples of 16, so
the second pass runs at the target floored to 16 and its result is resized to A1111's size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .specs import HiresParams

# A1111's latent upscale modes: torch.nn.functional.interpolate(mode, antialias) on the latents.
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
# Plain resizes of the decoded image, with their Pillow filters; A1111's "None" is a Lanczos resize too.
PIXEL_RESIZES = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
A1111_LATENT_FACTOR = 8  # A1111's opt_f: its sizes and crops move in steps of 8 pixels
MODEL_SIZE_STEP = 16  # Z-Image's: the VAE's 8 times the transformer's 2x2 patches
MIN_SIDE = 64
MIN_STRENGTH = 0.01


class HiresError(ValueError):
    """A hires setting this server cannot run; the message is the client's, `param` the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# The upscalers' errors live here, without torch, so the API can answer them (upscalers.py raises them).


class UpscalerError(ValueError):
    """An upscale the server cannot do; the message is one line for the client, `param` its field."""

    param = "upscaler"


class UnknownUpscaler(UpscalerError):
    def __init__(self, name: str, param: str = "upscaler"):
        # A1111's own words, which its clients show as they are.
        super().__init__(f"could not find upscaler named {name}")
        self.name = name
        self.param = param


class UpscalerFileError(UpscalerError):
    """A file in the upscaler folder that cannot be used; the message names it."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"upscaler file {path.name}: {reason}")
        self.path = path


class UpscaleTooLarge(UpscalerError):
    """The asked (or an intermediate) size is over the server's pixel limit."""


@dataclass(frozen=True)
class HiresTarget:
    """A1111's hr_upscale_to (the size upscaled to) and the crop that cuts it to the asked size."""

    upscale_width: int
    upscale_height: int
    truncate_x: int = 0  # in A1111's latent units (8 pixels)
    truncate_y: int = 0

    @property
    def cover_size(self) -> tuple[int, int]:
        """The decoded size before the crop: A1111's latents hold upscale_to // 8 positions a side."""
        step = A1111_LATENT_FACTOR
        return self.upscale_width // step * step, self.upscale_height // step * step

    @property
    def output_size(self) -> tuple[int, int]:
        width, height = self.cover_size
        return width - self.truncate_x * A1111_LATENT_FACTOR, height - self.truncate_y * A1111_LATENT_FACTOR

    @property
    def crop_origin(self) -> tuple[int, int]:
        """A1111 cuts truncate // 2 latent columns (rows) on the left (top), the rest on the right."""
        return self.truncate_x // 2 * A1111_LATENT_FACTOR, self.truncate_y // 2 * A1111_LATENT_FACTOR


def fit_to_output(image: Image.Image, hires: HiresParams) -> Image.Image:
    """A hires result at A1111's exact size: resized to the cover size when the run (multiples of
    16) differs from it, then cropped as A1111 crops its latents."""
    if image.size != (hires.cover_width, hires.cover_height):
        image = image.resize((hires.cover_width, hires.cover_height), Image.Resampling.LANCZOS)
    if image.size != (hires.output_width, hires.output_height):
        left, top = hires.crop_left, hires.crop_top
        image = image.crop((left, top, left + hires.output_width, top + hires.output_height))
    return image


def a1111_target(width: int, height: int, *, scale: float, resize_x: int, resize_y: int) -> HiresTarget:
    """A1111's calculate_target_resolution for a first pass of width x height."""
    if resize_x == 0 and resize_y == 0:
        return HiresTarget(int(width * scale), int(height * scale))
    if resize_y == 0:
        return HiresTarget(resize_x, resize_x * height // width)
    if resize_x == 0:
        return HiresTarget(resize_y * width // height, resize_y)
    if width / height < resize_x / resize_y:
        upscale = HiresTarget(resize_x, resize_x * height // width)
    else:
        upscale = HiresTarget(resize_y * width // height, resize_y)
    return HiresTarget(
        upscale.upscale_width,
        upscale.upscale_height,
        (upscale.upscale_width - resize_x) // A1111_LATENT_FACTOR,
        (upscale.upscale_height - resize_y) // A1111_LATENT_FACTOR,
    )


def hires_params(
    target: HiresTarget,
    *,
    upscaler: str,
    steps: int,
    strength: float,
    guidance_scale: float,
    upscaler_exists: Callable[[str], bool],
    max_width: int,
    max_height: int,
    max_pixels: int,
    param: str = "hires",
    params: dict[str, str] | None = None,
) -> HiresParams:
    """The second pass for `target`, checked against the server's limits and upscalers.

    An error names `param`, or `params[what]` for what it is about ("upscaler", "strength", "size"):
    the A1111 routes name their own fields."""
    names = {"upscaler": param, "strength": param, "size": param} | (params or {})
    if not (upscaler in LATENT_MODES or upscaler in PIXEL_RESIZES or upscaler_exists(upscaler)):
        raise UnknownUpscaler(upscaler, names["upscaler"])
    if not MIN_STRENGTH <= strength <= 1:
        # Below it the schedule that runs `steps` steps grows without bound (steps / strength).
        raise HiresError(
            f"denoising_strength {strength:g} must be {MIN_STRENGTH:g}..1 for the hires fix's second pass.",
            names["strength"],
        )
    run_width, run_height = (side // MODEL_SIZE_STEP * MODEL_SIZE_STEP for side in target.cover_size)
    output_width, output_height = target.output_size
    for side in (run_width, run_height, output_width, output_height):
        if side < MIN_SIDE:
            raise HiresError(
                f"The hires size {output_width}x{output_height} is too small: sides start at {MIN_SIDE}.", names["size"]
            )
    if max(run_width, output_width) > max_width or max(run_height, output_height) > max_height or (
        max(run_width * run_height, output_width * output_height) > max_pixels
    ):
        raise HiresError(
            f"The hires size {output_width}x{output_height} is above this server's limits "
            f"({max_width}x{max_height}, {max_pixels} pixels: Z_IMAGE_MAX_PIXELS); ask for a smaller scale.",
            names["size"],
        )
    cover_width, cover_height = target.cover_size
    crop_left, crop_top = target.crop_origin
    return HiresParams(
        width=run_width,
        height=run_height,
        upscaler=upscaler,
        steps=steps,
        strength=strength,
        guidance_scale=guidance_scale,
        output_width=output_width,
        output_height=output_height,
        cover_width=cover_width,
        cover_height=cover_height,
        crop_left=crop_left,
        crop_top=crop_top,
    )
