"""Uploaded images as the API takes them: decoded by images.py, its refusals as the API's errors."""

from __future__ import annotations

import base64
import binascii

from PIL import Image

from ..images import ImageInputError, decode_upload
from .errors import ApiError


def decode_part(data: bytes, param: str) -> Image.Image:
    """The decoded upload named `param`; 415 for a format we do not take, 400 for a broken or oversized one."""
    try:
        return decode_upload(data, param)
    except ImageInputError as exc:
        code = "unsupported_image_format" if exc.status_code == 415 else "invalid_image"
        raise ApiError(exc.status_code, exc.message, param=param, code=code) from None


def decode_base64_image(text: str, param: str) -> bytes:
    """The bytes of a base64 image, with or without a `data:image/...;base64,` prefix; 400 for anything else."""
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"'{param}' is a data: URL that is not base64.", param=param, code="invalid_image")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{param}' is not valid base64.", param=param, code="invalid_image") from None
