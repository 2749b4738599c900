"""A loopback HTTP server that speaks two GPT Image protocols: NexaAPI's endpoint on
RapidAPI (`POST /generate`) and OpenAI's Images API (`POST .../images/generations`, and
`POST .../images/edits` for edits of uploaded images, as OpenAI, gateways and Azure OpenAI's
v1 endpoint serve it), with OpenAI's Files and Batch APIs (`.../files`, `.../batches`) for
generations and edits submitted in bulk.

Tests, demos and benchmarks cannot reach (or pay for) the real APIs, so this server answers
the same requests with the same status codes and bodies, draws a fresh image per generation
or edit (captioned with the prompt's first words), records every call, with the SHA-256 of
each uploaded image, and can inject the failures a real deployment meets. It can also
enforce a requests-per-second limit, pad images to a realistic size and, run as its own
process (`python -m prefect_gpt_image.testing.emulator`), report its counters over HTTP.
A batch answers its request lines with the same code as synchronous calls, on a thread of
its own, and writes its output and error files to disk (see `_batch_api`).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import dataclasses
import email.message
import email.parser
import functools
import hashlib
import io
import itertools
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urlsplit

from PIL import Image, ImageDraw, ImageFont

from prefect_gpt_image.testing._gateways import GATEWAYS, as_gateway

if TYPE_CHECKING:
    from prefect_gpt_image.testing._batch_api import BatchApi

__all__ = ["OPENAI_MODELS", "RESPONSE_SHAPES", "Fault", "GptImageEmulator", "RecordedCall", "main"]

RESPONSE_SHAPES: tuple[str, ...] = (
    "url",
    "images_objects",
    "images_strings",
    "output",
    "data_url",
    "data_b64",
    "result_nested",
)
"""JSON layouts seen from image APIs; the emulator also accepts "cycle" to rotate through them."""

MAX_SIDE = 4096
"""Largest width or height accepted, so a typo cannot make the server allocate gigabytes."""

_FORMATS: dict[str, tuple[str, str, str]] = {  # name -> (Pillow format, extension, media type)
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}
_SAVE_OPTIONS: dict[str, dict[str, Any]] = {"PNG": {"compress_level": 3}, "WEBP": {"method": 0}}

_MISSING_KEY = (
    "Missing RapidAPI application key. Go to https://docs.rapidapi.com/docs/keys "
    "to learn how to get your API application key."
)
_INVALID_KEY = "Invalid API key. Go to https://docs.rapidapi.com/docs/keys for more info."
_NOT_SUBSCRIBED = "You are not subscribed to this API."
_QUOTA = (
    "You have exceeded the MONTHLY quota for Requests on your current plan, BASIC. "
    "Upgrade your plan at https://rapidapi.com/nexaquency/api/gpt-image-1-5"
)
_SAFETY = (
    "Your request was rejected as a result of our safety system. "
    "Your prompt may contain text that is not allowed by our safety system."
)
_NOT_AN_IMAGE = b"<html><body>Service temporarily unavailable</body></html>"
_TOO_MANY = "Too many requests"

_PADDING_CHUNK = b"prVt"
"""Ancillary, private, reserved bit clear, safe to copy (the case rules of PNG chunk types):
every decoder skips it, so it can carry filler that makes an image as big as a real one."""

_STREAM_CHUNK = 1024**2
"""Bytes per write of a file sent from disk."""

_STATS_PATH = "/__emulator__/stats"
_RESET_PATH = "/__emulator__/reset"

_SECRET_HEADERS = frozenset({"x-rapidapi-key", "authorization", "api-key"})
"""Headers whose values are redacted in call records."""

# -- OpenAI's Images API ----------------------------------------------------------------------

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

_MAX_BODY = 256 * 1024**2
"""Largest POST body read: room for an image past the 50 MB limit, so the API's own 400 for it
can be tested, without letting one request take gigabytes. Larger ones get a gateway's 413."""
_MAX_PARTS = 64
_MAX_PART_HEAD = 16 * 1024
_MAX_FIELD = 256 * 1024
_FORM_INTEGER = re.compile(r"-?[0-9]{1,9}")

_BAD_JSON = (
    "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
    "payload: send the request with a JSON body and Content-Type: application/json."
)
_NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the api-key header."
)
_OPENAI_QUOTA = "You exceeded your current quota, please check your plan and billing details."
_OPENAI_SAFETY = (
    "Your request was rejected by the safety system. If you believe this is an error, "
    "contact us at help.openai.com and include the request ID."
)
_NOT_VERIFIED = (
    "Your organization must be verified to use this model. Please go to "
    "https://platform.openai.com/settings/organization/general and click on Verify "
    "Organization. If you just verified, it can take up to 15 minutes for access to propagate."
)
_SIZE_PATTERN = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")

# -- captions ---------------------------------------------------------------------------------

_CAPTION_WORDS = 6
_CAPTION_CHARS = 48
_CAPTION_SIZES = (8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128)
"""Font sizes captions use: a short ladder, so that cached glyphs are reused across images."""


BATCH_OUTPUT_FAULTS = ("not_json", "truncated", "no_custom_id", "stray")
"""Ways a batch's answer line can be written wrong (see `add_batch_output_fault`)."""


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to inject into the emulator's next answers; build it with a classmethod.

    `kind` names the situation (it is recorded in `RecordedCall.fault`); the other fields are
    its parameters: the status to answer, seconds to stall, rate-limit headers or a message.
    Every fault works on both routes, in each protocol's own words. On the OpenAI route, whose
    images travel inline, the URL faults answer a link instead of `b64_json` (expired_url,
    redirected_url) or a broken image inline (not_an_image, truncated_image), and
    slow_download is a slow answer.
    """

    kind: str
    status: int | None = None
    seconds: float | None = None
    retry_after: float | None = None
    reset: float | None = None
    message: str | None = None

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0, reset: float | None = None) -> Fault:
        """429 when the plan's request rate is hit: RapidAPI's gateway, or OpenAI's
        `rate_limit_exceeded` with `x-ratelimit-reset-requests` from `reset` or `retry_after`."""
        return cls("rate_limited", status=429, retry_after=retry_after, reset=reset)

    @classmethod
    def quota_exceeded(cls) -> Fault:
        """429 once the monthly quota of the plan is used up; retrying will not help."""
        return cls("quota_exceeded", status=429)

    @classmethod
    def server_error(cls, status: int = 503) -> Fault:
        """A 5xx: HTML from the gateway's nginx for 502/503/504, the model's JSON for 500."""
        if not 500 <= status <= 599:
            raise ValueError(f"server_error needs a 5xx status, got {status}")
        return cls("server_error", status=status)

    @classmethod
    def stall(cls, seconds: float) -> Fault:
        """A slow generation: the provider still works (and bills) after the client gives up."""
        return cls("stall", seconds=seconds)

    @classmethod
    def malformed_body(cls) -> Fault:
        """A 200 whose JSON was cut off in transit; the provider has already charged for it."""
        return cls("malformed_body", status=200)

    @classmethod
    def no_image(cls) -> Fault:
        """A billed 200 that reports success but carries no image (a silent model failure)."""
        return cls("no_image", status=200)

    @classmethod
    def expired_url(cls, status: int = 404) -> Fault:
        """A billed 200 whose image URL expired or was never uploaded (S3 403/404 on GET)."""
        if not 400 <= status <= 499:
            raise ValueError(f"expired_url needs a 4xx status, got {status}")
        return cls("expired_url", status=status)

    @classmethod
    def not_an_image(cls) -> Fault:
        """A billed 200 whose URL serves an HTML error page labelled image/png (a broken CDN)."""
        return cls("not_an_image", status=200)

    @classmethod
    def redirected_url(cls, location: str) -> Fault:
        """A billed 200 whose image URL redirects to `location` (a CDN hop, or a trap)."""
        return cls("redirected_url", status=200, message=location)

    @classmethod
    def slow_download(cls, seconds: float) -> Fault:
        """A billed 200 whose image host sits on the first download for `seconds`."""
        return cls("slow_download", status=200, seconds=seconds)

    @classmethod
    def truncated_image(cls) -> Fault:
        """A billed 200 whose URL serves only half a PNG (a dropped download or partial upload)."""
        return cls("truncated_image", status=200)

    @classmethod
    def bad_request(cls, message: str) -> Fault:
        """400 for a request the model rejects, e.g. a size or option it does not support."""
        return cls("bad_request", status=400, message=message)

    @classmethod
    def unauthorized(cls) -> Fault:
        """401 as if the key were revoked or rotated while the flow runs."""
        return cls("unauthorized", status=401)

    @classmethod
    def not_subscribed(cls) -> Fault:
        """403 as if the RapidAPI subscription lapsed (or, on the OpenAI route, the
        organization lost access to the model) while the flow runs."""
        return cls("not_subscribed", status=403)

    @classmethod
    def model_not_found(cls) -> Fault:
        """404 `model_not_found`, as when a model is retired or the key's project lacks it."""
        return cls("model_not_found", status=404)

    @classmethod
    def insufficient_quota(cls) -> Fault:
        """OpenAI's 429 `insufficient_quota`: credit is used up and retrying will not help."""
        return cls("insufficient_quota", status=429)

    @classmethod
    def moderation_blocked(cls) -> Fault:
        """400 `moderation_blocked`: the safety system refused this prompt; not billed."""
        return cls("moderation_blocked", status=400)

    @classmethod
    def answer_lost(cls, status: int | None = 502) -> Fault:
        """For the Files and Batches APIs (`add_batch_api_fault`): the call is carried out
        (a batch is created), then its answer is lost on the way back: a proxy's HTML page
        with `status`, or, with None, a connection closed without a word."""
        if status is not None and not 500 <= status <= 599:
            raise ValueError(f"answer_lost needs a 5xx status or None, got {status}")
        return cls("answer_lost", status=status)

    @classmethod
    def not_found(cls) -> Fault:
        """For the Files and Batches APIs (`add_batch_api_fault`): 404 for an object the API
        knows, as a proxy routing to the wrong upstream or a lagging replica answers."""
        return cls("not_found", status=404)


@dataclass(frozen=True)
class RecordedCall:
    """One POST to a generation or edit endpoint, as received and as answered.

    `headers` has the key redacted. `path` tells the routes apart, edits from generations; `n`
    is the images asked for (always 1 on RapidAPI's route); `usage` is the token usage of an
    OpenAI-route answer 200. An edit's `body` holds its text fields; its files are recorded as
    hex SHA-256 digests, `inputs` in the order sent and `mask`, so a test can tell which bytes
    were edited; `input_fidelity` is as the API resolved it ("low" unless asked otherwise).
    A refused edit records neither. A request line of a batch is recorded in `batch_calls`,
    never in `calls`, with its batch's `batch_id` and its own `custom_id`, and `path` the
    line's url.
    """

    prompt: str | None
    width: int | None
    height: int | None
    body: dict[str, Any]
    status: int
    fault: str | None
    headers: dict[str, str]
    path: str = ""
    model: str | None = None
    n: int = 1
    usage: dict[str, Any] | None = None
    inputs: list[str] = dataclasses.field(default_factory=list)
    mask: str | None = None
    input_fidelity: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None


@dataclass
class _QueuedFault:
    fault: Fault
    remaining: int
    prompt_contains: str | None

    def matches(self, prompt: str | None) -> bool:
        if self.prompt_contains is None:
            return True
        return prompt is not None and self.prompt_contains in prompt


def _take_queued(queue: list[_QueuedFault], prompt: str | None) -> Fault | None:
    """The fault of the first of `queue` that matches `prompt`, counted down and dropped
    once spent (call with the queue's lock held)."""
    for queued in queue:
        if queued.matches(prompt):
            queued.remaining -= 1
            if queued.remaining == 0:
                queue.remove(queued)
            return queued.fault
    return None


@dataclass(frozen=True)
class _Reply:
    """An answer to send; `stream`, when set, is an open file sent in chunks instead of `body`
    (a batch's output file, which may hold a thousand images) and closed once sent."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    stream: BinaryIO | None = None


@dataclass(frozen=True)
class _Request:
    """The parts of a generation request the emulator looks at."""

    body: dict[str, Any]
    problem: str | None
    prompt: str | None = None
    width: int | None = None
    height: int | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width or 1024, self.height or 1024


def _json(status: int, payload: object, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
    return _Reply(status, json.dumps(payload).encode(), headers=headers)


def _message(status: int, message: str) -> _Reply:
    return _json(status, {"message": message})


def _error(status: int, code: str, message: str) -> _Reply:
    return _json(status, {"error": {"code": code, "message": message}})


def _side(body: dict[str, Any], name: str) -> tuple[int | None, str | None]:
    value = body.get(name)
    if value is None and name not in body:
        return None, None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None, f"'{name}' must be a positive integer."
    if value > MAX_SIDE:
        return None, f"'{name}' must be at most {MAX_SIDE}."
    return value, None


def _parse(raw: bytes) -> _Request:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _Request({}, "Request body must be valid JSON.")
    if not isinstance(body, dict):
        return _Request({}, "Request body must be a JSON object.")
    prompt = body.get("prompt")
    prompt = prompt if isinstance(prompt, str) else None
    width, width_problem = _side(body, "width")
    height, height_problem = _side(body, "height")
    problem = width_problem or height_problem
    if "prompt" not in body:
        problem = "'prompt' is required."
    elif not prompt:
        problem = "'prompt' must be a non-empty string."
    return _Request(body, problem, prompt, width, height)


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


class _Refused(Exception):
    """Raised while reading an OpenAI request that must be answered `reply` instead."""

    def __init__(self, reply: _Reply) -> None:
        super().__init__(reply.status)
        self.reply = reply


def _openai_error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> _Reply:
    error = {"message": message, "type": kind, "param": param, "code": code}
    return _json(status, {"error": error}, headers)


def _invalid(message: str, param: str, code: str = "invalid_value") -> _Refused:
    return _Refused(_openai_error(400, message, param=param, code=code))


def _no_such_model(model: str | None) -> str:
    return f"The model `{model}` does not exist or you do not have access to it."


def _model_not_found(model: str | None) -> _Reply:
    return _openai_error(404, _no_such_model(model), code="model_not_found")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _listed(values: Sequence[str]) -> str:
    quoted = [f"'{value}'" for value in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _string(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        got = _json_type(value)
        message = f"Invalid type for '{name}': expected a string, but got {got} instead."
        raise _invalid(message, name, "invalid_type")
    return value


def _choice(
    body: dict[str, Any], name: str, choices: Sequence[str] | None = None, default: str = "auto"
) -> str:
    choices = _OPENAI_CHOICES[name] if choices is None else choices
    value = _string(body, name, "png" if name == "output_format" else default)
    if value not in choices:
        raise _invalid(f"Invalid value: '{value}'. Supported values are: {_listed(choices)}.", name)
    return value


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


def _parse_openai(
    raw: bytes, models: Mapping[str, Sequence[str] | None], min_pixels: int = FLEXIBLE_MIN_PIXELS
) -> _ImageRequest:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return _ImageRequest({}, _openai_error(400, _BAD_JSON))
    if not isinstance(body, dict):
        got = _json_type(body)
        return _ImageRequest({}, _openai_error(400, f"Expected a JSON object, but got {got}."))
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
    quality, output_format = _choice(body, "quality"), _choice(body, "output_format")
    background = _choice(body, "background")
    _choice(body, "moderation")
    _choice(body, "complexity", default="high")
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


@dataclass(frozen=True)
class _Part:
    """One part of a multipart/form-data body."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def _malformed(why: str) -> _Refused:
    return _Refused(_openai_error(400, f"Could not parse the multipart form body: {why}."))


def _form_parts(raw: bytes, content_type: str) -> list[_Part]:
    """The parts of a multipart/form-data body; raises _Refused for anything else.

    Split by hand rather than with `email`, which would copy a 50 MB upload several times;
    only each part's few header lines go through the standard library's parser.
    """
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/form-data":
        message = f"Invalid Content-Type header ({content_type}), expected multipart/form-data."
        raise _Refused(_openai_error(400, message))
    boundary = header.get_boundary()
    if not boundary:
        raise _malformed("the Content-Type header has no boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    start = 0 if raw.startswith(delimiter[2:]) else raw.find(delimiter)
    if start < 0:
        raise _malformed("no part begins with the boundary")
    position = start + len(delimiter) - (2 if start == 0 else 0)
    parts: list[_Part] = []
    while not raw.startswith(b"--", position):
        if len(parts) == _MAX_PARTS:
            raise _malformed(f"more than {_MAX_PARTS} parts")
        end = raw.find(delimiter, position)
        if end < 0 or not raw.startswith(b"\r\n", position):
            raise _malformed("a part is cut short")
        head_end = raw.find(b"\r\n\r\n", position, min(end, position + _MAX_PART_HEAD))
        if head_end < 0:
            raise _malformed("a part's headers do not end in a blank line")
        headers = email.parser.BytesHeaderParser().parsebytes(raw[position + 2 : head_end])
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str) or not name:
            raise _malformed("a part has no Content-Disposition name")
        filename = headers.get_filename()
        media_type = headers.get_content_type() if "content-type" in headers else None
        parts.append(_Part(name, filename, media_type, raw[head_end + 4 : end]))
        position = end + len(delimiter)
    return parts


def _form_value(part: _Part) -> object:
    """A text field as the JSON value it stands for, so that generations' checks apply;
    a file where text belongs becomes an object, which they refuse."""
    if part.filename is not None:
        return {"filename": part.filename, "bytes": len(part.data)}
    if len(part.data) > _MAX_FIELD:
        message = f"Invalid '{part.name}': a form field may hold at most {_MAX_FIELD} bytes."
        raise _invalid(message, part.name, "string_above_max_length")
    try:
        text = part.data.decode()
    except UnicodeDecodeError:
        raise _invalid(f"Invalid '{part.name}': not UTF-8 text.", part.name) from None
    if part.name in _OPENAI_RANGES and _FORM_INTEGER.fullmatch(text):
        return int(text)
    if part.name == "stream" and text in ("true", "false"):
        return text == "true"
    return text


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
        body = {part.name: _form_value(part) for part in parts if not _is_file_field(part)}
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


def _duration(seconds: float) -> str:
    """`seconds` the way OpenAI's reset headers write it: `120ms`, `1s`, `2.5s`, `6m0s`."""
    millis = max(1, round(seconds * 1000)) if seconds > 0 else 0
    if millis < 1000:
        return f"{millis}ms" if millis else "0s"
    minutes, millis = divmod(millis, 60_000)
    hours, minutes = divmod(minutes, 60)
    rest = f"{millis / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{rest}"
    return f"{minutes}m{rest}" if minutes else rest


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


def _payload(shape: str, url: str, data: bytes | None) -> dict[str, Any]:
    if shape == "url":
        return {"url": url}
    if shape == "images_objects":
        return {"images": [{"url": url}]}
    if shape == "images_strings":
        return {"images": [url]}
    if shape == "output":
        return {"output": [url]}
    if shape == "data_b64" and data is not None:
        return {"data": [{"b64_json": base64.b64encode(data).decode()}]}
    if shape in ("data_url", "data_b64"):
        return {"data": [{"url": url}]}
    return {"status": "succeeded", "result": {"images": [{"url": url}]}}


def _s3_error(status: int, path: str) -> _Reply:
    code, text = (
        ("NoSuchKey", "The specified key does not exist.")
        if status == 404
        else ("AccessDenied", "Request has expired")
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{text}</Message>"
        f"<Key>{path.lstrip('/')}</Key><RequestId>{secrets.token_hex(8).upper()}</RequestId></Error>"
    )
    return _Reply(status, xml.encode(), "application/xml")


def _server_error(status: int) -> _Reply:
    if status == 500:
        return _error(500, "server_error", "The server had an error while processing your request.")
    return _gateway_page(status)


_DROPPED = _Reply(0, b"")
"""Not an answer: the connection is closed without one."""


def _gateway_page(status: int) -> _Reply:
    """The HTML error page of the nginx in front of the API."""
    try:
        title = f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        title = f"{status} Error"
    html = (
        f"<html><head><title>{title}</title></head>"
        f"<body><center><h1>{title}</h1></center></body></html>"
    )
    return _Reply(status, html.encode(), "text/html")


def _rate_limited(fault: Fault) -> _Reply:
    headers = [("x-ratelimit-requests-limit", "100"), ("x-ratelimit-requests-remaining", "0")]
    if fault.retry_after is not None:
        headers.append(("Retry-After", str(math.ceil(fault.retry_after))))
    if fault.reset is not None:
        headers.append(("x-ratelimit-requests-reset", str(math.ceil(fault.reset))))
    return _json(429, {"message": _TOO_MANY}, tuple(headers))


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


@dataclass
class _Bucket:
    """A token bucket for `rate` requests per second, holding one second of burst."""

    rate: float
    tokens: float
    stamp: float

    @classmethod
    def full(cls, rate: float) -> _Bucket:
        return cls(rate, max(1.0, rate), time.monotonic())

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate)

    def take(self) -> bool:
        """Refill for the time elapsed, then spend a token if there is a whole one."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def headers(self) -> tuple[tuple[str, str], ...]:
        """Burst size, whole tokens left and seconds until the bucket is full again."""
        return (
            ("x-ratelimit-limit", str(math.floor(self.capacity))),
            ("x-ratelimit-remaining", str(math.floor(self.tokens))),
            ("x-ratelimit-reset", str(math.ceil((self.capacity - self.tokens) / self.rate))),
        )

    def openai_headers(self) -> tuple[tuple[str, str], ...]:
        """The same three figures under OpenAI's names, the reset as a duration."""
        refill = (self.capacity - self.tokens) / self.rate
        return (
            ("x-ratelimit-limit-requests", str(math.floor(self.capacity))),
            ("x-ratelimit-remaining-requests", str(math.floor(self.tokens))),
            ("x-ratelimit-reset-requests", _duration(refill)),
        )

    def retry_after(self) -> int:
        """Whole seconds until the next token, at least one, as a gateway's Retry-After."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))


class GptImageEmulator:
    """Serves the GPT Image generation API on loopback, with call records and fault injection.

    Two protocols share the server. A POST to `path` is NexaAPI's on RapidAPI (keys in
    `x-rapidapi-key` and `x-rapidapi-host`; `shape` and `image_format` shape its answers). A
    POST to any other path ending in `/images/generations` is OpenAI's Images API (key as
    `Authorization: Bearer` or Azure's `api-key`; images inline as `b64_json`; token usage
    and an `x-request-id` in every answer), so
    `openai.OpenAI(base_url=emulator.base_url + "/v1", api_key=...)` works against it. A POST
    to a path ending in `/images/edits` is its edits endpoint: a multipart form with 1 to 16
    PNG, JPEG or WebP files as `image` (or repeated `image[]`), each under 50 MB, and an
    optional PNG `mask` under 4 MB with an alpha channel and the first image's size; the
    other fields are generations', plus `input_fidelity`. It is answered, refused, faulted,
    rate limited and billed as a generation is, its images drawn alike, at the first image's
    size (within the model's sizes) for "auto", and its usage counts image input tokens.
    `models` maps each model that route serves to its fixed sizes, or None for flexible sizes
    (see `OPENAI_MODELS`); it is a plain dict attribute, so a test can retire a model mid-run
    with `emulator.models.pop(name)`, and `reset()` leaves it as it is. Models named
    gpt-image-2.5-* and gpt-image-2.6-* also take the qualities `xhigh` and `max`, and
    gpt-image-2.6-* takes `complexity`; others refuse them. A flexible size needs at least
    `min_pixels` pixels (655,360, as the API asks of gpt-image-2 and later; a suite that draws
    small images for speed may lower it).

    `latency` is the seconds a generation takes: its answer comes that long after the call,
    the time the emulator spends drawing the images included. `rate_limit` (requests per
    second, or None) is enforced on both routes like RapidAPI's gateway: a 429 with
    Retry-After once the burst of one second is spent, with each protocol's own body and
    `x-ratelimit-*` headers (OpenAI's reset as a duration such as `200ms`). `image_bytes`
    pads each PNG to at least that size. `keep_images=False` keeps only hashes of served
    images and drops each image once downloaded, so a long benchmark runs in bounded memory.

    The same prefixes serve OpenAI's Files and Batch APIs (see `_batch_api`), so that
    `client.files` and `client.batches` work too. `POST .../files` uploads a file (a batch's
    requests as JSONL with `purpose="batch"`, at most `batch_max_file_bytes`), which
    `GET .../files/{id}`, `GET .../files/{id}/content` and `DELETE .../files/{id}` describe,
    download and delete; contents are kept on disk, in a directory removed by `stop()`.
    `POST .../batches` runs a file against `/v1/images/generations` or `/v1/images/edits`
    (JSON bodies, images as data URLs or file ids); `GET .../batches[/{id}]` lists or polls
    batches and `POST .../batches/{id}/cancel` cancels one. A batch checks its file (at most
    `batch_max_requests` lines) and moves from `validating` through `in_progress` and
    `finalizing` to `completed` over about `batch_processing_seconds`, answering each line as
    a synchronous call to its endpoint would be answered (refusals, queued faults, images and
    usage alike, but no rate limit or latency), into an output file and an error file. With
    `batch_expire_after` set, a batch expires once that many requests are processed;
    `add_batch_output_fault` writes some of its answer lines wrong. Lines are recorded in
    `batch_calls`, never in `calls`; `batches` lists every batch as the API describes it. A
    batch belongs to the project its creator named (`OpenAI-Project`), and other projects'
    calls get 404 for it. `add_batch_api_fault` makes a Files or Batches call misbehave as a
    real path does: carried out with its answer lost, or a 404 for what exists.

    `gateway` words every OpenAI-protocol error (synchronous answers, the Files and Batches
    APIs, and a batch's error lines) as a gateway in front of the API would: "litellm" sets
    `code` to the status and `type` to its own, prefixes the message, and answers a model
    it does not host with 400 "Invalid model name passed in model=..."; "azure" answers as
    Azure OpenAI (`contentFilter` with an `inner_error`, `DeploymentNotFound`, the status as
    the code of a rate limit or a wrong key); see `_gateways`. `echo_keys` quotes a rejected
    key whole in the 401's message, as some gateways do. Both are plain attributes.

    Besides the API, the server answers `GET /__emulator__/stats` (the counters as JSON) and
    `POST /__emulator__/reset` (calls `reset()`) without a key: they are test controls on
    loopback, for a benchmark that runs the emulator as its own process.
    """

    def __init__(
        self,
        api_key: str = "test-key",
        api_host: str = "gpt-image-1-5.p.rapidapi.com",
        path: str = "/generate",
        host: str = "127.0.0.1",
        port: int = 0,
        shape: str = "url",
        image_format: str = "png",
        latency: float = 0.0,
        reject_marker: str | None = "[reject]",
        subscribed: bool = True,
        rate_limit: float | None = None,
        rate_limit_headers: bool = True,
        image_bytes: int | None = None,
        keep_images: bool = True,
        models: Mapping[str, Sequence[str] | None] = OPENAI_MODELS,
        min_pixels: int = FLEXIBLE_MIN_PIXELS,
        batch_processing_seconds: float = 1.0,
        batch_max_requests: int = 50_000,
        batch_max_file_bytes: int = 200 * 1024**2,
        gateway: str | None = None,
        echo_keys: bool = False,
    ) -> None:
        if shape not in (*RESPONSE_SHAPES, "cycle"):
            raise ValueError(f"unknown shape {shape!r}; use one of {RESPONSE_SHAPES} or 'cycle'")
        if gateway is not None and gateway not in GATEWAYS:
            raise ValueError(f"unknown gateway {gateway!r}; use one of {GATEWAYS} or None")
        if image_format not in _FORMATS:
            raise ValueError(f"unknown image_format {image_format!r}; use png, jpeg or webp")
        if image_bytes is not None:
            if isinstance(image_bytes, bool) or not isinstance(image_bytes, int) or image_bytes < 1:
                raise ValueError(f"image_bytes must be a positive integer, got {image_bytes!r}")
            if image_format != "png":
                raise ValueError("image_bytes pads PNG images only; use image_format='png'")
        for name, limit in (
            ("batch_max_requests", batch_max_requests),
            ("batch_max_file_bytes", batch_max_file_bytes),
        ):
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise ValueError(f"{name} must be a positive integer, got {limit!r}")
        for model, sizes in models.items():
            for size in sizes or ():
                dimensions = _dimensions(size)
                if dimensions is None or max(dimensions) > MAX_SIDE or min(dimensions) < 1:
                    raise ValueError(
                        f"model {model!r} lists size {size!r}; use 'WIDTHxHEIGHT' with sides "
                        f"from 1 to {MAX_SIDE}"
                    )
        self.api_key = api_key
        self.api_host = api_host
        self.path = path
        self.host = host
        self.port = port
        self.shape = shape
        self.image_format = image_format
        self.latency = latency
        self.reject_marker = reject_marker
        self.subscribed = subscribed
        self.rate_limit_headers = rate_limit_headers
        self.image_bytes = image_bytes
        self.keep_images = keep_images
        self.gateway = gateway
        self.echo_keys = echo_keys
        self.models: dict[str, Sequence[str] | None] = {
            model: None if sizes is None else tuple(sizes) for model, sizes in models.items()
        }
        self.min_pixels = min_pixels
        self.fault_rate = 0.0
        self.random_faults: tuple[Fault, ...] = ()
        self._lock = threading.Lock()
        self._bucket: _Bucket | None = None
        self.rate_limit = rate_limit
        # never reset, and seeded at random so images also differ across emulator instances
        self._generations = itertools.count(secrets.randbits(32) << 32)
        self._arrivals = itertools.count()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._origin = ""
        self._epoch = 0
        self._in_flight = 0
        self.batch_processing_seconds = batch_processing_seconds
        self.batch_expire_after = None
        self.batch_max_requests = batch_max_requests
        self.batch_max_file_bytes = batch_max_file_bytes
        # imported here: the module builds on this one's helpers
        from prefect_gpt_image.testing._batch_api import BatchApi

        self._batch_api: BatchApi = BatchApi(self)
        self._clear()

    def _clear(self) -> None:
        self._epoch += 1  # calls still in flight across a reset are not recorded
        self._calls: list[tuple[int, RecordedCall]] = []
        self._batch_calls: list[RecordedCall] = []
        self._faults: list[_QueuedFault] = []
        self._blobs: dict[str, _Reply] = {}
        self._once: set[str] = set()  # blobs to drop once downloaded, when not keep_images
        self._served: dict[str, bytes] = {}
        self._downloads = 0
        self._download_delays: dict[str, float] = {}
        self._peak = 0
        self._cycle = 0
        self._rng = random.Random(0)
        self.fault_rate = 0.0
        self.random_faults = ()
        if self._bucket is not None:
            self._bucket = _Bucket.full(self._bucket.rate)

    # -- configuration -----------------------------------------------------------------------

    @property
    def rate_limit(self) -> float | None:
        """Requests per second the endpoint admits, or None for no limit.

        A token bucket of `max(1, rate_limit)` tokens, refilled continuously; setting it (or
        `reset()`) fills the bucket. Only calls past the key and host checks spend a token.
        """
        return self._bucket.rate if self._bucket is not None else None

    @rate_limit.setter
    def rate_limit(self, value: float | None) -> None:
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"rate_limit must be a positive number of requests/s, got {value}")
        with self._lock:
            self._bucket = _Bucket.full(value) if value is not None else None

    @property
    def batch_processing_seconds(self) -> float:
        """About how long a batch takes, from `validating` to `completed`, when drawing its
        images takes less: a tenth validating, most of it spread over its requests, a tenth
        finalizing. Read when a batch is created, so setting it affects new batches only;
        0 runs them as fast as the images are drawn."""
        return self._batch_seconds

    @batch_processing_seconds.setter
    def batch_processing_seconds(self, value: float) -> None:
        if isinstance(value, bool) or not (0 <= value < math.inf):
            raise ValueError(f"batch_processing_seconds must be a number >= 0, got {value!r}")
        self._batch_seconds = float(value)

    @property
    def batch_expire_after(self) -> int | None:
        """None, or the requests a new batch processes before it expires, as a batch does
        when its 24 hours run out: the rest go to its error file as `batch_expired`."""
        return self._batch_expire_after

    @batch_expire_after.setter
    def batch_expire_after(self, value: int | None) -> None:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"batch_expire_after must be None or an integer >= 0, got {value!r}")
        self._batch_expire_after = value

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> GptImageEmulator:
        """Bind the socket and serve from a daemon thread; returns self for chaining."""
        if self._server is not None:
            return self
        self._server = _Server((self.host, self.port), self)
        self._origin = f"http://{self.host}:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"gpt-image-emulator:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections, stop batches and delete the files uploaded
        or written; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._batch_api.clear()

    def __enter__(self) -> GptImageEmulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """`http://host:port` of the running server."""
        if self._server is None:
            raise RuntimeError("the emulator is not running; call start() first")
        return self._origin

    @property
    def url(self) -> str:
        """Full URL of the RapidAPI-protocol generation endpoint."""
        return self.base_url + self.path

    @property
    def openai_base_url(self) -> str:
        """The `base_url` to give an `openai.OpenAI` client: `http://host:port/v1`."""
        return self.base_url + "/v1"

    # -- records -----------------------------------------------------------------------------

    @property
    def calls(self) -> list[RecordedCall]:
        """Answered POSTs to the endpoint, in arrival order."""
        with self._lock:
            return [call for _, call in self._calls]

    @property
    def billed(self) -> int:
        """Calls the real API would charge for: those answered 200."""
        return sum(call.status == 200 for call in self.calls)

    @property
    def billed_images(self) -> int:
        """Images the real API would charge for: `n` per call answered 200, none for a
        `no_image` answer (its model produced nothing)."""
        return sum(call.n for call in self.calls if call.status == 200 and call.fault != "no_image")

    def calls_for(self, prompt: str) -> list[RecordedCall]:
        """Calls whose prompt equals `prompt`."""
        return [call for call in self.calls if call.prompt == prompt]

    def billed_for(self, prompt: str) -> int:
        """Billed calls whose prompt equals `prompt`."""
        return sum(call.status == 200 for call in self.calls_for(prompt))

    @property
    def served(self) -> dict[str, bytes]:
        """Every valid image generated, by sha256 hex digest of its bytes.

        With `keep_images=False` each hash maps to `b""`: the bytes are not kept.
        """
        with self._lock:
            return dict(self._served)

    @property
    def peak_concurrency(self) -> int:
        """The most generation requests (both routes) being handled at once since the last
        reset."""
        with self._lock:
            return self._peak

    @property
    def image_downloads(self) -> int:
        """GET requests under /images/, found or not."""
        with self._lock:
            return self._downloads

    @property
    def rate_limited(self) -> int:
        """Calls refused with 429 by `rate_limit` since the last reset (not injected faults)."""
        return sum(call.fault == "rate_limit" for call in self.calls)

    @property
    def batch_calls(self) -> list[RecordedCall]:
        """Request lines that batches processed, in the order processed; `calls` has none."""
        with self._lock:
            return list(self._batch_calls)

    @property
    def batches(self) -> list[dict[str, Any]]:
        """Every batch created since the last reset, oldest first, as `GET .../batches/{id}`
        describes it now."""
        return self._batch_api.batches()

    @property
    def stats(self) -> dict[str, int]:
        """The counters `GET /__emulator__/stats` reports."""
        return {
            "calls": len(self.calls),
            "billed": self.billed,
            "rate_limited": self.rate_limited,
            "peak_concurrency": self.peak_concurrency,
            "image_downloads": self.image_downloads,
            "batch_requests": len(self.batch_calls),
            "batches_created": len(self.batches),
        }

    def reset(self) -> None:
        """Forget calls, images, faults, batches and files between tests and refill the rate
        limit's bucket; configuration such as `rate_limit`, `latency`, `models` (a retired
        model stays retired) and the `batch_*` settings, and image uniqueness, are kept."""
        self._batch_api.clear()  # first: batches take the lock to draw and record
        with self._lock:
            self._clear()

    # -- faults ------------------------------------------------------------------------------

    def add_fault(
        self, fault: Fault, *, times: int = 1, prompt_contains: str | None = None
    ) -> None:
        """Inject `fault` into the next `times` POSTs whose prompt contains `prompt_contains`."""
        if times < 1:
            raise ValueError("times must be at least 1")
        with self._lock:
            self._faults.append(_QueuedFault(fault, times, prompt_contains))

    def add_batch_api_fault(self, operation: str, fault: Fault, *, times: int = 1) -> None:
        """Inject `fault` into the next `times` calls of a Files or Batches `operation`:
        "upload", "create", "list", "retrieve", "cancel" or "content". `Fault.answer_lost`
        carries the call out and loses its answer, `Fault.not_found` answers 404 for what
        exists, and `Fault.server_error` refuses the call without carrying it out."""
        self._batch_api.add_fault(operation, fault, times)

    def seed_faults(self, rate: float, faults: Sequence[Fault], seed: int = 0) -> None:
        """Inject a random one of `faults` into a `rate` share of POSTs, reproducibly."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        if rate > 0 and not faults:
            raise ValueError("a positive rate needs at least one fault")
        with self._lock:
            self.fault_rate = rate
            self.random_faults = tuple(faults)
            self._rng = random.Random(seed)

    def add_batch_output_fault(
        self,
        kind: str,
        *,
        prompt_contains: str | None = None,
        custom_id: str | None = None,
        times: int = 1,
    ) -> None:
        """Write a batch's answer lines wrong for the next `times` requests whose prompt
        contains `prompt_contains`; the requests are answered (and billed) all the same.
        `kind` is "not_json" (an HTML error page instead of the line), "truncated" (the line
        cut in half), "no_custom_id" (the line without its `custom_id`) or "stray" (the
        line, then a copy of it carrying `custom_id`, another request's)."""
        if kind not in BATCH_OUTPUT_FAULTS:
            raise ValueError(f"unknown output fault {kind!r}; use one of {BATCH_OUTPUT_FAULTS}")
        if (kind == "stray") != (custom_id is not None):
            raise ValueError("a stray line, and only a stray line, needs the custom_id it carries")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"times must be a positive integer, got {times!r}")
        fault = Fault(kind, message=custom_id)
        self._batch_api.add_output_fault(_QueuedFault(fault, times, prompt_contains))

    def _take_fault(self, prompt: str | None) -> Fault | None:
        with self._lock:
            if (fault := _take_queued(self._faults, prompt)) is not None:
                return fault
            if self.random_faults and self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.random_faults)
        return None

    # -- request handling --------------------------------------------------------------------

    def _handle_post(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        """Route a POST: RapidAPI's protocol at `self.path`, OpenAI's at any other path ending
        in `/images/generations` or `/images/edits`, then Files and Batches, 404 elsewhere."""
        if path == self.path:
            answer = self._answer_generate
        elif path.endswith((_GENERATIONS_SUFFIX, _EDITS_SUFFIX)):
            answer = self._answer_openai
        else:
            return self._handle_api("POST", path, headers, raw)
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            return answer(path, raw, headers)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer_generate(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        with self._lock:
            arrival, epoch = next(self._arrivals), self._epoch
        request = _parse(raw)
        kind = None
        reply = self._gatekeep(headers)
        if reply is None:
            refusal, limit_headers = self._take_token(openai=False)
            fault = self._take_fault(request.prompt) if refusal is None else None
            if refusal is not None:
                kind, reply = "rate_limit", refusal
            elif fault is not None:
                kind, reply = fault.kind, self._fault_reply(fault, request)
            else:
                reply = self._generate(request)
            reply = _with_headers(reply, limit_headers)
        model = request.body.get("model")
        call = RecordedCall(
            request.prompt,
            request.width,
            request.height,
            request.body,
            reply.status,
            kind,
            _redacted(headers),
            path,
            model if isinstance(model, str) else None,
        )
        self._record(arrival, epoch, call)
        return reply

    def _answer_openai(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        """A generation or an edit: they differ in how the request is read, and in nothing
        else (keys, faults, rate limits, images, records)."""
        with self._lock:
            arrival, epoch = next(self._arrivals), self._epoch
        if path.endswith(_EDITS_SUFFIX):
            content_type = headers.get("content-type", "")
            request = _parse_edit(raw, content_type, self.models, self.min_pixels)
        else:
            request = _parse_openai(raw, self.models, self.min_pixels)
        kind = None
        reply = self._openai_gatekeep(headers)
        if reply is None:
            refusal, limit_headers = self._take_token(openai=True, model=request.model)
            if refusal is not None:
                kind, reply = "rate_limit", refusal
            else:
                kind, reply = self._respond_openai(request)
            reply = _with_headers(reply, limit_headers)
        reply = _with_headers(self._through_gateway(reply), (("x-request-id", _request_id()),))
        self._record(arrival, epoch, self._openai_call(path, request, reply.status, kind, headers))
        return reply

    def _through_gateway(self, reply: _Reply) -> _Reply:
        """`reply` as `gateway` words it: an OpenAI-protocol error rewritten in its shape."""
        if self.gateway is None or reply.status < 400 or reply.stream is not None:
            return reply
        try:
            payload = json.loads(reply.body)
        except (ValueError, UnicodeDecodeError):
            return reply  # a page, not an error in OpenAI's shape
        status, payload = as_gateway(self.gateway, reply.status, payload)
        return dataclasses.replace(reply, status=status, body=json.dumps(payload).encode())

    def _respond_openai(
        self, request: _ImageRequest, latency: float | None = None
    ) -> tuple[str | None, _Reply]:
        """The answer to an admitted OpenAI-protocol request, and the kind of fault injected
        into it, if any; `latency` overrides `self.latency` (a batch's requests have none)."""
        fault = self._take_fault(request.prompt)
        if fault is not None:
            return fault.kind, self._openai_fault_reply(fault, request, latency)
        return None, self._generate_openai(request, latency)

    def _openai_call(
        self,
        path: str,
        request: _ImageRequest,
        status: int,
        kind: str | None,
        headers: Mapping[str, str],
    ) -> RecordedCall:
        """The record of `request` answered `status`, billed (with usage) when 200."""
        images = 0 if kind == "no_image" else request.n
        return RecordedCall(
            request.prompt,
            request.width,
            request.height,
            request.body,
            status,
            kind,
            _redacted(headers),
            path,
            request.model,
            request.n,
            request.usage(images) if status == 200 else None,
            [upload.sha256 for upload in request.uploads],
            request.mask,
            request.input_fidelity,
        )

    def _record(self, arrival: int, epoch: int, call: RecordedCall) -> None:
        with self._lock:
            if epoch == self._epoch:
                bisect.insort(self._calls, (arrival, call), key=lambda item: item[0])

    def _record_batch(self, epoch: int, call: RecordedCall) -> None:
        """Record a batch's request line, unless the emulator was reset since `epoch`."""
        with self._lock:
            if epoch == self._epoch:
                self._batch_calls.append(call)

    def _handle_api(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes = b"", query: str = ""
    ) -> _Reply:
        """A request to the Files or Batches API (see `_batch_api`), or 404 for any other path."""
        reply = self._batch_api.handle(method, path, headers, raw, query)
        return reply if reply is not None else _not_found(path)

    def _gatekeep(self, headers: Mapping[str, str]) -> _Reply | None:
        key = headers.get("x-rapidapi-key")
        if not key:
            return _message(401, _MISSING_KEY)
        if key != self.api_key:
            return _message(401, _INVALID_KEY)
        if not self.subscribed:
            return _message(403, _NOT_SUBSCRIBED)
        if headers.get("x-rapidapi-host") != self.api_host:
            return _message(404, "API doesn't exists")
        return None

    def _openai_gatekeep(self, headers: Mapping[str, str]) -> _Reply | None:
        """Every key presented (Bearer, or Azure's api-key header) must be the right one."""
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        keys = [key for key in (bearer, headers.get("api-key", "")) if key]
        if not keys:
            return _openai_error(401, _NO_KEY, code="invalid_api_key")
        wrong = [key for key in keys if key != self.api_key]
        if wrong:
            shown = _incorrect_key(wrong[0], whole=self.echo_keys)
            return _openai_error(401, shown, code="invalid_api_key")
        if not self.subscribed:
            return _openai_error(403, _NOT_VERIFIED)
        return None

    def _take_token(
        self, *, openai: bool, model: str | None = None
    ) -> tuple[_Reply | None, tuple[tuple[str, str], ...]]:
        """None if the rate limit admits this call, else the 429 to answer in the route's
        protocol; and the headers to add to the answer."""
        with self._lock:
            bucket = self._bucket
            if bucket is None:
                return None, ()
            admitted = bucket.take()
            headers: tuple[tuple[str, str], ...] = ()
            if self.rate_limit_headers:
                headers = bucket.openai_headers() if openai else bucket.headers()
            if admitted:
                return None, headers
            wait, limit = bucket.retry_after(), math.floor(bucket.capacity)
        if not openai:
            return _message(429, _TOO_MANY), (*headers, ("Retry-After", str(wait)))
        message = (
            f"Rate limit reached for {model or 'images'} on requests per second: Limit {limit}. "
            f"Please try again in {wait}s. Visit https://platform.openai.com/account/rate-limits "
            "to learn more."
        )
        refusal = _openai_error(429, message, kind="requests", code="rate_limit_exceeded")
        return refusal, (*headers, ("retry-after", str(wait)))

    def _generate(self, request: _Request, first_download_delay: float = 0.0) -> _Reply:
        if request.problem is not None:
            return _error(400, "invalid_request", request.problem)
        prompt = request.prompt or ""
        if self.reject_marker is not None and self.reject_marker in prompt:
            return _error(400, "content_policy_violation", _SAFETY)
        started = time.monotonic()
        data = self._draw(prompt, *request.size, self.image_format)
        blob = _Reply(200, data, self._media_type)
        path = self._new_path(self._extension)
        if first_download_delay > 0:
            with self._lock:
                self._download_delays[path] = first_download_delay
        # The generation takes `latency` in all, drawing included, as the API's does.
        if (left := started + self.latency - time.monotonic()) > 0:
            time.sleep(left)
        return self._link(path, blob, inline=data, advance=True, once=not self.keep_images)

    def _generate_openai(self, request: _ImageRequest, latency: float | None = None) -> _Reply:
        if request.refusal is not None:
            return request.refusal
        prompt = request.prompt or ""
        if self.reject_marker is not None and self.reject_marker in prompt:
            return _moderation_blocked()
        started = time.monotonic()
        transparent = request.background == "transparent"
        images = [
            self._draw(
                prompt,
                *request.size,
                request.output_format,
                transparent=transparent,
                kept=request.kept,
            )
            for _ in range(request.n)
        ]
        latency = self.latency if latency is None else latency
        if (left := started + latency - time.monotonic()) > 0:
            time.sleep(left)
        return _json(200, request.answer([{"b64_json": _b64(data)} for data in images]))

    def _draw(
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
        data = self._image(prompt, width, height, image_format, transparent=transparent)
        if kept is not None:
            data = _keep_unmasked(data, *kept, image_format)
        with self._lock:
            self._served[hashlib.sha256(data).hexdigest()] = data if self.keep_images else b""
        return data

    def _image(
        self, prompt: str, width: int, height: int, image_format: str, *, transparent: bool = False
    ) -> bytes:
        serial = self._serial()
        data = _render(prompt, serial, width, height, image_format, transparent=transparent)
        if self.image_bytes is not None and image_format == "png":
            data = _pad_png(data, self.image_bytes)
        return data

    def _fault_reply(self, fault: Fault, request: _Request) -> _Reply:
        if fault.kind == "stall":
            time.sleep(fault.seconds or 0.0)
            return self._generate(request)
        if fault.kind == "slow_download":
            return self._generate(request, first_download_delay=fault.seconds or 0.0)
        if fault.kind == "rate_limited":
            return _rate_limited(fault)
        if fault.kind in ("quota_exceeded", "insufficient_quota"):
            return _message(429, _QUOTA)
        if fault.kind == "server_error":
            return _server_error(fault.status or 503)
        if fault.kind == "bad_request":
            return _error(400, "invalid_request", fault.message or "Invalid request.")
        if fault.kind == "unauthorized":
            return _message(401, _INVALID_KEY)
        if fault.kind == "not_subscribed":
            return _message(403, _NOT_SUBSCRIBED)
        if fault.kind == "model_not_found":
            model = request.body.get("model")
            message = _no_such_model(model if isinstance(model, str) else "gpt-image-1.5")
            return _error(404, "model_not_found", message)
        if fault.kind == "moderation_blocked":
            return _error(400, "content_policy_violation", _SAFETY)
        if fault.kind == "malformed_body":
            return _Reply(200, b'{"url": "http://')
        if fault.kind == "no_image":
            return _json(200, {"status": "succeeded", "result": {}})
        if fault.kind == "redirected_url":
            path = self._new_path(self._extension)
            return self._link(path, _redirect(fault), inline=None)
        if fault.kind == "expired_url":
            path = self._new_path(self._extension)
            return self._link(path, _s3_error(fault.status or 404, path), inline=None)
        if fault.kind == "not_an_image":
            data = _NOT_AN_IMAGE
        elif fault.kind == "truncated_image":
            png = self._image(request.prompt or "", *request.size, "png")
            data = png[: len(png) // 2]
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        return self._link(self._new_path("png"), _Reply(200, data, "image/png"), inline=data)

    def _openai_fault_reply(
        self, fault: Fault, request: _ImageRequest, latency: float | None = None
    ) -> _Reply:
        """`fault` in OpenAI's words; images travel inline, so URL faults become links or
        broken inline images, and a slow download a slow answer."""
        kind = fault.kind
        if kind in ("stall", "slow_download"):
            time.sleep(fault.seconds or 0.0)
            return self._generate_openai(request, latency)
        if kind == "rate_limited":
            return _openai_rate_limited(fault, request.model)
        if kind in ("quota_exceeded", "insufficient_quota"):
            return _openai_error(
                429, _OPENAI_QUOTA, kind="insufficient_quota", code="insufficient_quota"
            )
        if kind == "server_error":
            status = fault.status or 503
            if status != 500:
                return _server_error(status)
            message = "The server had an error while processing your request. Sorry about that!"
            return _openai_error(500, message, kind="server_error", code="server_error")
        if kind == "bad_request":
            return _openai_error(400, fault.message or "Invalid request.")
        if kind == "unauthorized":
            return _openai_error(401, _incorrect_key(None), code="invalid_api_key")
        if kind == "not_subscribed":
            return _openai_error(403, _NOT_VERIFIED)
        if kind == "model_not_found":
            return _model_not_found(request.model)
        if kind == "moderation_blocked":
            return _moderation_blocked()
        if kind == "malformed_body":
            return _Reply(200, b'{"created": %d, "data": [{"b64_json": "iVBORw0K' % time.time())
        if kind == "no_image":
            return _json(200, request.answer([]))
        extension = _FORMATS[request.output_format][1]
        if kind in ("expired_url", "redirected_url"):
            links = []
            for _ in range(request.n):
                path = self._new_path(extension)
                blob = (
                    _redirect(fault)
                    if kind == "redirected_url"
                    else _s3_error(fault.status or 404, path)
                )
                with self._lock:
                    self._blobs[path] = blob
                links.append({"url": self._origin + path})
            return _json(200, request.answer(links))
        if kind == "not_an_image":
            data = _NOT_AN_IMAGE
        elif kind == "truncated_image":
            image = self._image(request.prompt or "", *request.size, request.output_format)
            data = image[: len(image) // 2]
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        return _json(200, request.answer([{"b64_json": _b64(data)}] * request.n))

    def _new_path(self, extension: str) -> str:
        return f"/images/{secrets.token_urlsafe(16)}.{extension}"

    def _link(
        self,
        path: str,
        blob: _Reply,
        *,
        inline: bytes | None,
        advance: bool = False,
        once: bool = False,
    ) -> _Reply:
        """Answer 200 pointing at `blob`, or carrying `inline` when the shape is data_b64.

        A blob stored `once` is dropped after its first complete, undelayed download.
        """
        with self._lock:
            shape = self._shape(advance=advance)
            if shape != "data_b64" or inline is None:
                self._blobs[path] = blob
                if once:
                    self._once.add(path)
        return _json(200, _payload(shape, f"{self._origin}{path}", inline))

    def _handle_image(self, path: str) -> tuple[_Reply, bool]:
        """The answer to a GET of `path`, and whether to forget the image once it is sent.

        A delayed (slow_download) attempt never drops the image: the client that gave up on
        it must still be able to download it again, as when images are kept.
        """
        with self._lock:
            self._downloads += 1
            blob = self._blobs.get(path)
            delay = self._download_delays.pop(path, 0.0)
            last = blob is not None and delay == 0 and path in self._once
        time.sleep(delay)
        return blob or _s3_error(404, path), last

    def _forget(self, path: str) -> None:
        """Drop an image its client has downloaded in full (keep_images=False)."""
        with self._lock:
            self._blobs.pop(path, None)
            self._once.discard(path)

    def _control(self, method: str, path: str) -> _Reply | None:
        """The answer to a test-control request, or None if `path` is not one."""
        if (method, path) == ("GET", _STATS_PATH):
            return _json(200, self.stats)
        if (method, path) == ("POST", _RESET_PATH):
            self.reset()
            return _json(200, {})
        return None

    def _shape(self, *, advance: bool) -> str:
        if self.shape != "cycle":
            return self.shape
        shape = RESPONSE_SHAPES[self._cycle % len(RESPONSE_SHAPES)]
        if advance:
            self._cycle += 1
        return shape

    def _serial(self) -> int:
        with self._lock:
            return next(self._generations)

    @property
    def _extension(self) -> str:
        return _FORMATS[self.image_format][1]

    @property
    def _media_type(self) -> str:
        return _FORMATS[self.image_format][2]


class _Handler(BaseHTTPRequestHandler):
    """Moves bytes between the socket and the emulator; all decisions live in the emulator."""

    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes: with Nagle's algorithm on, the second waits for
    # the client's delayed ACK, and every answer comes 40 ms late.
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return "RapidAPI-1.2.8"

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, add=True)

    def finish(self) -> None:
        self.server.track(self.connection, add=False)
        super().finish()

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:  # the client hung up, e.g. after timing out on a stall
            self.close_connection = True

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            while length > 0:  # read and drop it, so the client gets to read the answer
                chunk = self.rfile.read(min(length, 1024**2))
                if not chunk:
                    break
                length -= len(chunk)
            self._send(_gateway_page(413))
            return
        raw = self.rfile.read(length)
        path = urlsplit(self.path).path
        emulator = self.server.emulator
        control = emulator._control("POST", path)
        if control is not None:
            self._send(control)
        else:
            self._send(emulator._handle_post(path, raw, self._headers()))

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = url.path
        emulator = self.server.emulator
        control = emulator._control("GET", path)
        if control is not None:
            self._send(control)
        elif path.startswith("/images/"):
            reply, last = emulator._handle_image(path)
            self._send(reply)  # raises OSError if the client hung up: the image is kept
            if last:
                emulator._forget(path)
        else:
            self._send(emulator._handle_api("GET", path, self._headers(), query=url.query))

    def do_DELETE(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        self._send(self.server.emulator._handle_api("DELETE", path, self._headers()))

    def _headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self.headers.items()}

    def _send(self, reply: _Reply) -> None:
        if reply is _DROPPED:  # the connection ends without an answer, as a proxy's may
            self.close_connection = True
            return
        stream = reply.stream
        try:
            length = len(reply.body) if stream is None else os.fstat(stream.fileno()).st_size
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(length))
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            if stream is None:
                self.wfile.write(reply.body)
            else:
                shutil.copyfileobj(stream, self.wfile, _STREAM_CHUNK)
        finally:
            if stream is not None:
                stream.close()

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a test run makes thousands of requests."""


def _not_found(path: str) -> _Reply:
    return _message(404, f"Endpoint '{path}' does not exist")


def _request_id() -> str:
    """An `x-request-id` as OpenAI writes it."""
    return f"req_{secrets.token_hex(16)}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _redacted(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: "<redacted>" if k in _SECRET_HEADERS else v for k, v in headers.items()}


def _with_headers(reply: _Reply, headers: tuple[tuple[str, str], ...]) -> _Reply:
    """`reply` with `headers` added, except names it already carries (a fault's own win)."""
    present = {name.lower() for name, _ in reply.headers}
    extra = tuple(header for header in headers if header[0].lower() not in present)
    return dataclasses.replace(reply, headers=reply.headers + extra) if extra else reply


def _redirect(fault: Fault) -> _Reply:
    return _Reply(302, b"", "text/plain", (("Location", fault.message or "/"),))


def _incorrect_key(key: str | None, *, whole: bool = False) -> str:
    """OpenAI's message for a wrong key, which shows only the key's ends (or, `whole`, the
    key as sent, as a gateway that echoes what it refused does)."""
    shown = ""
    if key is not None and whole:
        shown = f": {key}"
    elif key is not None:
        shown = f": {key[:3]}{'*' * (len(key) - 7)}{key[-4:]}" if len(key) > 10 else ": ***"
    return (
        f"Incorrect API key provided{shown}. You can find your API key at "
        "https://platform.openai.com/account/api-keys."
    )


def _moderation_blocked() -> _Reply:
    return _openai_error(
        400, _OPENAI_SAFETY, kind="image_generation_user_error", code="moderation_blocked"
    )


def _openai_rate_limited(fault: Fault, model: str | None) -> _Reply:
    """An injected 429 from OpenAI's per-minute request limit, with its headers."""
    wait = next((t for t in (fault.reset, fault.retry_after) if t is not None), 1.0)
    headers = [
        ("x-ratelimit-limit-requests", "100"),
        ("x-ratelimit-remaining-requests", "0"),
        ("x-ratelimit-reset-requests", _duration(wait)),
    ]
    if fault.retry_after is not None:
        headers.append(("retry-after", str(math.ceil(fault.retry_after))))
    message = (
        f"Rate limit reached for {model or 'images'} on requests per min (RPM): Limit 100, "
        f"Used 100, Requested 1. Please try again in {_duration(wait)}. "
        "Visit https://platform.openai.com/account/rate-limits to learn more."
    )
    return _openai_error(
        429, message, kind="requests", code="rate_limit_exceeded", headers=tuple(headers)
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block stop()
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: GptImageEmulator) -> None:
        self.emulator = emulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._connections_lock:
            if add:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def drop_connections(self) -> None:
        with self._connections_lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the emulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m prefect_gpt_image.testing.emulator",
        description=(
            "Serve a local stand-in for the GPT Image API: NexaAPI's on RapidAPI at /generate, "
            "and OpenAI's Images API at /v1/images/generations and /v1/images/edits, with its "
            "Files and Batch APIs at /v1/files and /v1/batches."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--api-key", default="test-key")
    parser.add_argument("--api-host", default="gpt-image-1-5.p.rapidapi.com")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds per generation, drawing included"
    )
    parser.add_argument("--shape", choices=[*RESPONSE_SHAPES, "cycle"], default="url")
    parser.add_argument("--format", choices=sorted(_FORMATS), default="png", dest="image_format")
    parser.add_argument(
        "--rate-limit", type=float, default=None, help="requests per second, answered 429 above"
    )
    parser.add_argument(
        "--no-rate-limit-headers",
        action="store_false",
        dest="rate_limit_headers",
        help="enforce --rate-limit with bare 429s, without x-ratelimit-* headers",
    )
    parser.add_argument(
        "--image-bytes", type=int, default=None, help="pad each PNG to at least this many bytes"
    )
    parser.add_argument(
        "--batch-seconds",
        type=float,
        default=1.0,
        dest="batch_processing_seconds",
        help="about how long a batch takes from validating to completed",
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        help="keep every image in memory (by default only hashes, for long runs)",
    )
    args = parser.parse_args(argv)
    try:
        emulator = GptImageEmulator(
            api_key=args.api_key,
            api_host=args.api_host,
            host=args.host,
            port=args.port,
            shape=args.shape,
            image_format=args.image_format,
            latency=args.latency,
            rate_limit=args.rate_limit,
            rate_limit_headers=args.rate_limit_headers,
            image_bytes=args.image_bytes,
            keep_images=args.keep_images,
            batch_processing_seconds=args.batch_processing_seconds,
        )
    except ValueError as exc:
        parser.error(str(exc))
    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopped.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with emulator:
        print(emulator.base_url, flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
