"""How busy the API is kept: every request to an endpoint is admitted here, in one place.

A request is admitted when four things allow it, in this order:

1. the endpoint is not on hold: a 429 or 5xx with Retry-After (or the window's reset
   time) speaks for the key, not for one request, so it holds back every request;
2. a slot is free: at most `ApiLimits.max_concurrency` requests in flight;
3. its turn has come: requests start at most `requests_per_second` apart, or at the
   rate learned from the API when the caller did not say;
4. the Prefect global limits the caller names allow it (a rate limit, then a
   concurrency limit): what bounds workers on other machines.

A rate the caller gave is the plan's: 429s never change it (a hold still pauses it).

The learned rate follows the API like TCP CUBIC follows a network. A 429 remembers the
rate before it and cuts to just under it; the rate then climbs back within a second and a
half, fast at first and flattening as it nears the remembered rate, stays near it a while,
and only then probes beyond it, slowly at first. Which rate is remembered depends on what
the answer says:

- a 429 that asks for a wait (Retry-After, or the window's reset time), and a success that
  says the window is spent (`x-ratelimit-remaining: 0`, or a gateway's name for it), speak
  for the plan's limit: the rate before is what the API accepted since the last cut. The
  spent window stops the rate there without a cut: at the limit is where it should be;
- a bare 429 may be a busy moment as well as a limit: the rate before is the learned rate
  that met it, and the cut never lands below what was sent in the last seconds. A lone
  429 from a busy API costs a second or two of a slightly lower rate, no more.

The first 429 knows no learned rate: the rate before is what the API accepted of the
burst. Half a minute without signals forgets the learned rate; without one, and without
one the caller gave, concurrency alone bounds the load.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping

from prefect.concurrency.sync import concurrency, rate_limit

from prefect_gpt_image._rate_limit_headers import retry_after_seconds, window_spent
from prefect_gpt_image._retry_policy import MAX_SERVER_WAIT_SECONDS
from prefect_gpt_image.models import ApiLimits

RATE_DECREASE = 0.9
"""A 429 cuts the rate to this share of the rate before it (CUBIC's beta)."""
RECOVERY_SECONDS = 1.5
"""How long the rate takes to climb back to the rate before a cut (CUBIC's K): a lone 429
costs about 0.1 x 1.5 / 4, under 4% of a second's requests."""
PROBE_GROWTH = 0.004
"""Past the rate before the cut, the rate grows by this share times the cube of the
seconds since it got there: +0.4% after 1 s, +3% after 2 s, +11% after 3 s, +50% after 5 s."""
MIN_RATE = 0.1
"""The learned rate never goes below one request in ten seconds."""
WINDOW_SECONDS = 3.0
"""How far back "what was sent" looks from the start of a request that met the limit
(long enough to smooth the waves of a run's first seconds)."""
BURST_SECONDS = 1.0
"""Starts closer together than this count as a second's: plans count per second."""
RATE_MEMORY_SECONDS = 30.0
"""A learned rate is forgotten after this long without a congestion signal: a lone 429
must not hold a long-lived worker back for good."""


def cubic_rate(rate_before: float, seconds: float) -> float:
    """The learned rate `seconds` after a cut from `rate_before`: concave up to it within
    `RECOVERY_SECONDS`, then convex beyond it."""
    left = RECOVERY_SECONDS - seconds
    if left > 0:
        return rate_before * (1 - (1 - RATE_DECREASE) * (left / RECOVERY_SECONDS) ** 3)
    return rate_before * (1 + PROBE_GROWTH * (-left) ** 3)


class _Start:
    """When one request started, and whether the API refused it."""

    __slots__ = ("at", "refused")

    def __init__(self, at: float) -> None:
        self.at = at
        self.refused = False


class EndpointThrottle:
    """Admits the requests of one process to one endpoint, for one key.

    `clock` and `sleep` are the monotonic clock it reads and the way it waits: a test
    gives both, and the arithmetic runs without waiting.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Condition()
        self._in_flight = 0
        self._not_before = 0.0
        self._holds: deque[tuple[float, float]] = deque()  # (from, until) of recent holds
        self._next_start = 0.0
        self._rate_before: float | None = None  # CUBIC's W_max
        self._curve_from = 0.0  # when the rate was cut from `_rate_before`
        self._learned_at = 0.0
        self._cut_at = float("-inf")
        self._starts: deque[_Start] = deque()

    @contextlib.contextmanager
    def admit(self, limits: ApiLimits | None = None) -> Iterator[Admission]:
        """Wait for the request's turn, hold its slot while it runs, then release it.

        Call `Admission.answered` with the answer so the throttle can learn from it.
        """
        cap = limits.max_concurrency if limits is not None else None  # None: no limits given
        limits = limits or ApiLimits()
        with self._lock:
            while cap is not None and self._in_flight >= cap:
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
        now = self._clock()
        until = now + min(max(seconds, 0.0), MAX_SERVER_WAIT_SECONDS)
        with self._lock:
            self._not_before = max(self._not_before, until)
            self._holds.append((now, until))

    def rate(self, now: float | None = None) -> float | None:
        """The learned rate, requests per second; None until the API has pushed back."""
        now = self._clock() if now is None else now
        if self._rate_before is None or now - self._learned_at > RATE_MEMORY_SECONDS:
            return None
        return max(cubic_rate(self._rate_before, now - self._curve_from), MIN_RATE)

    def slow_down(self, start: _Start, *, refused: bool, at_limit: bool) -> None:
        """The request that started at `start` met the API's limit: cut the learned rate
        to just under the rate before it if it was `refused`, else stop it there.

        The rate before it is never more than the learned rate, and is:

        - `at_limit` (the answer asked for a wait, or said the window is spent: the plan's
          limit speaking): what the API accepted since the last cut, the time of any hold
          included, since the API's own window refilled during it;
        - otherwise (a bare 429: a busy moment as well as a limit): the learned rate that
          met it, though the cut lands no lower than what was sent in the last seconds;
        - the first time, with no learned rate: what the API accepted of what was sent.

        A request that started before the last cut speaks of the rate before it, which
        that cut has answered: it changes nothing (in a burst, the second before the first
        request holds few starts, and would pass for a slow API). Nor does a window that a
        hold took most of, which shows how long the hold was: the rate falls from where it
        was.
        """
        with self._lock:
            now = self._clock()
            start.refused = start.refused or refused
            if start.at <= self._cut_at:
                return
            while self._starts and self._starts[0].at < now - RATE_MEMORY_SECONDS:
                self._starts.popleft()
            while self._holds and self._holds[0][1] < now - RATE_MEMORY_SECONDS:
                self._holds.popleft()
            current = self.rate(now)
            since = start.at - WINDOW_SECONDS
            accepted, held = self._accepted_rate(
                start, min(since, self._cut_at) if at_limit else since
            )
            if not at_limit:  # a bare 429: the cut lands no lower than what was sent
                accepted /= RATE_DECREASE
            if current is None:
                before = accepted
            elif held:
                before = current
            else:
                before = min(current, accepted)
            self._rate_before = max(before, MIN_RATE)
            if refused:
                self._curve_from = self._cut_at = now
            else:  # at the top of the curve: no climb back, the slow probe from here
                self._curve_from = now - RECOVERY_SECONDS
            self._learned_at = now

    def _accepted_rate(self, start: _Start, since: float) -> tuple[float, bool]:
        """Requests a second the API accepted after `since` and up to `start`, `start`
        included (the rate at which it said no), and whether holds took most of that time.

        A hold under way at `since` extends the window back to its start: the API's own
        window refilled during it, and the starts after it spent that. The time is counted
        from the first start or hold, and is at least `BURST_SECONDS`: a run's first
        second is not a slow API.
        """
        since = max(since, start.at - RATE_MEMORY_SECONDS)
        holds = sorted((a, min(b, start.at)) for a, b in self._holds if b > since and a < start.at)
        since = min([since] + [a for a, _ in holds])
        window = [s for s in self._starts if since < s.at <= start.at]
        origin = min([a for a, _ in holds[:1]] + [s.at for s in window[:1]], default=start.at)
        seconds = max(start.at - origin, BURST_SECONDS)
        held, held_until = 0.0, origin
        for a, b in holds:  # their union: holds overlap when 429s come together
            held += max(0.0, b - max(a, held_until))
            held_until = max(held_until, b)
        return sum(not s.refused or s is start for s in window) / seconds, held > seconds / 2

    def _wait_for_turn(self, requests_per_second: float | None) -> _Start:
        """Wait until the endpoint is not on hold and the rate allows another start: the
        rate the caller gave, else the learned one, else none."""
        while True:
            with self._lock:
                now = self._clock()
                rate = requests_per_second or self.rate(now)
                turn = max(now, self._not_before, self._next_start if rate else now)
                if turn <= now:
                    if rate:
                        self._next_start = now + 1 / rate
                    start = _Start(now)
                    self._starts.append(start)
                    return start
            self._sleep(turn - now)


class Admission:
    """One admitted request; tell it the answer."""

    def __init__(self, throttle: EndpointThrottle, start: _Start, *, told_rate: bool) -> None:
        self._throttle = throttle
        self._start = start
        self._told_rate = told_rate

    def answered(self, status: int, headers: Mapping[str, str]) -> None:
        """Learn from the answer. Only a failure's Retry-After or reset time holds: on a
        success, a reset time says when the window ends, not how long to wait."""
        wait = retry_after_seconds(headers) if status == 429 or status >= 500 else None
        if wait is not None:
            self._throttle.hold(wait)
        if status == 429:
            # The learned rate is cut; a rate the caller gave is not (only held, above).
            self._throttle.slow_down(self._start, refused=True, at_limit=wait is not None)
        elif not self._told_rate and window_spent(headers):
            # Accepted, but the window is spent: go no faster, unless the caller gave a rate.
            self._throttle.slow_down(self._start, refused=False, at_limit=True)


def _global_slot(name: str | None) -> contextlib.AbstractContextManager[object]:
    return contextlib.nullcontext() if name is None else concurrency(name, occupy=1, strict=True)


_throttles: dict[str, EndpointThrottle] = {}
_throttles_lock = threading.Lock()


def throttle_for(endpoint_url: str, api_key: str) -> EndpointThrottle:
    """The process-wide throttle of one endpoint and key: limits belong to the key's plan."""
    key_id = hashlib.sha256(api_key.encode()).hexdigest()[:16]
    with _throttles_lock:
        return _throttles.setdefault(f"{endpoint_url} {key_id}", EndpointThrottle())
