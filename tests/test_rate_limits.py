"""The API kept as busy as the plan allows and no busier: told the rate, or learning it
from 429s and the rate-limit headers of RapidAPI and OpenAI.

The throttle's arithmetic is tested on a clock of the test's own in `test_throttle.py`.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
from prefect_aws import S3Bucket

from prefect_gpt_image import OpenAICredentials, RapidAPICredentials, generate_images
from prefect_gpt_image._rate_limit_headers import (
    duration_seconds,
    retry_after_seconds,
    window_spent,
)
from prefect_gpt_image.testing import GptImageEmulator


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
        prompts,
        bucket=bucket,
        credentials=credentials,
        limits={"max_concurrency": 8, "requests_per_second": 5},
    )

    assert len(report.images) == 20
    assert limited_api.rate_limited == 0
    assert limited_api.billed == 20


@pytest.mark.parametrize("protocol", ["rapidapi", "openai"])
@pytest.mark.parametrize("headers", [True, False], ids=["with-headers", "429s-alone"])
def test_a_flow_not_told_learns_the_rate(
    headers: bool,
    protocol: str,
    limited_api: GptImageEmulator,
    credentials: RapidAPICredentials,
    openai_credentials: OpenAICredentials,
    bucket: S3Bucket,
) -> None:
    """Eight at once meet a burst of five: three 429s, then the flow paces itself, whether
    the headers are RapidAPI's (reset in seconds) or OpenAI's (reset as a duration, sent
    with every success too: there it is not a wait)."""
    limited_api.rate_limit_headers = headers
    prompts = [f"a learning lapwing #{n}" for n in range(30)]
    creds = credentials if protocol == "rapidapi" else openai_credentials

    report = generate_images(
        prompts, bucket=bucket, credentials=creds, limits={"max_concurrency": 8}
    )

    assert len(report.images) == 30 and limited_api.billed == 30
    # Unpaced, the later rounds would meet 429s too: 8 in flight, 5 allowed a second.
    assert 1 <= limited_api.rate_limited <= 6


# --- the headers ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("120ms", 0.12),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("0s", 0.0),
        ("1m30s", 90.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("5ns", 5e-9),
        (".5s", 0.5),
        (" 20ms ", 0.02),
        ("12", 12.0),  # a bare number is seconds
        ("", None),
        ("s", None),
        ("1", 1.0),
        ("-1s", None),
        ("1x", None),
        ("1s2", None),
        ("1 s", None),
        ("soon", None),
        ("inf", None),
        ("nan", None),
    ],
)
def test_durations(text: str, seconds: float | None) -> None:
    assert duration_seconds(text) == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "1500", "Retry-After": "2"}, 1.5),
        ({"retry-after-ms": "later", "Retry-After": "2"}, 2.0),
        ({"x-ratelimit-requests-reset": "12"}, 12.0),
        ({"X-RateLimit-Reset": "5"}, 5.0),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "120ms"}, 0.12),
        ({"Retry-After": "1", "x-ratelimit-reset-requests": "6m0s"}, 1.0),
        ({"Retry-After": "soon", "x-ratelimit-reset-requests": "1.5s"}, 1.5),
        ({"x-ratelimit-requests-reset": "nan", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"x-ratelimit-reset-requests": "soon"}, None),
        ({"x-ratelimit-requests-reset": "-1"}, None),
        ({}, None),
    ],
)
def test_how_long_the_server_asked_to_wait(headers: dict[str, str], seconds: float | None) -> None:
    """Uncapped here: the throttle's hold caps it."""
    expected = None if seconds is None else pytest.approx(seconds)
    assert retry_after_seconds(httpx.Headers(headers)) == expected


def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    wait = retry_after_seconds(httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)}))
    assert wait is not None and 27 <= wait <= 30


@pytest.mark.parametrize(
    ("headers", "spent"),
    [
        ({"x-ratelimit-remaining": "0"}, True),
        ({"x-ratelimit-requests-remaining": "0"}, True),
        ({"X-RateLimit-Remaining-Requests": " 0 "}, True),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-requests-remaining": "0"}, True),
        ({"x-ratelimit-remaining-requests": "1"}, False),
        ({"x-ratelimit-remaining-tokens": "0"}, False),
        ({"x-ratelimit-reset-requests": "0s"}, False),
        ({}, False),
    ],
)
def test_a_spent_window(headers: dict[str, str], spent: bool) -> None:
    assert window_spent(httpx.Headers(headers)) is spent
