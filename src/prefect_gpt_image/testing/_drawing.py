"""The images the emulator serves: drawn with Pillow, each unlike any other, captioned with
its prompt's first words so that a gallery of them says which is which.

Drawing is fast on purpose (flat tints, a bar code of the image's serial, glyphs cached), as a
benchmark draws thousands of images; `_pad_png` grows a PNG to a real image's size for the
price of a copy. `_Studio` numbers the images and remembers what was served.
"""

from __future__ import annotations

import functools
import hashlib
import io
import itertools
import math
import os
import secrets
import struct
import threading
import unicodedata
import zlib
from typing import Any, Protocol

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 4096
"""Largest width or height accepted, so a typo cannot make the server allocate gigabytes."""

_FORMATS: dict[str, tuple[str, str, str]] = {  # name -> (Pillow format, extension, media type)
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"PNG": {"compress_level": 3}, "WEBP": {"method": 0}}

_PADDING_CHUNK = b"prVt"
"""Ancillary, private, reserved bit clear, safe to copy (the case rules of PNG chunk types):
every decoder skips it, so it can carry filler that makes an image as big as a real one."""

_CAPTION_WORDS = 6
_CAPTION_CHARS = 48
_CAPTION_SIZES = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
"""Font sizes captions use: a short ladder, so that cached glyphs are reused across images."""


def _caption(prompt: str) -> str:
    """The prompt's first words, folded to ASCII so the default font can draw them."""
    folded = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    words = folded.split()
    caption = " ".join(words[:_CAPTION_WORDS])
    if len(caption) > _CAPTION_CHARS:
        caption = caption[: _CAPTION_CHARS - 3].rstrip() + "..."
    elif len(words) > _CAPTION_WORDS:
        caption += " ..."
    return caption


@functools.lru_cache(maxsize=len(_CAPTION_SIZES))
def _font(size: int) -> ImageFont.FreeTypeFont | None:
    """Pillow's own font at `size`, or None where Pillow was built without FreeType."""
    font = ImageFont.load_default(size=size)
    return font if isinstance(font, ImageFont.FreeTypeFont) else None


@functools.lru_cache(maxsize=4096)
def _glyph(char: str, size: int) -> tuple[Image.Image | None, int, int, int]:
    """The coverage mask of `char` at `size`, cropped to its ink, where it sits relative to
    the pen (x, y), and how far it moves the pen.

    FreeType takes about 20 µs to draw a glyph, a paste of a cached one a few: a caption
    costs a fraction of a millisecond, where a benchmark draws thousands of images.
    """
    font = _font(size)
    if font is None:
        return None, 0, 0, 0
    advance = math.ceil(font.getlength(char))
    ascent, descent = font.getmetrics()
    overhang = size // 4  # room for glyphs that reach past their advance, such as j and f
    canvas = Image.new("L", (advance + 2 * overhang, ascent + descent))
    ImageDraw.Draw(canvas).text((overhang, 0), char, fill=255, font=font)
    ink = canvas.getbbox()
    if ink is None:  # a space
        return None, 0, 0, advance
    return canvas.crop(ink), ink[0] - overhang, ink[1], advance


def _caption_size(caption: str, width: int, height: int) -> int:
    """The largest caption size that fits the image, 0 if none is legible."""
    probe = _CAPTION_SIZES[-1]
    length = sum(_glyph(char, probe)[3] for char in caption) or 1
    fits = [
        size
        for size in _CAPTION_SIZES
        if size <= min(height // 20, width // 12) and size * length <= 0.8 * probe * width
    ]
    return fits[-1] if fits else 0


def _draw_caption(image: Image.Image, caption: str, top: int) -> None:
    """Black text on a white box, so a gallery of generated images says which is which."""
    size = _caption_size(caption, *image.size)
    font = _font(size) if size else None
    if font is None:
        return
    ascent, descent = font.getmetrics()
    pad = max(size // 4, 2)
    left = pen = pad * 2
    top += pad * 2
    glyphs = [_glyph(char, size) for char in caption]
    length = sum(advance for *_, advance in glyphs)
    box = (left - pad, top - pad, left + length + pad, top + ascent + descent + pad)
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    for mask, x, y, advance in glyphs:
        if mask is not None:
            image.paste((0, 0, 0), (pen + x, top + y), mask)
        pen += advance


def _render(
    prompt: str,
    serial: int,
    width: int,
    height: int,
    image_format: str,
    *,
    transparent: bool = False,
) -> bytes:
    """A flat image tinted by the prompt with a 64-bit bar code of `serial`, so calls differ,
    and the prompt's first words as a caption, so people can tell images apart.

    `transparent` leaves the flat background see-through (PNG and WebP only).
    """
    tint = hashlib.sha256(prompt.encode()).digest()
    mode, alpha = ("RGBA", (0,)) if transparent else ("RGB", ())
    image = Image.new(mode, (width, height), (tint[0], tint[1], tint[2], *alpha))
    draw = ImageDraw.Draw(image)
    for band in range(4):
        top = height * (2 * band + 3) // 10
        colour = (tint[3 + 3 * band], tint[4 + 3 * band], tint[5 + 3 * band])
        draw.rectangle((0, top, width - 1, top + height // 12), fill=colour)
    bar_height = max(height // 8, 1)
    for bit in range(64):
        left, right = width * bit // 64, width * (bit + 1) // 64 - 1
        if right >= left:
            shade = 255 if serial >> bit & 1 else 0
            draw.rectangle((left, 0, right, bar_height - 1), fill=(shade, shade, shade))
    caption = _caption(prompt)
    if caption:
        _draw_caption(image, caption, bar_height)
    pillow_format = _FORMATS[image_format][0]
    buffer = io.BytesIO()
    image.save(buffer, pillow_format, **_SAVE_OPTIONS.get(pillow_format, {}))
    return buffer.getvalue()


def _keep_unmasked(drawn: bytes, image: bytes, mask: bytes, image_format: str) -> bytes:
    """`drawn`, with `image` (resized to it) pasted wherever `mask` is not transparent: a
    masked edit changes only the masked area."""
    with Image.open(io.BytesIO(drawn)) as opened:
        out = opened.convert("RGBA")
    with Image.open(io.BytesIO(image)) as first, Image.open(io.BytesIO(mask)) as cover:
        original = first.convert("RGBA").resize(out.size, Image.Resampling.BILINEAR)
        keep = cover.convert("RGBA").getchannel("A").resize(out.size, Image.Resampling.NEAREST)
    out.paste(original, mask=keep.point(lambda alpha: 255 if alpha else 0))
    pillow_format = _FORMATS[image_format][0]
    if pillow_format == "JPEG":
        out = out.convert("RGB")
    buffer = io.BytesIO()
    out.save(buffer, pillow_format, **_SAVE_OPTIONS.get(pillow_format, {}))
    return buffer.getvalue()


def _pad_png(png: bytes, size: int) -> bytes:
    """`png` grown to at least `size` bytes by a random private chunk before IEND.

    Random filler neither compresses nor dedupes, and costs a copy instead of deflating a
    picture that big.
    """
    missing = size - len(png)
    if missing <= 0:
        return png
    if png[-8:-4] != b"IEND":
        raise ValueError("not a complete PNG: it does not end with IEND")
    chunk = _PADDING_CHUNK + os.urandom(max(missing - 12, 0))  # 12: length, type and CRC
    return b"".join(
        (
            png[:-12],
            struct.pack(">I", len(chunk) - 4),
            chunk,
            struct.pack(">I", zlib.crc32(chunk)),
            png[-12:],
        )
    )


class _StudioSettings(Protocol):
    """The emulator's settings the studio reads as it draws."""

    keep_images: bool
    image_bytes: int | None


class _Studio:
    """Draws every image the emulator serves and remembers it (`served`, by SHA-256).

    Serials are never reset, and seeded at random so that images also differ across
    emulator instances. `image_bytes` pads each PNG; with `keep_images` off, only hashes are
    kept, so a long benchmark runs in bounded memory.
    """

    def __init__(self, settings: _StudioSettings) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._serials = itertools.count(secrets.randbits(32) << 32)
        self._served: dict[str, bytes] = {}

    def clear(self) -> None:
        with self._lock:
            self._served = {}

    @property
    def served(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self._served)

    def image(
        self, prompt: str, width: int, height: int, image_format: str, *, transparent: bool = False
    ) -> bytes:
        """A new image, padded as `image_bytes` asks; not counted in `served`, for a fault
        that serves it broken."""
        with self._lock:
            serial = next(self._serials)
        data = _render(prompt, serial, width, height, image_format, transparent=transparent)
        image_bytes = self._settings.image_bytes
        if image_bytes is not None and image_format == "png":
            data = _pad_png(data, image_bytes)
        return data

    def draw(
        self,
        prompt: str,
        width: int,
        height: int,
        image_format: str,
        *,
        transparent: bool = False,
        kept: tuple[bytes, bytes] | None = None,
    ) -> bytes:
        """A new valid image, counted in `served`; a masked edit's keeps its image's
        unmasked area (`kept`)."""
        data = self.image(prompt, width, height, image_format, transparent=transparent)
        if kept is not None:
            data = _keep_unmasked(data, *kept, image_format)
        with self._lock:
            self._served[hashlib.sha256(data).hexdigest()] = (
                data if self._settings.keep_images else b""
            )
        return data
