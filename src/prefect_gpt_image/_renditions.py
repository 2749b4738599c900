"""Renditions drawn: an image cut to a placement's aspect around a focus point, resized to its
exact pixels and encoded at the best quality that fits its byte limit. Pure functions of
their inputs, so a rendition drawn twice is the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from functools import cached_property, lru_cache

from PIL import Image

from prefect_gpt_image.errors import InvalidRequestError
from prefect_gpt_image.model_table import OutputFormat
from prefect_gpt_image.placement_table import Placement

ASPECT_TOLERANCE = 0.02
"""Aspects within 2% of each other are the same shape: cutting one from the other loses a
sliver no one sees, where extending or generating would be paid for."""
DEFAULT_QUALITY = 90
"""JPEG and WebP quality where the byte limit allows it (or there is none)."""
MIN_QUALITY = 30
"""Below this, JPEG and WebP show blocks: a rendition that needs less fails instead."""
_PILLOW_FORMATS: dict[OutputFormat, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MEDIA_TYPES: dict[OutputFormat, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
}


class RenditionError(InvalidRequestError):
    """A rendition that cannot be drawn as its placement asks."""


@dataclass(frozen=True)
class Rendition:
    """A placement's image: its encoded bytes, and how much of the source it lost."""

    data: bytes
    media_type: str
    width: int
    height: int
    cropped: float
    """The share of the source's area cut away to reach the placement's aspect."""

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def same_aspect(width: int, height: int, other_width: int, other_height: int) -> bool:
    """Whether two sizes are one shape, within `ASPECT_TOLERANCE`."""
    ratio = (width / height) / (other_width / other_height)
    return abs(math.log(ratio)) <= math.log1p(ASPECT_TOLERANCE)


def crop_box(
    size: tuple[int, int], aspect: float, focus: tuple[float, float] = (0.5, 0.5)
) -> tuple[int, int, int, int]:
    """The largest box of `aspect` within an image of `size`, centred on `focus` (fractions
    of the width and height) as far as the image's edges allow."""
    width, height = size
    if width / height > aspect:
        box_w, box_h = max(1, round(height * aspect)), height
    else:
        box_w, box_h = width, max(1, round(width / aspect))
    left = min(max(round(focus[0] * width - box_w / 2), 0), width - box_w)
    top = min(max(round(focus[1] * height - box_h / 2), 0), height - box_h)
    return left, top, left + box_w, top + box_h


def decoded(source: bytes) -> Image.Image:
    """`source`'s pixels, in RGB or RGBA: decoded once for all of its renditions."""
    with Image.open(io.BytesIO(source)) as opened:
        opened.load()
        return opened.copy() if opened.mode in ("RGB", "RGBA") else opened.convert("RGBA")


def render(
    image: Image.Image, placement: Placement, focus: tuple[float, float] = (0.5, 0.5)
) -> Rendition:
    """`placement`'s rendition of `image` (see `decoded`): cut to its aspect around `focus`,
    never stretched, resized with a Lanczos filter, in its format, under its byte limit.
    Raises `RenditionError` where no quality fits the limit."""
    box = crop_box(image.size, placement.aspect, focus)
    resized = image.resize(
        (placement.width, placement.height), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0
    )
    kept = (box[2] - box[0]) * (box[3] - box[1]) / (image.width * image.height)
    data, image_format = _encoded(resized, placement)
    return Rendition(
        data=data,
        media_type=_MEDIA_TYPES[image_format],
        width=placement.width,
        height=placement.height,
        cropped=1 - kept,
    )


def _encoded(image: Image.Image, placement: Placement) -> tuple[bytes, OutputFormat]:
    """`image` in the placement's format at the best quality under its limit: PNG where no
    format is given and it fits, else JPEG."""
    limit = placement.max_bytes
    image_format = placement.output_format
    if image_format in (None, "png"):
        png = _encode(image, "png")
        if limit is None or len(png) <= limit or image_format == "png":
            if limit is not None and len(png) > limit:
                raise _too_large(placement, "png", len(png))
            return png, "png"
        image_format = "jpeg"
    best = _encode(image, image_format, DEFAULT_QUALITY)
    if limit is None or len(best) <= limit:
        return best, image_format
    low, high, fitting = MIN_QUALITY, DEFAULT_QUALITY - 1, None
    while low <= high:  # the highest quality that fits
        quality = (low + high) // 2
        data = _encode(image, image_format, quality)
        if len(data) <= limit:
            fitting, low = data, quality + 1
        else:
            high = quality - 1
    if fitting is None:
        raise _too_large(placement, image_format, len(_encode(image, image_format, MIN_QUALITY)))
    return fitting, image_format


def _encode(
    image: Image.Image, image_format: OutputFormat, quality: int = DEFAULT_QUALITY
) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, "PNG")
    else:
        if image_format == "jpeg" and image.mode == "RGBA":
            image = _on_white(image)
        image.save(buffer, _PILLOW_FORMATS[image_format], quality=quality)
    return buffer.getvalue()


def _on_white(image: Image.Image) -> Image.Image:
    """A transparent image flattened onto white, for a format without transparency."""
    flat = Image.new("RGB", image.size, (255, 255, 255))
    flat.paste(image, mask=image.getchannel("A"))
    return flat


def _too_large(placement: Placement, image_format: OutputFormat, smallest: int) -> RenditionError:
    return RenditionError(
        f"Placement {placement.name!r} ({placement.size}) must fit in "
        f"{placement.max_bytes or 0:,} bytes, and its image takes {smallest:,} even as "
        f"{image_format.upper()}{'' if image_format == 'png' else f' at quality {MIN_QUALITY}'}: "
        "raise its max_bytes, or give it another output_format."
    )


@lru_cache(maxsize=64)
def smallest_bytes(width: int, height: int, image_format: OutputFormat) -> int:
    """The bytes a blank image of this size takes in `image_format` at the lowest quality a
    rendition is drawn at: no picture of that size takes fewer."""
    blank = Image.new("RGB", (width, height), (255, 255, 255))
    return len(_encode(blank, image_format, MIN_QUALITY))


def check_fits(placement: Placement) -> None:
    """Refuse, before anything is paid, a byte limit no image of the placement's size could
    meet in any format it may take."""
    limit = placement.max_bytes
    if limit is None:
        return
    formats: tuple[OutputFormat, ...] = (
        (placement.output_format,) if placement.output_format else ("png", "jpeg")
    )
    floor = min(smallest_bytes(placement.width, placement.height, f) for f in formats)
    if floor > limit:
        raise InvalidRequestError(
            f"Placement {placement.name!r} ({placement.size}) asks for at most {limit:,} bytes, "
            f"and even a blank {placement.size} image takes {floor:,} in "
            f"{' or '.join(f.upper() for f in formats)}: raise its max_bytes."
        )


def extension_canvas(source: bytes, width: int, height: int) -> tuple[bytes, bytes]:
    """The PNG canvas and mask of an edit that extends `source` to `width`x`height`: the
    image fitted inside the canvas, centred, the rest transparent; the mask opaque over the
    image and transparent over the new area, where the model draws."""
    with Image.open(io.BytesIO(source)) as opened:
        image = opened.convert("RGBA")
    fit = min(width / image.width, height / image.height)
    fitted = (max(1, round(image.width * fit)), max(1, round(image.height * fit)))
    if fitted != image.size:
        image = image.resize(fitted, Image.Resampling.LANCZOS)
    at = ((width - fitted[0]) // 2, (height - fitted[1]) // 2)
    canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    canvas.paste(image, at)
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    mask.paste((0, 0, 0, 255), (*at, at[0] + fitted[0], at[1] + fitted[1]))
    return _png(canvas), _png(mask)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
