"""The throttle's arithmetic, on a clock the test moves: no test here waits."""

from __future__ import annotations

from itertools import pairwise

import httpx
import pytest

from prefect_gpt_image._throttle import (
    PROBE_GROWTH,
    RATE_DECREASE,
    RATE_MEMORY_SECONDS,
    RECOVERY_SECONDS,
    Admission,
    EndpointThrottle,
    cubic_rate,
)
from prefect_gpt_image.models import ApiLimits


class Clock:
    """A monotonic clock that moves only when told to, or when the throttle sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def throttle(clock: Clock) -> EndpointThrottle:
    return EndpointThrottle(clock=clock, sleep=clock.sleep)


def start(throttle: EndpointThrottle, limits: ApiLimits | None = None) -> Admission:
    """Admit one request, to be answered later."""
    with throttle.admit(limits) as admission:
        return admission


def send(
    throttle: EndpointThrottle,
    clock: Clock,
    seconds: float,
    every: float = 1 / 16,
    limits: ApiLimits | None = None,
) -> list[float]:
    """Requests answered 200 at once, one every `every` seconds or as the throttle allows,
    for `seconds`; returns when each started."""
    starts: list[float] = []
    until = clock.now + seconds
    while clock.now < until:
        admission = start(throttle, limits)
        starts.append(clock.now)
        admission.answered(200, httpx.Headers())
        clock.now += every
    return starts


def refuse(throttle: EndpointThrottle, headers: dict[str, str] | None = None) -> None:
    """One request, answered 429."""
    start(throttle).answered(429, httpx.Headers(headers or {}))


def rate(throttle: EndpointThrottle) -> float:
    learned = throttle.rate()
    assert learned is not None
    return learned


# --- the growth law ---------------------------------------------------------------------


def test_the_curve_climbs_back_fast_flattens_then_probes_slowly() -> None:
    before = 16.0
    assert cubic_rate(before, 0) == pytest.approx(RATE_DECREASE * before)
    # Concave: seven eighths of the cut made up in the first half of the recovery.
    half = cubic_rate(before, RECOVERY_SECONDS / 2)
    assert half == pytest.approx(before - (1 - RATE_DECREASE) * before / 8)
    assert cubic_rate(before, RECOVERY_SECONDS) == pytest.approx(before)
    # A plateau: a second past the rate before, still within half a percent of it.
    assert cubic_rate(before, RECOVERY_SECONDS + 1) < before * 1.005
    # Convex: the probe speeds up the longer it goes without a 429.
    probe = [cubic_rate(before, RECOVERY_SECONDS + t) - before for t in (1, 2, 3, 4)]
    assert all(b - a > 0 for a, b in pairwise(probe))
    assert all(c - b > b - a for a, b, c in zip(probe, probe[1:], probe[2:], strict=False))
    assert cubic_rate(before, RECOVERY_SECONDS + 3) == pytest.approx(
        before * (1 + 27 * PROBE_GROWTH)
    )


# --- cuts and recovery ------------------------------------------------------------------


def test_a_lone_429_at_sixteen_a_second_is_recovered_within_two_seconds(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    send(throttle, clock, 3.0)  # 16 a second
    refuse(throttle, {"Retry-After": "0"})  # the limit: about 16 a second
    send(throttle, clock, RECOVERY_SECONDS + 0.5, every=0.0)  # back at it, and sending it
    before = rate(throttle)
    assert 16 < before < 16.5

    refuse(throttle)

    assert rate(throttle) == pytest.approx(RATE_DECREASE * before, rel=0.01)
    clock.now += RECOVERY_SECONDS / 2
    assert rate(throttle) > 0.98 * before
    clock.now += RECOVERY_SECONDS / 2 + 0.5
    assert rate(throttle) == pytest.approx(before, rel=0.01)


def test_a_first_bare_429_cuts_no_lower_than_what_was_sent(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    """Sixteen a second, all concurrency allows, and one refused without a wait: a busy
    moment as well as a limit. The rate it learns is no lower than what was sent."""
    send(throttle, clock, 5.0)
    assert throttle.rate() is None

    refuse(throttle)

    assert 16 <= rate(throttle) < 16.5  # the 16 sent, and a fencepost


def test_a_bare_429_at_the_learned_rate_cuts_from_it(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    send(throttle, clock, 3.0, every=1 / 20)
    refuse(throttle)  # learned: about 0.9 x 20
    send(throttle, clock, 3.0, every=0.0)  # as fast as the learned rate allows
    learned = rate(throttle)

    refuse(throttle)

    assert rate(throttle) == pytest.approx(RATE_DECREASE * learned, rel=0.01)


def test_a_bare_429_cuts_no_lower_than_what_was_sent(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    """Concurrency held the requests to 10 a second while the learned rate had climbed far
    above: a bare 429 (a busy moment, or a limit) brings the rate down to what was sent,
    not to 90% of it."""
    send(throttle, clock, 3.0, every=1 / 20)
    refuse(throttle)
    send(throttle, clock, 8.0, every=1 / 10)
    assert rate(throttle) > 15

    refuse(throttle)

    assert 9.9 < rate(throttle) < 11


def test_a_429_that_asks_for_a_wait_speaks_for_the_limit(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    """The plan allows 8 a second: after a cut, the API accepted 8 a second, the hold
    included. The rate falls to just under those 8, however high it had climbed."""
    send(throttle, clock, 3.0, every=1 / 16)
    refuse(throttle, {"Retry-After": "1"})
    clock.now += 1.0  # the hold
    send(throttle, clock, 5.0, every=1 / 10)  # 51 with the next over 6 s since the cut
    assert rate(throttle) > 10

    refuse(throttle, {"Retry-After": "1"})

    assert 0.9 * 8 < rate(throttle) < 0.9 * 8.6


def test_a_burst_is_cut_once(throttle: EndpointThrottle) -> None:
    """Sixteen requests at once, the last refused by the plan's limit: the rate falls to
    just under the sixteen sent. The first request's refusal, answered later, speaks of
    the same burst (and of a second that held only itself): it changes nothing."""
    admissions = [start(throttle) for _ in range(16)]
    admissions[-1].answered(429, httpx.Headers({"Retry-After": "0"}))
    learned = rate(throttle)
    assert learned == pytest.approx(RATE_DECREASE * 16)

    admissions[0].answered(429, httpx.Headers({"Retry-After": "0"}))

    assert rate(throttle) == learned


def test_a_hold_is_not_mistaken_for_a_slow_api(throttle: EndpointThrottle, clock: Clock) -> None:
    """After a hold, the window before the next request is nearly empty: a 429 then cuts
    the learned rate from where it was, not down to that empty window."""
    admissions = [start(throttle) for _ in range(8)]  # eight at once, the last refused
    admissions[-1].answered(429, httpx.Headers())
    clock.now += 0.5

    throttle.hold(5.0)
    admission = start(throttle)
    assert clock.now == pytest.approx(1005.5)  # the request waited out the hold
    learned = rate(throttle)

    admission.answered(429, httpx.Headers({"Retry-After": "5"}))

    assert rate(throttle) == pytest.approx(RATE_DECREASE * learned)


def test_a_learned_rate_is_forgotten(throttle: EndpointThrottle, clock: Clock) -> None:
    send(throttle, clock, 2.0)
    refuse(throttle)
    assert throttle.rate() is not None

    clock.now += RATE_MEMORY_SECONDS + 1

    assert throttle.rate() is None


# --- a rate the caller gave -------------------------------------------------------------


def test_a_told_rate_is_never_cut_by_bare_429s(throttle: EndpointThrottle, clock: Clock) -> None:
    told = ApiLimits(requests_per_second=16)
    starts = []
    for n in range(64):  # one request in four refused, without a wait
        admission = start(throttle, told)
        starts.append(clock.now)
        admission.answered(429 if n % 4 == 0 else 200, httpx.Headers())

    gaps = [b - a for a, b in pairwise(starts)]
    assert min(gaps) == pytest.approx(1 / 16) and max(gaps) == pytest.approx(1 / 16)


def test_a_told_rate_waits_out_a_hold_then_goes_on_at_its_pace(
    throttle: EndpointThrottle, clock: Clock
) -> None:
    told = ApiLimits(requests_per_second=16)
    start(throttle, told).answered(429, httpx.Headers({"Retry-After": "2"}))
    held_from = clock.now

    start(throttle, told)
    assert clock.now == pytest.approx(held_from + 2)
    starts = send(throttle, clock, 1.0, every=0.0, limits=told)

    assert starts[0] == pytest.approx(held_from + 2 + 1 / 16)
    gaps = [b - a for a, b in pairwise(starts)]
    assert max(gaps) == pytest.approx(1 / 16) and min(gaps) == pytest.approx(1 / 16)


# --- what the headers say ---------------------------------------------------------------


@pytest.mark.parametrize(
    "remaining",
    ["x-ratelimit-remaining", "x-ratelimit-requests-remaining", "x-ratelimit-remaining-requests"],
)
def test_a_spent_window_stops_growth_without_a_cut(
    throttle: EndpointThrottle, clock: Clock, remaining: str
) -> None:
    send(throttle, clock, 3.0, every=1 / 20)
    refuse(throttle, {"Retry-After": "0"})
    send(throttle, clock, 5.0, every=1 / 10)  # the learned rate climbs past what is sent
    assert rate(throttle) > 12

    start(throttle).answered(200, httpx.Headers({remaining: "0"}))

    stopped = rate(throttle)
    assert 9 < stopped < 11  # what the API accepted since the cut, not 90% of it
    clock.now += 1.0
    assert rate(throttle) == pytest.approx(stopped, rel=0.005)  # no climb back, a plateau


def test_a_reset_time_on_a_success_is_not_a_wait(throttle: EndpointThrottle, clock: Clock) -> None:
    """OpenAI's reset header says when the window ends, on every answer: after a success
    it must not hold the endpoint."""
    start(throttle).answered(200, httpx.Headers({"x-ratelimit-reset-requests": "6m0s"}))
    before = clock.now

    start(throttle)

    assert clock.now == before


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"x-ratelimit-reset-requests": "1.5s"}, 1.5),
        ({"x-ratelimit-reset-requests": "120ms"}, 0.12),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
        ({"x-ratelimit-requests-reset": "2"}, 2.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 60.0),  # capped
    ],
)
def test_a_429_holds_for_what_its_headers_say(
    throttle: EndpointThrottle, clock: Clock, headers: dict[str, str], wait: float
) -> None:
    refuse(throttle, headers)
    before = clock.now

    start(throttle)

    assert clock.now - before == pytest.approx(wait)
