"""Checking that answered bytes really are an image, and reading its size.

Every image is decoded in full before it is accepted, so a file whose headers are fine but
whose pixels are not (truncated, corrupt, or a few hundred bytes claiming a picture of
gigabytes) is refused here rather than by whoever opens it next. A PNG's pixel data is
inflated in full and each row's filter checked, without the unfiltering arithmetic, which
cannot fail: the same verdict as Pillow's decode at under a third of its CPU. Error messages say how
many bytes came and what media type they were labelled with, never what they held.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from prefect_gpt_image.errors import InvalidImageError

MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

LARGEST_MODEL_SIZE = (3840, 2160)
"""The largest image a model in the model table makes, width by height
(`ModelSpec.max_pixels` by default)."""

MAX_IMAGE_PIXELS = LARGEST_MODEL_SIZE[0] * LARGEST_MODEL_SIZE[1] * 3 // 2
"""The most pixels an accepted image may have: the largest size a model makes with half
again as much room, 12,441,600. An image that claims more is refused before any pixel is
decoded: decoding takes up to 4 bytes a pixel, so this bounds what one image can cost
(about 50 MB), where a 92-byte PNG can claim 12000x12000 pixels (a decompression bomb)."""

_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,63}")


@dataclass(frozen=True)
class ImageInfo:
    media_type: str
    width: int
    height: int


def inspect_image(
    data: bytes,
    media_type: str | None = None,
    *,
    source: str = "The API served",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> ImageInfo:
    """The media type and dimensions of `data`, once it has been decoded in full; or
    InvalidImageError, whatever went wrong reading it.

    `media_type` is what the bytes were labelled with (a Content-Type header, a data: URL),
    if anything: it is shown in error messages, and the bytes decide the type. `source`
    begins each error message, so that it names where the bytes came from; `max_pixels`
    bounds what decoding them may cost.
    """
    served = _served(data, media_type)
    try:
        with Image.open(io.BytesIO(data), formats=tuple(MEDIA_TYPES)) as image:
            fmt, (width, height) = image.format or "", image.size
            if fmt not in MEDIA_TYPES:  # a JPEG with more pictures in it (MPO)
                raise InvalidImageError(
                    f"{source} a {fmt} image ({served}); expected PNG, JPEG or WebP."
                )
            if width * height > max_pixels:
                raise _too_many_pixels(source, served, f"{width}x{height} pixels", max_pixels)
            if getattr(image, "is_animated", False):
                raise InvalidImageError(
                    f"{source} an animated {fmt} ({served}); expected a still image."
                )
            image.verify()  # a PNG's chunks and checksums, which decoding does not check
        if not (fmt == "PNG" and _png_pixels_complete(data)):
            with Image.open(io.BytesIO(data), formats=(fmt,)) as image:
                image.load()
    except InvalidImageError:
        raise
    except Image.DecompressionBombError:
        raise _too_many_pixels(
            source, served, "more pixels than Pillow opens", max_pixels
        ) from None
    except UnidentifiedImageError:
        raise InvalidImageError(
            f"{source} {served} that are not a readable image: not a PNG, JPEG or WebP file."
        ) from None
    except Exception as exc:
        # A decoder may fail in any way on untrusted bytes. Only the kind of failure is
        # kept: decoders' messages can quote the bytes.
        if isinstance(exc, _BadPixelData):
            reason = str(exc)
        else:
            reason = "it is truncated" if "truncated" in str(exc) else f"{type(exc).__name__}"
        raise InvalidImageError(
            f"{source} {served} that are not a readable image: {reason}."
        ) from None
    if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        raise InvalidImageError(f"{source} a truncated JPEG ({served}).")
    return ImageInfo(media_type=MEDIA_TYPES[fmt], width=width, height=height)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel by PNG colour type: grey, RGB, palette, grey and alpha, RGBA."""
_PNG_FILTERS = 5
"""Row filter types 0 to 4: none, sub, up, average, Paeth."""


class _BadPixelData(ValueError):
    """What is wrong with a PNG's pixel data, in words that quote none of it."""


def _png_pixels_complete(data: bytes) -> bool:
    """Whether a PNG that Pillow opened and verified holds exactly its rows of pixel data,
    each with a known filter; False where this cannot tell (interlaced, say), so that
    Pillow decodes it instead. Raises `_BadPixelData` for data that is wrong."""
    width = height = bits_per_pixel = 0
    interlaced = True
    stream = zlib.decompressobj()
    inflated: list[bytes] = []
    position, expected = 8, 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        body = position + 8
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack_from(
                ">IIBBBBB", data, body
            )
            bits_per_pixel = depth * _PNG_CHANNELS.get(colour, 0)
            interlaced = interlace != 0
            expected = height * (1 + (width * bits_per_pixel + 7) // 8)
        elif kind == b"IDAT":
            if interlaced or not bits_per_pixel:
                return False
            room = expected + 1 - sum(map(len, inflated))
            inflated.append(stream.decompress(data[body : body + length], room))
            if stream.unconsumed_tail:
                raise _BadPixelData("it holds more pixel data than its size says")
        elif kind == b"IEND":
            break
        position = body + length + 4  # and the checksum, which verify() checked
    pixels = b"".join(inflated)
    if not stream.eof or len(pixels) != expected or not expected:
        raise _BadPixelData(
            "it is truncated"
            if len(pixels) < expected
            else "it holds more pixel data than its size says"
        )
    row = len(pixels) // height
    if any(f >= _PNG_FILTERS for f in pixels[::row]):
        raise _BadPixelData("a row of its pixel data has an unknown filter")
    return True


def media_type_label(value: str | None) -> str | None:
    """A media type as an error message may show it: `type/subtype` lowercased and without
    parameters; anything else is not shown."""
    if value is None:
        return None
    name = value.split(";", 1)[0].strip().lower()
    return name if _MEDIA_TYPE.fullmatch(name) else "an unrecognised media type"


def _served(data: bytes, media_type: str | None) -> str:
    label = media_type_label(media_type)
    return f"{len(data):,} bytes" + (f" labelled {label}" if label else "")


def _too_many_pixels(source: str, served: str, size: str, max_pixels: int) -> InvalidImageError:
    return InvalidImageError(
        f"{source} an image of {size} ({served}), more than the {max_pixels:,} "
        "accepted: it was refused without decoding it."
    )
