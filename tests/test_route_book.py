"""The route book on its own, without a flow or a client: when a route is dropped, and what
a run is told when no route is left."""

from __future__ import annotations

import logging

import pytest

from prefect_gpt_image import OpenAICredentials
from prefect_gpt_image._charges import Charges
from prefect_gpt_image._retry_policy import DOWN_AFTER_FAILURES, PAID_FAILURES_BEFORE_BREAKING
from prefect_gpt_image._routes import RouteBook
from prefect_gpt_image.errors import (
    AuthenticationError,
    GptImageError,
    InvalidResponseError,
    NoRouteLeftError,
    PaidFailuresError,
    RateLimitedError,
    ServerError,
)

FIRST = OpenAICredentials(api_key="key-1", base_url="http://127.0.0.1:9/v1", model="gpt-image-2")
SECOND = OpenAICredentials(api_key="key-2", base_url="http://127.0.0.2:9/v1", model="gpt-image-2")


def down() -> ServerError:
    return ServerError("503", status_code=503, retry_after=None)


def paid_but_broken() -> InvalidResponseError:
    error = InvalidResponseError("The generated image's URL answered 403.")
    error.charges = Charges(calls=1, usd=0.03)
    return error


def test_a_rejected_key_drops_the_route_at_once() -> None:
    book = RouteBook()
    rejected = AuthenticationError("rejected the API key", status_code=401)

    assert book.failed(FIRST, rejected, fallback=True)

    assert book.live([FIRST, SECOND]) == [SECOND]
    assert not book.is_live(FIRST) and book.is_live(SECOND)
    assert book.exhausted([FIRST]) is rejected  # one route: its own error, as it was


def test_a_route_is_down_after_a_whole_retry_budget_in_a_row() -> None:
    book = RouteBook()
    for _ in range(DOWN_AFTER_FAILURES - 1):
        assert not book.failed(FIRST, down(), fallback=True)
    book.succeeded(FIRST)  # a success between starts the count again
    for _ in range(DOWN_AFTER_FAILURES - 1):
        assert not book.failed(FIRST, down(), fallback=True)

    assert book.failed(FIRST, down(), fallback=True)
    assert book.live([FIRST, SECOND]) == [SECOND]


def test_without_a_fallback_a_down_route_is_left_to_the_retry_policy() -> None:
    book = RouteBook()
    for _ in range(DOWN_AFTER_FAILURES * 2):
        assert not book.failed(FIRST, down(), fallback=False)
    assert book.live([FIRST]) == [FIRST]


def test_a_rate_limit_never_drops_a_route() -> None:
    book = RouteBook()
    for _ in range(DOWN_AFTER_FAILURES * 2):
        limited = RateLimitedError("429", retry_after=None)
        assert not book.failed(FIRST, limited, fallback=True)
    assert book.is_live(FIRST)


def test_paid_answers_without_an_image_stop_the_route_even_without_a_fallback() -> None:
    book = RouteBook()
    for _ in range(PAID_FAILURES_BEFORE_BREAKING - 1):
        assert not book.failed(FIRST, paid_but_broken(), fallback=False)

    assert book.failed(FIRST, paid_but_broken(), fallback=False)

    error = book.exhausted([FIRST])
    assert isinstance(error, PaidFailuresError)
    assert str(error).startswith(f"3 answers in a row from {FIRST.route_name} were charged")


def test_a_success_between_paid_failures_keeps_paying_the_route() -> None:
    book = RouteBook()
    for _ in range(3):
        for _ in range(PAID_FAILURES_BEFORE_BREAKING - 1):
            assert not book.failed(FIRST, paid_but_broken(), fallback=False)
        book.succeeded(FIRST)
    assert book.is_live(FIRST)


def test_with_every_route_dropped_one_message_names_each() -> None:
    book = RouteBook()
    book.failed(FIRST, AuthenticationError("rejected the API key", status_code=401), fallback=True)
    for _ in range(DOWN_AFTER_FAILURES):
        book.failed(SECOND, down(), fallback=True)

    error: GptImageError = book.exhausted([FIRST, SECOND])

    assert isinstance(error, NoRouteLeftError)
    assert str(error) == (
        f"Every route was dropped. {FIRST.route_name}: AuthenticationError: rejected the API "
        f"key; {SECOND.route_name}: ServerError: 503"
    )
    assert book.live([FIRST, SECOND]) == []


def test_a_dropped_route_is_told_once_however_many_requests_meet_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests in flight when a route goes each learn it was dropped; the run's log says
    so once."""
    book = RouteBook()
    with caplog.at_level(logging.WARNING, logger="prefect_gpt_image._routes"):
        for _ in range(4):
            rejected = AuthenticationError("rejected the API key", status_code=401)
            assert book.failed(FIRST, rejected, fallback=True)

    (told,) = [record.getMessage() for record in caplog.records]
    assert told.startswith(f"Dropped the route {FIRST.route_name} (gpt-image-2)")
    assert "rejected the API key" in told
