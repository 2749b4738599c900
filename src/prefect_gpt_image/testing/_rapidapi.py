"""NexaAPI's GPT Image endpoint on RapidAPI, as the emulator serves it at its `path`.

RapidAPI's gateway checks `x-rapidapi-key` and `x-rapidapi-host` and speaks in its own words
(`{"message": ...}`, its `x-ratelimit-*` headers); the model behind it takes `prompt`, `width`
and `height` and answers a link to the image in one of several layouts (`RESPONSE_SHAPES`),
served from the emulator's `/images/`. Faults on this route break those links as a CDN or a
bucket would.
"""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from prefect_gpt_image.testing._drawing import _FORMATS, MAX_SIDE
from prefect_gpt_image.testing._faults import (
    _NOT_AN_IMAGE,
    Fault,
    _no_such_model,
    _redirect,
    _server_error,
)
from prefect_gpt_image.testing._records import RecordedCall, _redacted
from prefect_gpt_image.testing._server import (
    _error,
    _json,
    _message,
    _Reply,
    _s3_error,
    _with_headers,
)
from prefect_gpt_image.testing._shared import _Shared

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
_TOO_MANY = "Too many requests"


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


def _rate_limited(fault: Fault) -> _Reply:
    """An injected 429 from the gateway, with its headers."""
    headers = [("x-ratelimit-requests-limit", "100"), ("x-ratelimit-requests-remaining", "0")]
    if fault.retry_after is not None:
        headers.append(("Retry-After", str(math.ceil(fault.retry_after))))
    if fault.reset is not None:
        headers.append(("x-ratelimit-requests-reset", str(math.ceil(fault.reset))))
    return _json(429, {"message": _TOO_MANY}, tuple(headers))


class _Settings(Protocol):
    """The emulator's settings this route reads on every call: tests change them mid-run."""

    api_key: str
    api_host: str
    subscribed: bool
    shape: str
    image_format: str
    latency: float
    reject_marker: str | None
    rate_limit_headers: bool
    keep_images: bool


class _RapidApi:
    """Answers POSTs to the emulator's RapidAPI path: the gateway's checks, then the rate
    limit, then a fault or an image."""

    def __init__(
        self,
        settings: _Settings,
        shared: _Shared,
    ) -> None:
        self._settings = settings
        self._shared = shared
        self._lock = threading.Lock()
        self._cycle = 0
        """How far `shape="cycle"` has rotated through the shapes."""

    def clear(self) -> None:
        with self._lock:
            self._cycle = 0

    def answer(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        """Answer a generation request, and record it."""
        arrival, epoch = self._shared.records.arrive()
        request = _parse(raw)
        kind = None
        reply = self._gatekeep(headers)
        if reply is None:
            refusal, limit_headers = self._take_token()
            fault = self._shared.faults.take(request.prompt) if refusal is None else None
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
        self._shared.records.add(arrival, epoch, call)
        return reply

    def _gatekeep(self, headers: dict[str, str]) -> _Reply | None:
        settings = self._settings
        key = headers.get("x-rapidapi-key")
        if not key:
            return _message(401, _MISSING_KEY)
        if key != settings.api_key:
            return _message(401, _INVALID_KEY)
        if not settings.subscribed:
            return _message(403, _NOT_SUBSCRIBED)
        if headers.get("x-rapidapi-host") != settings.api_host:
            return _message(404, "API doesn't exists")
        return None

    def _take_token(self) -> tuple[_Reply | None, tuple[tuple[str, str], ...]]:
        """None if the rate limit admits this call, else the gateway's 429; and the headers
        to add to the answer."""
        admission = self._shared.limit.admit(
            openai=False, headers=self._settings.rate_limit_headers
        )
        if admission.admitted:
            return None, admission.headers
        retry = ("Retry-After", str(admission.wait))
        return _message(429, _TOO_MANY), (*admission.headers, retry)

    def _generate(self, request: _Request, first_download_delay: float = 0.0) -> _Reply:
        settings = self._settings
        if request.problem is not None:
            return _error(400, "invalid_request", request.problem)
        prompt = request.prompt or ""
        if settings.reject_marker is not None and settings.reject_marker in prompt:
            return _error(400, "content_policy_violation", _SAFETY)
        started = time.monotonic()
        data = self._shared.studio.draw(prompt, *request.size, settings.image_format)
        blob = _Reply(200, data, self._media_type)
        path = self._shared.store.new_path(self._extension)
        if first_download_delay > 0:
            self._shared.store.delay_first(path, first_download_delay)
        # The generation takes `latency` in all, drawing included, as the API's does.
        if (left := started + settings.latency - time.monotonic()) > 0:
            time.sleep(left)
        return self._link(path, blob, inline=data, advance=True, once=not settings.keep_images)

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
            path = self._shared.store.new_path(self._extension)
            return self._link(path, _redirect(fault), inline=None)
        if fault.kind == "expired_url":
            path = self._shared.store.new_path(self._extension)
            return self._link(path, _s3_error(fault.status or 404, path), inline=None)
        if fault.kind == "not_an_image":
            data = _NOT_AN_IMAGE
        elif fault.kind == "truncated_image":
            png = self._shared.studio.image(request.prompt or "", *request.size, "png")
            data = png[: len(png) // 2]
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        path = self._shared.store.new_path("png")
        return self._link(path, _Reply(200, data, "image/png"), inline=data)

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
        shape = self._shape(advance=advance)
        if shape != "data_b64" or inline is None:
            self._shared.store.put(path, blob, once=once)
        return _json(200, _payload(shape, self._shared.store.url(path), inline))

    def _shape(self, *, advance: bool) -> str:
        shape = self._settings.shape
        if shape != "cycle":
            return shape
        with self._lock:
            shape = RESPONSE_SHAPES[self._cycle % len(RESPONSE_SHAPES)]
            if advance:
                self._cycle += 1
        return shape

    @property
    def _extension(self) -> str:
        return _FORMATS[self._settings.image_format][1]

    @property
    def _media_type(self) -> str:
        return _FORMATS[self._settings.image_format][2]
