"""How busy the API is kept: every request to an endpoint is admitted here, in one place.

A request is admitted when four things allow it, in this order:

1. the endpoint is not on hold: a 429 or 503 with Retry-After (or the gateway's reset
   time) speaks for the key, not for one request, so it holds back every request;
2. a slot is free: at most `ApiLimits.max_concurrency` requests in flight;
3. its turn has come: requests start at most `requests_per_second` apart, or at the
   rate learned from the API when the caller did not say;
4. the Prefect global limits the caller names allow it (a rate limit, then a
   concurrency limit): what bounds workers on other machines.

The learned rate follows the API like TCP follows a network: a 429 cuts it to just
under what the API accepted in the last second; a success that says no request is left
in the window (`x-ratelimit-remaining: 0`) stops it there, at what was accepted, without
a cut (at the limit is where the rate should be); every quiet second raises it by a
little; half a minute without signals forgets it. Without a learned rate, and without
one the caller gave, concurrency alone bounds the load.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping

from prefect.concurrency.sync import concurrency, rate_limit

from prefect_gpt_image.models import ApiLimits
from prefect_gpt_image.responses import retry_after_seconds
from prefect_gpt_image.retry_policy import MAX_SERVER_WAIT_SECONDS

RATE_DECREASE = 0.9
"""A 429 sets the rate to this share of what the API accepted in the second before it."""
RATE_INCREASE_PER_SECOND = 0.015
"""Each second without a congestion signal raises the learned rate by this share."""
MIN_RATE = 0.1
"""The learned rate never goes below one request in ten seconds."""
WINDOW_SECONDS = 1.0
"""How far back "what the API accepted" looks, from the start of the signalling request."""
RATE_MEMORY_SECONDS = 30.0
"""A learned rate is forgotten after this long without a congestion signal: a lone 429
must not hold a long-lived worker back for good."""


class _Start:
    """When one request started, and whether the API refused it."""

    __slots__ = ("at", "refused")

    def __init__(self, at: float) -> None:
        self.at = at
        self.refused = False


class EndpointThrottle:
    """Admits the requests of one process to one endpoint, for one key."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._in_flight = 0
        self._not_before = 0.0
        self._holds: deque[tuple[float, float]] = deque()  # (from, until) of recent holds
        self._next_start = 0.0
        self._learned_rate: float | None = None
        self._learned_at = 0.0
        self._cut_at = float("-inf")
        self._starts: deque[_Start] = deque()

    @contextlib.contextmanager
    def admit(self, limits: ApiLimits | None = None) -> Iterator[Admission]:
        """Wait for the request's turn, hold its slot while it runs, then release it.

        Call `Admission.answered` with the answer so the throttle can learn from it.
        """
        limits = limits or ApiLimits()
        with self._lock:
            while limits.max_concurrency is not None and self._in_flight >= limits.max_concurrency:
                self._lock.wait()
            self._in_flight += 1
        try:
            start = self._wait_for_turn(limits.requests_per_second)
            if limits.global_rate_limit is not None:
                rate_limit(limits.global_rate_limit, occupy=1, strict=True)
            with _global_slot(limits.global_concurrency_limit):
                yield Admission(self, start, told_rate=limits.requests_per_second is not None)
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify()

    def hold(self, seconds: float) -> None:
        """Let no request start for `seconds` (capped), counted from now."""
        now = time.monotonic()
        until = now + min(max(seconds, 0.0), MAX_SERVER_WAIT_SECONDS)
        with self._lock:
            self._not_before = max(self._not_before, until)
            self._holds.append((now, until))

    def rate(self, now: float | None = None) -> float | None:
        """The learned rate, requests per second; None until the API has pushed back."""
        now = time.monotonic() if now is None else now
        if self._learned_rate is None or now - self._learned_at > RATE_MEMORY_SECONDS:
            return None
        return self._learned_rate * (1 + RATE_INCREASE_PER_SECOND * (now - self._learned_at))

    def slow_down(self, start: _Start, *, refused: bool) -> None:
        """The request that started at `start` met the API's limit: slow down to what the
        API accepted in the second before it, and just under that if it was `refused`.

        A request that started before the last cut speaks of the rate before it, which
        that cut has answered: it changes nothing (in a burst, the second before the first
        request holds few starts, and would pass for a slow API). Nor does a second that a
        hold cut short, which shows how long the hold was: the rate falls from where it was.
        """
        with self._lock:
            now = time.monotonic()
            start.refused = start.refused or refused
            if start.at <= self._cut_at:
                return
            while self._starts and self._starts[0].at < now - RATE_MEMORY_SECONDS:
                self._starts.popleft()
            while self._holds and self._holds[0][1] < now - RATE_MEMORY_SECONDS:
                self._holds.popleft()
            since = start.at - WINDOW_SECONDS
            window = [s for s in self._starts if since < s.at <= start.at]
            accepted = max(sum(not s.refused for s in window), 1) / WINDOW_SECONDS
            current = self.rate(now)
            if current is not None and any(a < start.at and b > since for a, b in self._holds):
                accepted = current
            target = accepted if current is None else min(current, accepted)
            if refused:
                target *= RATE_DECREASE
                self._cut_at = now
            self._learned_rate = max(target, MIN_RATE)
            self._learned_at = now

    def _wait_for_turn(self, requests_per_second: float | None) -> _Start:
        while True:
            with self._lock:
                now = time.monotonic()
                rates = [r for r in (requests_per_second, self.rate(now)) if r is not None]
                turn = max(now, self._not_before, self._next_start if rates else now)
                if turn <= now:
                    if rates:
                        self._next_start = now + 1 / min(rates)
                    start = _Start(now)
                    self._starts.append(start)
                    return start
            time.sleep(turn - now)


class Admission:
    """One admitted request; tell it the answer."""

    def __init__(self, throttle: EndpointThrottle, start: _Start, *, told_rate: bool) -> None:
        self._throttle = throttle
        self._start = start
        self._told_rate = told_rate

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        wait = retry_after_seconds(headers) if status == 429 or status >= 500 else None
        if wait is not None:
            self._throttle.hold(wait)
        if status == 429:
            self._throttle.slow_down(self._start, refused=True)
        elif not self._told_rate and headers.get("x-ratelimit-remaining", "").strip() == "0":
            # Accepted, but the window is spent: go no faster, unless the caller gave a rate.
            self._throttle.slow_down(self._start, refused=False)


def _global_slot(name: str | None) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext() if name is None else concurrency(name, occupy=1, strict=True)


_throttles: dict[str, EndpointThrottle] = {}
_throttles_lock = threading.Lock()


def throttle_for(endpoint_url: str, api_key: str) -> EndpointThrottle:
    """The process-wide throttle of one endpoint and key: limits belong to the key's plan."""
    key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    with _throttles_lock:
        return _throttles.setdefault(f"{endpoint_url} {key_id}", EndpointThrottle())
