"""ControlNet inputs: a request's control image, checked and fitted, turning its spec into a controlled one.

The control image arrives base64 in the generations JSON (`control_image`, with or without a
`data:image/...;base64,` prefix) or as a file part of an edit. It goes through the same upload
checks as an edit's image, is fitted to the output size the way edit inputs are (cover, then
centre-crop), and with `control_preprocess: canny` becomes the edge map the server computes.
"""

from __future__ import annotations

import asyncio
import dataclasses

from ..images import canny_edges, fit_to, to_rgb
from ..specs import GenerationSpec
from .errors import ApiError
from .state import ServerState
from .uploads import decode_base64_image, decode_part

DEFAULT_CONTROL_SCALE = 0.75
CONTROL_PREPROCESSES = ("none", "canny")  # `none`: the image already is a control map


def check_controlnet(server: ServerState, inpainting: bool) -> None:
    runner = server.runner
    if not runner.has_controlnet:
        raise ApiError(
            400,
            "This server has no ControlNet loaded: start it with Z_IMAGE_CONTROLNET naming a Z-Image ControlNet "
            "checkpoint to send control images.",
            param="control_image",
        )
    if inpainting and not runner.controlnet_inpaints:
        raise ApiError(
            400,
            "The loaded ControlNet cannot inpaint (a 1.0 Union checkpoint): send the control image without a "
            "mask, or load a 2.x Union checkpoint for masked edits.",
            param="mask",
        )


def controlled(
    spec: GenerationSpec, server: ServerState, control_bytes: bytes, preprocess: str, scale: float | None
) -> GenerationSpec:
    """`spec` run under the ControlNet: its control image decoded, fitted and preprocessed. A worker thread runs this.

    Text-to-image specs become "control"; inpainting specs "control_inpaint" (the ControlNet
    inpaint pipeline repaints the masked area from noise: it has no strength)."""
    inpainting = spec.params.mode == "inpaint"
    check_controlnet(server, inpainting)
    image = fit_to(to_rgb(decode_part(control_bytes, "control_image")), (spec.params.width, spec.params.height))
    if preprocess == "canny":
        image = canny_edges(image)
    params = dataclasses.replace(
        spec.params,
        mode="control_inpaint" if inpainting else "control",
        strength=None if inpainting else spec.params.strength,
        control_scale=DEFAULT_CONTROL_SCALE if scale is None else scale,
    )
    return dataclasses.replace(spec, params=params, control_image=image)


async def controlled_from_base64(
    spec: GenerationSpec, server: ServerState, encoded: str, param: str, preprocess: str, scale: float | None
) -> GenerationSpec:
    """`controlled` for a base64 control image (the JSON routes). Decoding, fitting and edge detection
    take a while for big images, so all of it, the base64 decode included, runs in a worker thread."""

    def run() -> GenerationSpec:
        return controlled(spec, server, decode_base64_image(encoded, param), preprocess, scale)

    return await asyncio.to_thread(run)
