"""Uploaded images as the API takes them: decoded by images.py, its refusals as the API's errors."""

from __future__ import annotations

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
