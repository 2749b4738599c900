"""A loopback HTTP server that behaves like NexaAPI's GPT Image 1.5 endpoint on RapidAPI.

Tests, demos and benchmarks cannot reach (or pay for) the real API, so this server answers
the same requests with the same status codes and bodies, draws a fresh image per generation,
records every call and can inject the failures a real deployment meets. It can also enforce
a requests-per-second limit, pad images to a realistic size and, run as its own process
(`python -m prefect_gpt_image.testing.emulator`), report its counters over HTTP.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import random
import secrets
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any
from urllib.parse import urlsplit

from PIL import Image, ImageDraw

__all__ = ["RESPONSE_SHAPES", "Fault", "GptImageEmulator", "RecordedCall", "main"]

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

_STATS_PATH = "/__emulator__/stats"
_RESET_PATH = "/__emulator__/reset"


@dataclass(frozen=True)
class Fault:
    """A misbehaviour to inject into the emulator's next answers; build it with a classmethod.

    `kind` names the situation (it is recorded in `RecordedCall.fault`); the other fields are
    its parameters: the status to answer, seconds to stall, rate-limit headers or a message.
    """

    kind: str
    status: int | None = None
    seconds: float | None = None
    retry_after: float | None = None
    reset: float | None = None
    message: str | None = None

    @classmethod
    def rate_limited(cls, retry_after: float | None = 1.0, reset: float | None = None) -> Fault:
        """429 from RapidAPI's gateway when the plan's requests-per-second limit is hit."""
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
        """403 as if the RapidAPI subscription lapsed while the flow runs."""
        return cls("not_subscribed", status=403)


@dataclass(frozen=True)
class RecordedCall:
    """One POST to the generation endpoint, as received and as answered."""

    prompt: str | None
    width: int | None
    height: int | None
    body: dict[str, Any]
    status: int
    fault: str | None
    headers: dict[str, str]


@dataclass
class _QueuedFault:
    fault: Fault
    remaining: int
    prompt_contains: str | None

    def matches(self, prompt: str | None) -> bool:
        if self.prompt_contains is None:
            return True
        return prompt is not None and self.prompt_contains in prompt


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


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


def _render(prompt: str, serial: int, width: int, height: int, image_format: str) -> bytes:
    """A flat image tinted by the prompt with a 64-bit bar code of `serial`, so calls differ."""
    tint = hashlib.sha256(prompt.encode()).digest()
    image = Image.new("RGB", (width, height), (tint[0], tint[1], tint[2]))
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
    pillow_format = _FORMATS[image_format][0]
    buffer = io.BytesIO()
    image.save(buffer, pillow_format, **_SAVE_OPTIONS.get(pillow_format, {}))
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

    def retry_after(self) -> int:
        """Whole seconds until the next token, at least one, as a gateway's Retry-After."""
        return max(1, math.ceil((1.0 - self.tokens) / self.rate))


class GptImageEmulator:
    """Serves the GPT Image generation API on loopback, with call records and fault injection.

    `latency` is the seconds a generation takes: its answer comes that long after the call,
    the time the emulator spends drawing the image included. `rate_limit` (requests per
    second, or None) is enforced like RapidAPI's gateway: a 429 with Retry-After once the
    burst of one second is spent. `image_bytes` pads each PNG to at least that size.
    `keep_images=False` keeps only hashes of served images and drops each image once
    downloaded, so a long benchmark runs in bounded memory.

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
    ) -> None:
        if shape not in (*RESPONSE_SHAPES, "cycle"):
            raise ValueError(f"unknown shape {shape!r}; use one of {RESPONSE_SHAPES} or 'cycle'")
        if image_format not in _FORMATS:
            raise ValueError(f"unknown image_format {image_format!r}; use png, jpeg or webp")
        if image_bytes is not None:
            if isinstance(image_bytes, bool) or not isinstance(image_bytes, int) or image_bytes < 1:
                raise ValueError(f"image_bytes must be a positive integer, got {image_bytes!r}")
            if image_format != "png":
                raise ValueError("image_bytes pads PNG images only; use image_format='png'")
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
        self._clear()

    def _clear(self) -> None:
        self._epoch += 1  # calls still in flight across a reset are not recorded
        self._calls: list[tuple[int, RecordedCall]] = []
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
        """Stop serving and drop open connections; safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.drop_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

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
        """Full URL of the generation endpoint."""
        return self.base_url + self.path

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
        """The most generation requests being handled at once since the last reset."""
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
    def stats(self) -> dict[str, int]:
        """The counters `GET /__emulator__/stats` reports."""
        return {
            "calls": len(self.calls),
            "billed": self.billed,
            "rate_limited": self.rate_limited,
            "peak_concurrency": self.peak_concurrency,
            "image_downloads": self.image_downloads,
        }

    def reset(self) -> None:
        """Forget calls, images and faults between tests and refill the rate limit's bucket;
        configuration such as `rate_limit` and `latency`, and image uniqueness, are kept."""
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

    def _take_fault(self, prompt: str | None) -> Fault | None:
        with self._lock:
            for queued in self._faults:
                if queued.matches(prompt):
                    queued.remaining -= 1
                    if queued.remaining == 0:
                        self._faults.remove(queued)
                    return queued.fault
            if self.random_faults and self.fault_rate > 0 and self._rng.random() < self.fault_rate:
                return self._rng.choice(self.random_faults)
        return None

    # -- request handling --------------------------------------------------------------------

    def _handle_generate(self, raw: bytes, headers: dict[str, str]) -> _Reply:
        with self._lock:
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
        try:
            return self._answer_generate(raw, headers)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _answer_generate(self, raw: bytes, headers: dict[str, str]) -> _Reply:
        with self._lock:
            arrival, epoch = next(self._arrivals), self._epoch
        request = _parse(raw)
        kind = None
        reply = self._gatekeep(headers)
        if reply is None:
            admitted, limit_headers = self._take_token()
            fault = self._take_fault(request.prompt) if admitted else None
            if not admitted:
                kind, reply = "rate_limit", _message(429, _TOO_MANY)
            elif fault is not None:
                kind, reply = fault.kind, self._fault_reply(fault, request)
            else:
                reply = self._generate(request)
            reply = dataclasses.replace(reply, headers=reply.headers + limit_headers)
        shown = {k: "<redacted>" if k == "x-rapidapi-key" else v for k, v in headers.items()}
        call = RecordedCall(
            request.prompt,
            request.width,
            request.height,
            request.body,
            reply.status,
            kind,
            shown,
        )
        with self._lock:
            if epoch == self._epoch:
                bisect.insort(self._calls, (arrival, call), key=lambda item: item[0])
        return reply

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

    def _take_token(self) -> tuple[bool, tuple[tuple[str, str], ...]]:
        """Whether the rate limit admits this call, and the headers to add to its answer."""
        with self._lock:
            bucket = self._bucket
            if bucket is None:
                return True, ()
            admitted = bucket.take()
            headers = bucket.headers() if self.rate_limit_headers else ()
            if not admitted:
                headers += (("Retry-After", str(bucket.retry_after())),)
        return admitted, headers

    def _generate(self, request: _Request, first_download_delay: float = 0.0) -> _Reply:
        if request.problem is not None:
            return _error(400, "invalid_request", request.problem)
        prompt = request.prompt or ""
        if self.reject_marker is not None and self.reject_marker in prompt:
            return _error(400, "content_policy_violation", _SAFETY)
        started = time.monotonic()
        data = self._image(prompt, *request.size, self.image_format)
        with self._lock:
            self._served[hashlib.sha256(data).hexdigest()] = data if self.keep_images else b""
        blob = _Reply(200, data, self._media_type)
        path = self._new_path(self._extension)
        if first_download_delay > 0:
            with self._lock:
                self._download_delays[path] = first_download_delay
        # The generation takes `latency` in all, drawing included, as the API's does.
        if (left := started + self.latency - time.monotonic()) > 0:
            time.sleep(left)
        return self._link(path, blob, inline=data, advance=True, once=not self.keep_images)

    def _image(self, prompt: str, width: int, height: int, image_format: str) -> bytes:
        data = _render(prompt, self._serial(), width, height, image_format)
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
        if fault.kind == "quota_exceeded":
            return _message(429, _QUOTA)
        if fault.kind == "server_error":
            return _server_error(fault.status or 503)
        if fault.kind == "bad_request":
            return _error(400, "invalid_request", fault.message or "Invalid request.")
        if fault.kind == "unauthorized":
            return _message(401, _INVALID_KEY)
        if fault.kind == "not_subscribed":
            return _message(403, _NOT_SUBSCRIBED)
        if fault.kind == "malformed_body":
            return _Reply(200, b'{"url": "http://')
        if fault.kind == "no_image":
            return _json(200, {"status": "succeeded", "result": {}})
        if fault.kind == "redirected_url":
            path = self._new_path(self._extension)
            redirect = _Reply(302, b"", "text/plain", (("Location", fault.message or "/"),))
            return self._link(path, redirect, inline=None)
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
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        emulator = self.server.emulator
        control = emulator._control("POST", path)
        if control is not None:
            self._send(control)
        elif path != emulator.path:
            self._send(_not_found(path))
        else:
            headers = {name.lower(): value for name, value in self.headers.items()}
            self._send(emulator._handle_generate(raw, headers))

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
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
            self._send(_not_found(path))

    def _send(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: a test run makes thousands of requests."""


def _not_found(path: str) -> _Reply:
    return _message(404, f"Endpoint '{path}' does not exist")


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
        description="Serve a local stand-in for the GPT Image API on RapidAPI.",
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
