"""OpenAI's Images API as the emulator answers it: `.../images/generations` and
`.../images/edits` under any prefix, as OpenAI, gateways and Azure OpenAI's v1 endpoint serve
them.

A call passes the key check (`Authorization: Bearer` or Azure's `api-key`), then the rate
limit, then a queued fault or its images, inline as `b64_json`, with token usage and an
`x-request-id`; every error is worded as the emulator's `gateway` would word it. The Files and
Batches APIs share the key check and the gateway's words, and a batch answers each request
line through `respond`, as this route answers the same request sent on its own.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from prefect_gpt_image.testing._drawing import _FORMATS
from prefect_gpt_image.testing._faults import (
    _NOT_AN_IMAGE,
    Fault,
    _duration,
    _redirect,
    _server_error,
)
from prefect_gpt_image.testing._gateways import as_gateway
from prefect_gpt_image.testing._openai_common import _openai_error, _request_id
from prefect_gpt_image.testing._openai_requests import (
    _EDITS_SUFFIX,
    _ImageRequest,
    _model_not_found,
    _parse_edit,
    _parse_openai,
)
from prefect_gpt_image.testing._records import RecordedCall, _redacted
from prefect_gpt_image.testing._server import (
    _json,
    _Reply,
    _s3_error,
    _with_headers,
)
from prefect_gpt_image.testing._shared import _Shared

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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


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


def _recorded(
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


class _Settings(Protocol):
    """The emulator's settings this route reads on every call: tests change them mid-run."""

    api_key: str
    subscribed: bool
    echo_keys: bool
    gateway: str | None
    models: dict[str, Sequence[str] | None]
    min_pixels: int
    latency: float
    reject_marker: str | None
    rate_limit_headers: bool


class _OpenAiImages:
    """Answers POSTs to OpenAI's image endpoints: key check, rate limit, then a fault or
    images."""

    def __init__(
        self,
        settings: _Settings,
        shared: _Shared,
    ) -> None:
        self._settings = settings
        self._shared = shared

    def answer(self, path: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        """A generation or an edit: they differ in how the request is read, and in nothing
        else (keys, faults, rate limits, images, records)."""
        arrival, epoch = self._shared.records.arrive()
        settings = self._settings
        if path.endswith(_EDITS_SUFFIX):
            content_type = headers.get("content-type", "")
            request = _parse_edit(raw, content_type, settings.models, settings.min_pixels)
        else:
            request = _parse_openai(raw, settings.models, settings.min_pixels)
        kind = None
        reply = self.gatekeep(headers)
        if reply is None:
            refusal, limit_headers = self._take_token(request.model)
            if refusal is not None:
                kind, reply = "rate_limit", refusal
            else:
                kind, reply = self.respond(request)
            reply = _with_headers(reply, limit_headers)
        reply = _with_headers(self.through_gateway(reply), (("x-request-id", _request_id()),))
        self._shared.records.add(
            arrival, epoch, _recorded(path, request, reply.status, kind, headers)
        )
        return reply

    def gatekeep(self, headers: Mapping[str, str]) -> _Reply | None:
        """None if the call may go on, else its 401 or 403. Every key presented (Bearer, or
        Azure's api-key header) must be the right one."""
        settings = self._settings
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else ""
        keys = [key for key in (bearer, headers.get("api-key", "")) if key]
        if not keys:
            return _openai_error(401, _NO_KEY, code="invalid_api_key")
        wrong = [key for key in keys if key != settings.api_key]
        if wrong:
            shown = _incorrect_key(wrong[0], whole=settings.echo_keys)
            return _openai_error(401, shown, code="invalid_api_key")
        if not settings.subscribed:
            return _openai_error(403, _NOT_VERIFIED)
        return None

    def through_gateway(self, reply: _Reply) -> _Reply:
        """`reply` as `gateway` words it: an OpenAI-protocol error rewritten in its shape."""
        gateway = self._settings.gateway
        if gateway is None or reply.status < 400 or reply.stream is not None:
            return reply
        try:
            payload = json.loads(reply.body)
        except (ValueError, UnicodeDecodeError):
            return reply  # a page, not an error in OpenAI's shape
        status, payload = as_gateway(gateway, reply.status, payload)
        return dataclasses.replace(reply, status=status, body=json.dumps(payload).encode())

    def respond(
        self, request: _ImageRequest, latency: float | None = None
    ) -> tuple[str | None, _Reply]:
        """The answer to an admitted request, and the kind of fault injected into it, if any;
        `latency` overrides the emulator's (a batch's requests have none)."""
        fault = self._shared.faults.take(request.prompt)
        if fault is not None:
            return fault.kind, self._fault_reply(fault, request, latency)
        return None, self._generate(request, latency)

    def _take_token(self, model: str | None) -> tuple[_Reply | None, tuple[tuple[str, str], ...]]:
        """None if the rate limit admits this call, else OpenAI's 429; and the headers to add
        to the answer."""
        admission = self._shared.limit.admit(openai=True, headers=self._settings.rate_limit_headers)
        if admission.admitted:
            return None, admission.headers
        wait, limit = admission.wait, admission.limit
        message = (
            f"Rate limit reached for {model or 'images'} on requests per second: Limit {limit}. "
            f"Please try again in {wait}s. Visit https://platform.openai.com/account/rate-limits "
            "to learn more."
        )
        refusal = _openai_error(429, message, kind="requests", code="rate_limit_exceeded")
        return refusal, (*admission.headers, ("retry-after", str(wait)))

    def _generate(self, request: _ImageRequest, latency: float | None = None) -> _Reply:
        if request.refusal is not None:
            return request.refusal
        prompt = request.prompt or ""
        marker = self._settings.reject_marker
        if marker is not None and marker in prompt:
            return _moderation_blocked()
        started = time.monotonic()
        transparent = request.background == "transparent"
        images = [
            self._shared.studio.draw(
                prompt,
                *request.size,
                request.output_format,
                transparent=transparent,
                kept=request.kept,
            )
            for _ in range(request.n)
        ]
        latency = self._settings.latency if latency is None else latency
        if (left := started + latency - time.monotonic()) > 0:
            time.sleep(left)
        return _json(200, request.answer([{"b64_json": _b64(data)} for data in images]))

    def _fault_reply(
        self, fault: Fault, request: _ImageRequest, latency: float | None = None
    ) -> _Reply:
        """`fault` in OpenAI's words; images travel inline, so URL faults become links or
        broken inline images, and a slow download a slow answer."""
        kind = fault.kind
        if kind in ("stall", "slow_download"):
            time.sleep(fault.seconds or 0.0)
            return self._generate(request, latency)
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
                path = self._shared.store.new_path(extension)
                blob = (
                    _redirect(fault)
                    if kind == "redirected_url"
                    else _s3_error(fault.status or 404, path)
                )
                self._shared.store.put(path, blob)
                links.append({"url": self._shared.store.url(path)})
            return _json(200, request.answer(links))
        if kind == "not_an_image":
            data = _NOT_AN_IMAGE
        elif kind == "truncated_image":
            image = self._shared.studio.image(
                request.prompt or "", *request.size, request.output_format
            )
            data = image[: len(image) // 2]
        else:
            raise ValueError(f"unknown fault kind {kind!r}")
        return _json(200, request.answer([{"b64_json": _b64(data)}] * request.n))
