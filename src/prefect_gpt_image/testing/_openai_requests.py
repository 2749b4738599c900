"""OpenAI's image requests, read and checked as the API does: a generation's JSON body, an
edit's multipart form (its images and mask), the models and their sizes, and the token usage
an answer reports.

Reading is kept apart from answering (`_openai_images`) because a batch's request lines are
read by the same code: a line is refused, sized and billed exactly as the same request sent
on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from PIL import Image

from prefect_gpt_image.testing._faults import _no_such_model
from prefect_gpt_image.testing._openai_common import (
    _choice,
    _form_parts,
    _form_value,
    _invalid,
    _json_type,
    _listed,
    _openai_error,
    _parsed_json,
    _Part,
    _Refused,
    _string,
)
from prefect_gpt_image.testing._server import _Reply

_GENERATIONS_SUFFIX = "/images/generations"
_EDITS_SUFFIX = "/images/edits"
"""A POST to any path ending in either is an OpenAI-protocol call: `/v1/...` for OpenAI and
gateways, `/openai/v1/...` for Azure OpenAI's v1 endpoint."""

_CLASSIC_SIZES = ("1024x1024", "1536x1024", "1024x1536")

OPENAI_MODELS: Mapping[str, Sequence[str] | None] = MappingProxyType(
    {
        "gpt-image-1.5": _CLASSIC_SIZES,
        "gpt-image-1": _CLASSIC_SIZES,
        "gpt-image-2": None,
        "gpt-image-2.5-sunburst": None,
        "gpt-image-2.5-flare": None,
        "gpt-image-2.6-sunburst": None,
        "gpt-image-2.6-flare": None,
    }
)
"""The models the OpenAI route serves by default, each with its fixed sizes, or None for any
size whose sides are multiples of 16, within 1:3 to 3:1, at most 3840x2160 and at least
655,360 pixels."""

_XHIGH_MODELS = ("gpt-image-2.5", "gpt-image-2.6")
"""Name prefixes of the models that also take the qualities `xhigh` and `max`."""
_COMPLEXITY_MODELS = ("gpt-image-2.6",)
"""Name prefixes of the models that take `complexity`."""

_FLEX_STEP = 16
_FLEX_RATIO = 3
_FLEX_LONG_SIDE = 3840
_FLEX_PIXELS = 3840 * 2160
FLEXIBLE_MIN_PIXELS = 655_360
"""The least area of a flexible size (gpt-image-2 and later): an emulator's `min_pixels`."""
_AUTO_SIZE = (1024, 1024)
_MAX_IMAGES = 10
_MAX_PROMPT = 32_000

_TOKENS_PER_MEGAPIXEL = {"low": 272, "medium": 1056, "high": 4160, "xhigh": 8320, "max": 16640}
"""Output tokens of one 1024x1024 image by quality; at gpt-image-1.5's $32 per million output
tokens the first three give its published prices (medium: 1056 tokens, $0.034). No figures
are published for xhigh and max: twice and four times high, within the model table's bounds."""

_QUALITIES = ("low", "medium", "high", "auto")
_XHIGH_QUALITIES = (*_QUALITIES, "xhigh", "max")
"""The qualities of the models named by `_XHIGH_MODELS`."""

_OPENAI_CHOICES: dict[str, tuple[str, ...]] = {
    "quality": _XHIGH_QUALITIES,
    "complexity": ("low", "medium", "high"),
    "output_format": ("png", "jpeg", "webp"),
    "background": ("transparent", "opaque", "auto"),
    "moderation": ("low", "auto"),
}
_OPENAI_RANGES: dict[str, tuple[int, int]] = {
    "n": (1, _MAX_IMAGES),
    "output_compression": (0, 100),
    "partial_images": (0, 3),
}
_OPENAI_FIELDS = frozenset(
    {"model", "prompt", "size", "user", "stream", *_OPENAI_CHOICES, *_OPENAI_RANGES}
)
"""Parameters GPT Image models accept (`stream` only as false: answers are not streamed);
any other (`width`, `response_format`, `style`) is refused as the real API refuses it."""

_EDIT_FIELDS = _OPENAI_FIELDS | {"input_fidelity"}
"""Text fields of an edit's form; its files are `image` (or `image[]`, repeated) and `mask`."""
_FIDELITIES = ("high", "low")
_MAX_INPUTS = 16
_MAX_INPUT_BYTES = 50 * 1024**2
_MAX_MASK_BYTES = 4 * 1024**2
_INPUT_TYPES: dict[str, str] = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_MASK_TYPES: dict[str, str] = {"image/png": "PNG"}

_IMAGE_BASE_TOKENS = 65
_IMAGE_TILE_TOKENS = 129
_IMAGE_TILES = 4
"""An input image costs 65 tokens plus 129 per 512-pixel tile once its short side is scaled to
512 and its long side capped at 2048 (1 to 4 tiles); `input_fidelity="high"` reads it at twice
the resolution, four times the tiles. A 1024x1024 photo: 194 tokens, or 581 at high fidelity."""

_SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")


@dataclass(frozen=True)
class _Upload:
    """An image uploaded for an edit, as far as the emulator looks at it."""

    sha256: str
    width: int
    height: int
    alpha: bool
    data: bytes = dataclasses.field(default=b"", repr=False, compare=False)

    def tokens(self, fidelity: str | None) -> int:
        """Image input tokens for reading it at `fidelity` (see `_IMAGE_TILES`)."""
        long, short = max(self.width, self.height), min(self.width, self.height)
        tiles = min(_IMAGE_TILES, math.ceil(long / short)) * (4 if fidelity == "high" else 1)
        return _IMAGE_BASE_TOKENS + _IMAGE_TILE_TOKENS * tiles


@dataclass(frozen=True)
class _ImageRequest:
    """An OpenAI-protocol generation or edit request, read and checked; `refusal` is the 4xx
    to answer instead of images, and the defaults stand in for what could not be read.
    `uploads`, `mask` (its SHA-256) and `input_fidelity` are an edit's."""

    body: dict[str, Any]
    refusal: _Reply | None
    prompt: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    n: int = 1
    quality: str = "auto"
    output_format: str = "png"
    background: str = "auto"
    uploads: tuple[_Upload, ...] = ()
    mask: str | None = None
    input_fidelity: str | None = None
    kept: tuple[bytes, bytes] | None = dataclasses.field(default=None, repr=False)
    """A masked edit's first image and mask: the output keeps the image where the mask is
    opaque, as the model does, and draws only where it is transparent."""

    @property
    def size(self) -> tuple[int, int]:
        return self.width or _AUTO_SIZE[0], self.height or _AUTO_SIZE[1]

    def usage(self, images: int) -> dict[str, Any]:
        """Token usage as OpenAI reports it: output tokens scale with pixels and quality,
        image input tokens with the images uploaded and their fidelity."""
        width, height = self.size
        per_megapixel = _TOKENS_PER_MEGAPIXEL.get(self.quality, _TOKENS_PER_MEGAPIXEL["medium"])
        output = images * round(per_megapixel * width * height / 1024**2)
        text = max(1, math.ceil(len(self.prompt or "") / 4))
        image = sum(upload.tokens(self.input_fidelity) for upload in self.uploads)
        return {
            "input_tokens": text + image,
            "input_tokens_details": {"text_tokens": text, "image_tokens": image},
            "output_tokens": output,
            "total_tokens": text + image + output,
        }

    def answer(self, data: list[dict[str, str]]) -> dict[str, Any]:
        """The 200 body carrying `data`, with the options as the model resolved them."""
        width, height = self.size
        return {
            "created": int(time.time()),
            "background": "opaque" if self.background == "auto" else self.background,
            "data": data,
            "output_format": self.output_format,
            "quality": "medium" if self.quality == "auto" else self.quality,
            "size": f"{width}x{height}",
            "usage": self.usage(len(data)),
        }


def _model_not_found(model: str | None) -> _Reply:
    return _openai_error(404, _no_such_model(model), code="model_not_found")


def _option(body: dict[str, Any], name: str, default: str = "auto") -> str:
    """One of the string options of `_OPENAI_CHOICES`; `output_format` defaults to png."""
    default = "png" if name == "output_format" else default
    return _choice(body, name, _OPENAI_CHOICES[name], default)


def _integer(body: dict[str, Any], name: str) -> int | None:
    low, high = _OPENAI_RANGES[name]
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        got = _json_type(value)
        message = f"Invalid type for '{name}': expected an integer, but got {got} instead."
        raise _invalid(message, name, "invalid_type")
    if value < low:
        message = (
            f"Invalid '{name}': integer below minimum value. "
            f"Expected a value >= {low}, but got {value} instead."
        )
        raise _invalid(message, name, "integer_below_min_value")
    if value > high:
        message = (
            f"Invalid '{name}': integer above maximum value. "
            f"Expected a value <= {high}, but got {value} instead."
        )
        raise _invalid(message, name, "integer_above_max_value")
    return value


# -- sizes ------------------------------------------------------------------------------------


def _dimensions(size: str) -> tuple[int, int] | None:
    match = _SIZE_PATTERN.fullmatch(size)
    return (int(match[1]), int(match[2])) if match else None


def _flexible_size_problem(width: int, height: int, min_pixels: int) -> str | None:
    """Why a size breaks the rules of models without a fixed size list, or None."""
    if min(width, height) < _FLEX_STEP or width % _FLEX_STEP or height % _FLEX_STEP:
        return f"Width and height must both be positive multiples of {_FLEX_STEP}"
    if max(width, height) > _FLEX_RATIO * min(width, height):
        return f"The aspect ratio must be between 1:{_FLEX_RATIO} and {_FLEX_RATIO}:1"
    if max(width, height) > _FLEX_LONG_SIDE or width * height > _FLEX_PIXELS:
        return f"The long side must be at most {_FLEX_LONG_SIDE} and the image at most 3840x2160"
    if width * height < min_pixels:
        return f"The image must have at least {min_pixels:,} pixels"
    return None


def _size(
    size: str,
    sizes: Sequence[str] | None,
    auto: tuple[int, int] = _AUTO_SIZE,
    min_pixels: int = FLEXIBLE_MIN_PIXELS,
) -> tuple[int, int]:
    """The width and height `size` asks of a model with `sizes` (None: flexible)."""
    if size == "auto":
        return auto
    dimensions = _dimensions(size)
    if sizes is not None and size not in sizes:
        supported = _listed([*sizes, "auto"])
        raise _invalid(f"Invalid value: '{size}'. Supported values are: {supported}.", "size")
    if dimensions is None:
        message = f"Invalid value: '{size}'. Use 'auto' or 'WIDTHxHEIGHT', such as '1536x864'."
        raise _invalid(message, "size")
    if sizes is None and (problem := _flexible_size_problem(*dimensions, min_pixels)):
        raise _invalid(f"Invalid value: '{size}'. {problem}.", "size")
    return dimensions


def _edit_size(width: int, height: int, sizes: Sequence[str] | None) -> tuple[int, int]:
    """The size an edit asked at "auto" gets: the listed size nearest the first image's shape,
    or for flexible sizes its own, brought within the limits and floored to multiples of 16."""
    if sizes is not None:
        listed = [dimensions for size in sizes if (dimensions := _dimensions(size)) is not None]
        return min(listed, key=lambda size: abs(math.log(size[0] * height / (size[1] * width))))
    long, short = max(width, height), min(width, height)
    long = min(long, _FLEX_RATIO * short)
    scale = min(1.0, _FLEX_LONG_SIDE / long, math.sqrt(_FLEX_PIXELS / (long * short)))

    def floor(side: float) -> int:
        return max(_FLEX_STEP, int(side * scale) // _FLEX_STEP * _FLEX_STEP)

    short_side = floor(short)
    long_side = min(floor(long), _FLEX_RATIO * short_side)
    return (long_side, short_side) if width >= height else (short_side, long_side)


# -- generations ------------------------------------------------------------------------------


def _parse_openai(
    raw: bytes, models: Mapping[str, Sequence[str] | None], min_pixels: int = FLEXIBLE_MIN_PIXELS
) -> _ImageRequest:
    try:
        body = _parsed_json(raw)
    except _Refused as refused:
        return _ImageRequest({}, refused.reply)
    return _checked(body, lambda request: _read_openai(request, models, min_pixels=min_pixels))


def _checked(body: dict[str, Any], read: Callable[[_ImageRequest], _ImageRequest]) -> _ImageRequest:
    """The request `body` makes, as `read` checks and resolves it, or with its refusal."""
    prompt, model = body.get("prompt"), body.get("model")
    request = _ImageRequest(
        body,
        None,
        prompt if isinstance(prompt, str) else None,
        model if isinstance(model, str) else None,
    )
    try:
        return read(request)
    except _Refused as refused:
        return dataclasses.replace(request, refusal=refused.reply)


def _read_openai(
    request: _ImageRequest,
    models: Mapping[str, Sequence[str] | None],
    fields: frozenset[str] = _OPENAI_FIELDS,
    first: _Upload | None = None,
    *,
    min_pixels: int = FLEXIBLE_MIN_PIXELS,
) -> _ImageRequest:
    """`request` with its options checked and resolved; raises _Refused as the API refuses.

    `fields` are the parameters accepted; `first` is an edit's first image, whose size
    "auto" follows; `min_pixels` is the least area of a flexible size.
    """
    body = request.body
    for name in body:
        if name not in fields:
            raise _invalid(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    for name in ("prompt", "model"):
        if body.get(name) is None:
            message = f"Missing required parameter: '{name}'."
            raise _invalid(message, name, "missing_required_parameter")
    prompt, model = _string(body, "prompt", ""), _string(body, "model", "")
    if not prompt:
        message = (
            "Invalid 'prompt': empty string. Expected a string with minimum length 1, "
            "but got an empty string instead."
        )
        raise _invalid(message, "prompt", "empty_string")
    if len(prompt) > _MAX_PROMPT:
        message = (
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{_MAX_PROMPT}, but got a string with length {len(prompt)} instead."
        )
        raise _invalid(message, "prompt", "string_above_max_length")
    quality, output_format = _option(body, "quality"), _option(body, "output_format")
    background = _option(body, "background")
    _option(body, "moderation")
    _option(body, "complexity", default="high")
    n = _integer(body, "n") or 1
    _integer(body, "output_compression")
    _integer(body, "partial_images")
    _string(body, "user", "")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        got = _json_type(stream)
        message = f"Invalid type for 'stream': expected a boolean, but got {got} instead."
        raise _invalid(message, "stream", "invalid_type")
    if stream:
        message = "Streaming is not emulated: leave 'stream' out or send false."
        raise _invalid(message, "stream")
    if model not in models:
        raise _Refused(_model_not_found(model))
    qualities = _XHIGH_QUALITIES if model.startswith(_XHIGH_MODELS) else _QUALITIES
    if quality not in qualities:
        message = f"Invalid value: '{quality}'. Supported values are: {_listed(qualities)}."
        raise _invalid(message, "quality")
    if "complexity" in body and not model.startswith(_COMPLEXITY_MODELS):
        message = f"The 'complexity' parameter is not supported with model '{model}'."
        raise _invalid(message, "complexity", "unsupported_parameter")
    auto = _AUTO_SIZE if first is None else _edit_size(first.width, first.height, models[model])
    width, height = _size(_string(body, "size", "auto"), models[model], auto, min_pixels)
    if background == "transparent" and output_format == "jpeg":
        message = (
            "Transparent backgrounds are not supported with output_format 'jpeg': "
            "use 'png' or 'webp'."
        )
        raise _invalid(message, "background")
    return dataclasses.replace(
        request,
        width=width,
        height=height,
        n=n,
        quality=quality,
        output_format=output_format,
        background=background,
    )


# -- edits ------------------------------------------------------------------------------------


def _upload(part: _Part, param: str, types: Mapping[str, str], limit: int) -> _Upload:
    """`part` as an uploaded image; raises _Refused unless its declared type and its bytes are
    one of `types` and it is smaller than `limit` bytes."""
    declared = part.content_type or "application/octet-stream"
    if declared not in types:
        message = (
            f"Invalid file '{param}': unsupported mimetype ('{declared}'). "
            f"Supported file formats are {_listed(list(types))}."
        )
        raise _invalid(message, param, "unsupported_file_mimetype")
    if len(part.data) >= limit:
        message = (
            f"Invalid file '{param}': {len(part.data)} bytes is too large. "
            f"Files must be smaller than {limit // 1024**2} MB."
        )
        raise _invalid(message, param, "file_too_large")
    formats = list(types.values())
    try:
        with Image.open(io.BytesIO(part.data), formats=formats) as image:
            width, height = image.size
            alpha = image.has_transparency_data
    except (OSError, ValueError, Image.DecompressionBombError):
        message = f"Invalid file '{param}': its bytes are not a {' or '.join(formats)} image."
        raise _invalid(message, param, "invalid_image_format") from None
    return _Upload(hashlib.sha256(part.data).hexdigest(), width, height, alpha, part.data)


def _parse_edit(
    raw: bytes,
    content_type: str,
    models: Mapping[str, Sequence[str] | None],
    min_pixels: int = FLEXIBLE_MIN_PIXELS,
) -> _ImageRequest:
    """An edit's multipart form, read and checked as the API does."""
    try:
        parts = _form_parts(raw, content_type)
        body = {
            part.name: _form_value(part, _OPENAI_RANGES)
            for part in parts
            if not _is_file_field(part)
        }
    except _Refused as refused:
        return _ImageRequest({}, refused.reply)
    images = [part for part in parts if part.name in ("image", "image[]")]
    masks = [part for part in parts if part.name == "mask"]
    return _checked(body, lambda request: _read_edit(request, images, masks, models, min_pixels))


def _is_file_field(part: _Part) -> bool:
    return part.name in ("image", "image[]", "mask")


def _read_edit(
    request: _ImageRequest,
    images: Sequence[_Part],
    masks: Sequence[_Part],
    models: Mapping[str, Sequence[str] | None],
    min_pixels: int = FLEXIBLE_MIN_PIXELS,
) -> _ImageRequest:
    """`request` with its uploads and options checked; raises _Refused as the API refuses."""
    if not images:
        raise _invalid(
            "Missing required parameter: 'image'.", "image", "missing_required_parameter"
        )
    if len(images) > _MAX_INPUTS:
        message = (
            f"Invalid 'image': array too long. Expected an array with maximum length "
            f"{_MAX_INPUTS}, but got an array with length {len(images)} instead."
        )
        raise _invalid(message, "image", "array_above_max_length")
    uploads = tuple(_upload(part, "image", _INPUT_TYPES, _MAX_INPUT_BYTES) for part in images)
    request = _read_openai(request, models, _EDIT_FIELDS, uploads[0], min_pixels=min_pixels)
    mask = None
    if len(masks) > 1:
        raise _invalid("Invalid 'mask': expected one file, but got several.", "mask")
    if masks:
        mask = _upload(masks[0], "mask", _MASK_TYPES, _MAX_MASK_BYTES)
        if not mask.alpha:
            message = (
                "Invalid 'mask': it must have an alpha channel, whose fully transparent pixels "
                "show where to edit."
            )
            raise _invalid(message, "mask", "invalid_image_format")
        first = uploads[0]
        if (mask.width, mask.height) != (first.width, first.height):
            message = (
                f"Invalid 'mask': its size ({mask.width}x{mask.height}) must match the first "
                f"image's ({first.width}x{first.height})."
            )
            raise _invalid(message, "mask", "invalid_image_dimensions")
    fidelity = _choice(request.body, "input_fidelity", _FIDELITIES, "low")
    return dataclasses.replace(
        request,
        uploads=uploads,
        mask=mask.sha256 if mask is not None else None,
        input_fidelity=fidelity,
        kept=(uploads[0].data, mask.data) if mask is not None else None,
    )
