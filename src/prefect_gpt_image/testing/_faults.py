"""Faults to inject, and the rate limit: what goes wrong between a client and the API.

`Fault` names a misbehaviour and its parameters; `_FaultQueue` holds the faults for the next
calls, queued or drawn at random; `_RateLimit` is the token bucket of `rate_limit`. Both
protocols and the batches take faults from here, and each words them in its own protocol;
the few replies here are the ones every route gives alike (a gateway's 5xx page, a link that
redirects, an HTML page served as an image).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from prefect_gpt_image.testing._server import _error, _gateway_page, _Reply

BATCH_OUTPUT_FAULTS = ("not_json", "truncated", "no_custom_id", "stray")
"""Ways a batch's answer line can be written wrong (see `add_batch_output_fault`)."""

_NOT_AN_IMAGE = b"<html><body>Service temporarily unavailable</body></html>"


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


class _FaultQueue:
    """The faults for the next calls to either route: those queued (`add_fault`) first, then,
    for a `rate` share of calls, one of `choices` drawn at random, reproducibly
    (`seed_faults`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._queued: list[_QueuedFault] = []
            self.rate = 0.0
            self.choices: tuple[Fault, ...] = ()
            self._rng = random.Random(0)

    def add(self, fault: Fault, times: int, prompt_contains: str | None) -> None:
        with self._lock:
            self._queued.append(_QueuedFault(fault, times, prompt_contains))

    def seed(self, rate: float, faults: Sequence[Fault], seed: int) -> None:
        with self._lock:
            self.rate = rate
            self.choices = tuple(faults)
            self._rng = random.Random(seed)

    def take(self, prompt: str | None) -> Fault | None:
        """The fault for a call of `prompt`, or None for a call that goes right."""
        with self._lock:
            if (fault := _take_queued(self._queued, prompt)) is not None:
                return fault
            if self.choices and self.rate > 0 and self._rng.random() < self.rate:
                return self._rng.choice(self.choices)
        return None


def _no_such_model(model: str | None) -> str:
    """What both routes say of a model that is retired, or out of the key's reach."""
    return f"The model `{model}` does not exist or you do not have access to it."


def _server_error(status: int) -> _Reply:
    """A 5xx fault: the model's JSON for 500, the gateway's HTML page otherwise."""
    if status == 500:
        return _error(500, "server_error", "The server had an error while processing your request.")
    return _gateway_page(status)


def _redirect(fault: Fault) -> _Reply:
    return _Reply(302, b"", "text/plain", (("Location", fault.message or "/"),))


# -- the rate limit ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class _Admission:
    """The rate limit's verdict on a call: whether it is admitted, the headers to add to its
    answer and, when it is refused, the seconds to wait and the burst size, for the 429."""

    admitted: bool
    headers: tuple[tuple[str, str], ...] = ()
    wait: int = 0
    limit: int = 0


class _RateLimit:
    """The emulator's `rate_limit`: a token bucket of `max(1, rate)` tokens, or no limit."""

    def __init__(self, rate: float | None) -> None:
        self._lock = threading.Lock()
        self._bucket: _Bucket | None = None
        self.rate = rate

    @property
    def rate(self) -> float | None:
        return self._bucket.rate if self._bucket is not None else None

    @rate.setter
    def rate(self, value: float | None) -> None:
        """Setting a rate fills the bucket."""
        if value is not None and not (0 < value < math.inf):
            raise ValueError(f"rate_limit must be a positive number of requests/s, got {value}")
        with self._lock:
            self._bucket = _Bucket.full(value) if value is not None else None

    def refill(self) -> None:
        with self._lock:
            if self._bucket is not None:
                self._bucket = _Bucket.full(self._bucket.rate)

    def admit(self, *, openai: bool, headers: bool) -> _Admission:
        """Spend a token on a call if there is one; `headers` under OpenAI's names or
        RapidAPI's, or none."""
        with self._lock:
            bucket = self._bucket
            if bucket is None:
                return _Admission(True)
            admitted = bucket.take()
            sent: tuple[tuple[str, str], ...] = ()
            if headers:
                sent = bucket.openai_headers() if openai else bucket.headers()
            if admitted:
                return _Admission(True, sent)
            return _Admission(False, sent, bucket.retry_after(), math.floor(bucket.capacity))
