"""What an answer's rate-limit headers say, whichever gateway wrote them.

Three dialects reach the client: the standard `Retry-After` (seconds or an HTTP date),
RapidAPI's `x-ratelimit-requests-*` and the generic `x-ratelimit-*` (seconds), and
OpenAI's `retry-after-ms` (milliseconds) and `x-ratelimit-*-requests`, whose reset is a
duration such as `1s`, `120ms` or `6m0s`. Every reader of these headers asks here, so a
new dialect is taught once.

`headers` is a case-insensitive mapping such as `httpx.Headers`; a plain dict needs its
names in lower case.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime

RESET_SECONDS_HEADERS = ("x-ratelimit-requests-reset", "x-ratelimit-reset")
"""Seconds until the window resets: RapidAPI's, then the generic name."""
RESET_DURATION_HEADERS = ("x-ratelimit-reset-requests",)
"""A duration until the window resets, such as `6m0s`: OpenAI's."""
REMAINING_HEADERS = (
    "x-ratelimit-remaining",
    "x-ratelimit-requests-remaining",
    "x-ratelimit-remaining-requests",
)
"""Requests left in the window: generic, RapidAPI's and OpenAI's."""

_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ms|us|µs|μs|ns|h|m|s)")
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|us|µs|μs|ns|h|m|s))+")


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """How long the server asked us to wait: `retry-after-ms`, Retry-After, else the time
    until the window resets. Uncapped: whoever waits caps it."""
    millis = _seconds(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    for name in RESET_SECONDS_HEADERS:
        seconds = _seconds(headers.get(name))
        if seconds is not None:
            return seconds
    for name in RESET_DURATION_HEADERS:
        seconds = duration_seconds(headers.get(name) or "")
        if seconds is not None:
            return seconds
    return None


def window_spent(headers: Mapping[str, str]) -> bool:
    """Whether the answer says no request is left in the current window."""
    return any((headers.get(name) or "").strip() == "0" for name in REMAINING_HEADERS)


def duration_seconds(text: str) -> float | None:
    """Seconds in a duration such as `1s`, `120ms`, `6m0s` or `1h2m3.5s` (Go's format, which
    OpenAI's reset headers use); a bare number is seconds. None if it is not one."""
    text = text.strip()
    bare = _seconds(text)
    if bare is not None:
        return bare
    if not _DURATION.fullmatch(text):
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))


def _seconds(text: str | None) -> float | None:
    """A finite, non-negative number, or None."""
    try:
        value = float(text or "")
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
