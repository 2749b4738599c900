"""The API kept as busy as the plan allows and no busier: told the rate, or learning it."""

from __future__ import annotations

import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image import RapidAPICredentials, generate_images
from prefect_gpt_image.testing import GptImageEmulator
from prefect_gpt_image.throttle import EndpointThrottle


@pytest.fixture
def limited_api(api: GptImageEmulator) -> GptImageEmulator:
    """An API that allows 5 requests a second (bursts of 5), at 0.2 s a generation."""
    api.rate_limit, api.latency = 5, 0.2
    return api


def test_a_flow_told_the_rate_is_never_refused(
    limited_api: GptImageEmulator, credentials: RapidAPICredentials, bucket: S3Bucket
) -> None:
    prompts = [f"a punctual puffin #{n}" for n in range(20)]

    report = generate_images(
        prompts, bucket=bucket, credentials=credentials, max_concurrency=8, requests_per_second=5
    )

    assert len(report.images) == 20
    assert limited_api.rate_limited == 0
    assert limited_api.billed == 20


@pytest.mark.parametrize("headers", [True, False], ids=["with-headers", "429s-alone"])
def test_a_flow_not_told_learns_the_rate(
    headers: bool,
    limited_api: GptImageEmulator,
    credentials: RapidAPICredentials,
    bucket: S3Bucket,
) -> None:
    """Eight at once meet a burst of five: three 429s, then the flow paces itself."""
    limited_api.rate_limit_headers = headers
    prompts = [f"a learning lapwing #{n}" for n in range(30)]

    report = generate_images(prompts, bucket=bucket, credentials=credentials, max_concurrency=8)

    assert len(report.images) == 30 and limited_api.billed == 30
    # Unpaced, the later rounds would meet 429s too: 8 in flight, 5 allowed a second.
    assert 1 <= limited_api.rate_limited <= 6


def test_a_hold_is_not_mistaken_for_a_slow_api() -> None:
    """After a Retry-After hold, the second before the next request is nearly empty: a 429
    then cuts the learned rate from where it was, not down to that empty second."""
    throttle = EndpointThrottle()
    admissions = []
    for _ in range(8):  # eight at once: seven accepted, the last refused
        with throttle.admit() as admission:
            admissions.append(admission)
    admissions[-1].answered(429, {})
    learned = throttle.rate()
    assert learned is not None and 6 < learned < 7  # 0.9 x the seven accepted

    throttle.hold(1.2)
    with throttle.admit() as after_hold:
        after_hold.answered(429, {})

    rate = throttle.rate()
    assert rate is not None and 0.85 * learned < rate < learned


def test_a_burst_is_cut_once() -> None:
    """Sixteen requests at once, the last refused: the rate falls to just under the fifteen
    accepted. The first request's refusal, answered later, speaks of the same burst (and
    of a second that held only itself): it changes nothing."""
    throttle = EndpointThrottle()
    admissions = []
    for _ in range(16):
        with throttle.admit() as admission:
            admissions.append(admission)
    admissions[-1].answered(429, {})
    learned = throttle.rate()
    assert learned is not None and 13 < learned < 14

    admissions[0].answered(429, {})

    rate = throttle.rate()
    assert rate is not None and learned <= rate < 1.01 * learned
