"""Checking that downloaded bytes really are an image, and reading its size."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from prefect_gpt_image.errors import InvalidImageError

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


@dataclass(frozen=True)
class ImageInfo:
    media_type: str
    width: int
    height: int


def inspect_image(data: bytes) -> ImageInfo:
    """The media type and dimensions of `data`, or InvalidImageError.

    Only headers are parsed, plus `verify()`, which walks a PNG's chunks (so a
    truncated PNG fails) without decoding pixels; a JPEG must end with its EOI marker.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format or "", image.size
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(
            f"The API served {len(data)} bytes that are not a readable image "
            f"(starting {data[:16]!r}): {exc}"
        ) from exc
    if fmt not in MEDIA_TYPES:
        raise InvalidImageError(f"The API served a {fmt} image; expected PNG, JPEG or WebP.")
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise InvalidImageError(f"The API served a truncated JPEG ({len(data)} bytes).")
    return ImageInfo(media_type=MEDIA_TYPES[fmt], width=width, height=height)
