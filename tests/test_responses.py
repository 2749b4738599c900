"""Reading the API's answers: every shape an image may come in, every error status."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from prefect_gpt_image._responses import (
    ImageReference,
    error_for_openai_response,
    error_for_response,
    find_image,
    parse_json,
)
from prefect_gpt_image._retry_policy import is_retryable
from prefect_gpt_image.errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    EndpointNotFoundError,
    InvalidResponseError,
    ModelNotFoundError,
    NotSubscribedError,
    PromptRejectedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
)

URL = "https://cdn.example.com/img/abc.png"
PNG = b"\x89PNG\r\n\x1a\nfake image bytes"
B64 = base64.b64encode(PNG).decode()


@pytest.mark.parametrize(
    "payload",
    [
        {"url": URL},
        {"images": [{"url": URL}]},
        {"images": [URL]},
        {"output": [URL]},
        {"data": [{"url": URL}]},
        {"status": "succeeded", "result": {"images": [{"url": URL}]}},
    ],
)
def test_find_image_finds_the_url(payload: Any) -> None:
    assert find_image(payload) == ImageReference(url=URL)


@pytest.mark.parametrize(
    "payload",
    [
        {"data": [{"b64_json": B64}]},
        f"data:image/png;base64,{B64}",
        {"image": f"data:image/png;base64,{B64}"},
    ],
)
def test_find_image_decodes_inline_images(payload: Any) -> None:
    found = find_image(payload)
    assert found.data is not None
    assert (found.data.decoded(), found.data.size) == (PNG, len(PNG))


@pytest.mark.parametrize(
    ("payload", "shape"),
    [
        ({"status": "succeeded"}, '{"status": string}'),
        ({"images": []}, '{"images": []}'),
        ({"url": "ftp://cdn.example.com/img.png"}, '{"url": string}'),
        ({"images": ["javascript:alert(1)"]}, '{"images": [string]}'),
        ({"output": ["/relative/path.png"]}, '{"output": [string]}'),
    ],
)
def test_find_image_without_an_image_shows_the_shape_never_the_values(
    payload: Any, shape: str
) -> None:
    with pytest.raises(InvalidResponseError) as raised:
        find_image(payload)
    assert str(raised.value) == f"The API answered 200 but with no image in it: {shape}"
    assert is_retryable(raised.value)


def test_find_image_preview_is_cut_at_200_characters() -> None:
    payload = {f"field_{n:02}": "secret-value" for n in range(40)}
    with pytest.raises(InvalidResponseError, match=r"\.\.\.$") as raised:
        find_image(payload)
    assert "secret-value" not in str(raised.value)
    assert len(str(raised.value)) <= len("The API answered 200 but with no image in it: ") + 203


@pytest.mark.parametrize(
    "payload", [{"data": [{"b64_json": "not base64!"}]}, "data:image/png;base64,@@@@"]
)
def test_find_image_rejects_invalid_base64(payload: Any) -> None:
    found = find_image(payload)
    assert found.data is not None
    with pytest.raises(
        InvalidResponseError, match=r"^The API's inline image is not valid base64\.$"
    ):
        found.data.decoded()


def test_parse_json_describes_a_non_json_body_without_quoting_it() -> None:
    with pytest.raises(InvalidResponseError) as raised:
        parse_json(b"<html>upstream busy</html>")
    assert str(raised.value) == (
        "The API answered 200 with a body that is not JSON (26 bytes, an HTML page)."
    )


def test_parse_json_reads_json() -> None:
    assert parse_json(b'{"url": "https://x.example/a.png"}') == {"url": "https://x.example/a.png"}


# What each error's message opens with, and whether retrying can help.
FIRST_SENTENCE: dict[type[APIError], tuple[str, bool]] = {
    AuthenticationError: ("RapidAPI rejected the API key ({})", False),
    NotSubscribedError: ("The API key is not subscribed to this API ({})", False),
    EndpointNotFoundError: ("No API answers at this host and path ({})", False),
    QuotaExceededError: ("The RapidAPI plan's quota is spent ({})", False),
    RateLimitedError: ("Rate limited by RapidAPI ({})", True),
    ServerError: ("The API or RapidAPI's gateway failed ({})", True),
    PromptRejectedError: ("The model refused the prompt ({})", False),
    BadRequestError: ("The API refused the request ({})", False),
}


@pytest.mark.parametrize(
    ("status", "body", "error_type"),
    [
        (401, b'{"message": "Invalid API key."}', AuthenticationError),
        (403, b'{"message": "You are not subscribed to this API."}', NotSubscribedError),
        (404, b'{"message": "Endpoint does not exist"}', EndpointNotFoundError),
        (429, b'{"message": "You have exceeded the MONTHLY quota"}', QuotaExceededError),
        (429, b'{"message": "Too many requests"}', RateLimitedError),
        (500, b'{"error": {"message": "internal error"}}', ServerError),
        (502, b"Bad Gateway", ServerError),
        (503, b'{"detail": "overloaded"}', ServerError),
        (504, b"", ServerError),
        (400, b'{"error": {"message": "Rejected by the safety system"}}', PromptRejectedError),
        (400, b'{"error": "content_policy_violation"}', PromptRejectedError),
        (422, b'{"detail": "violates our usage policy"}', PromptRejectedError),
        (400, b'{"error": {"message": "Invalid size 13x13"}}', BadRequestError),
        (422, b'{"detail": "quality must be low, medium or high"}', BadRequestError),
    ],
)
def test_error_for_response_maps_status_to_error(
    status: int, body: bytes, error_type: type[APIError]
) -> None:
    error = error_for_response(status, httpx.Headers(), body)
    first_sentence, retryable = FIRST_SENTENCE[error_type]
    assert type(error) is error_type
    assert error.status_code == status
    assert is_retryable(error) is retryable
    assert str(error).startswith(first_sentence.format(status) + ".")


@pytest.mark.parametrize(
    ("body", "said"),
    [
        (b'{"message": "Invalid API key."}', "Invalid API key."),
        (b'{"error": {"code": "invalid_size"}}', "invalid_size"),
        (b'{"detail": "overloaded"}', "overloaded"),
        (b"plain   text\n error", "plain text error"),
    ],
)
def test_error_message_quotes_the_api(body: bytes, said: str) -> None:
    assert str(error_for_response(400, httpx.Headers(), body)).endswith(f" The API said: {said}")


def test_gateway_html_page_is_reduced_to_its_title() -> None:
    page = (
        b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title><style>body{}</style>"
        b"</head><body><h1>502 Bad Gateway</h1><hr><center>nginx</center></body></html>"
    )
    error = error_for_response(502, httpx.Headers(), page)
    assert str(error) == (
        "The API or RapidAPI's gateway failed (502). The API said: 502 Bad Gateway"
    )


def test_error_message_never_quotes_a_whole_body() -> None:
    error = error_for_response(500, httpx.Headers(), b'{"message": "' + b"x" * 1000 + b'"}')
    assert str(error).endswith(" The API said: " + "x" * 300)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"x-ratelimit-requests-reset": "12"}, 12.0),
        ({"X-RateLimit-Reset": "5"}, 5.0),
        ({"Retry-After": "soon", "x-ratelimit-requests-reset": "4"}, 4.0),
        ({"x-ratelimit-requests-reset": "-1"}, None),
        ({"x-ratelimit-requests-reset": "nan"}, None),
        ({}, None),
    ],
)
def test_rate_limited_retry_after(headers: dict[str, str], expected: float | None) -> None:
    error = error_for_response(429, httpx.Headers(headers), b'{"message": "Too many requests"}')
    assert isinstance(error, RateLimitedError)
    assert error.retry_after == expected


def test_retry_after_as_an_http_date() -> None:
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    headers = httpx.Headers({"Retry-After": format_datetime(when, usegmt=True)})
    error = error_for_response(429, headers, b"")
    assert isinstance(error, RateLimitedError)
    assert error.retry_after is not None
    assert 27 <= error.retry_after <= 30


def test_server_error_carries_retry_after() -> None:
    error = error_for_response(503, httpx.Headers({"Retry-After": "2"}), b"")
    assert isinstance(error, ServerError)
    assert error.retry_after == 2.0


# --- The OpenAI protocol: OpenAI's shapes, Azure OpenAI's and gateways' --------------------


def _openai_body(code: object, message: str, kind: object = None, **more: Any) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code, **more}}).encode()


_LITELLM_QUOTA = (
    "litellm.RateLimitError: RateLimitError: OpenAIException - You exceeded your current "
    "quota, please check your plan and billing details."
)
_AZURE_RATE_LIMIT = (
    "Requests to the ImageGenerations_Create Operation under Azure OpenAI API version "
    "2025-04-01-preview have exceeded call rate limit of your current OpenAI S0 pricing tier. "
    "Please retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you "
    "would like to further increase the default rate limit."
)
_AZURE_FILTER = {"code": "ResponsibleAIPolicyViolation", "content_filter_results": {}}


@pytest.mark.parametrize(
    ("status", "body", "error_type"),
    [
        # OpenAI
        (
            429,
            _openai_body("insufficient_quota", "You exceeded your current quota."),
            QuotaExceededError,
        ),
        (
            429,
            _openai_body("rate_limit_exceeded", "Rate limit reached.", "requests"),
            RateLimitedError,
        ),
        (
            400,
            _openai_body("moderation_blocked", "Rejected.", "image_generation_user_error"),
            PromptRejectedError,
        ),
        (404, _openai_body("model_not_found", "The model `x` does not exist."), ModelNotFoundError),
        (
            401,
            _openai_body("invalid_api_key", "Incorrect API key provided: sk-***."),
            AuthenticationError,
        ),
        (
            400,
            _openai_body("invalid_value", "Invalid size '13x13'.", param="size"),
            BadRequestError,
        ),
        # Azure OpenAI
        (
            400,
            _openai_body(
                "contentFilter",
                "Your task failed as a result of our safety system.",
                inner_error=_AZURE_FILTER,
            ),
            PromptRejectedError,
        ),
        (400, _openai_body(None, "Filtered.", innererror=_AZURE_FILTER), PromptRejectedError),
        (
            400,
            _openai_body(
                "content_filter",
                "The response was filtered due to the prompt triggering Azure OpenAI's content "
                "management policy.",
            ),
            PromptRejectedError,
        ),
        (
            404,
            _openai_body(
                "DeploymentNotFound", "The API deployment for this resource does not exist."
            ),
            ModelNotFoundError,
        ),
        (429, _openai_body("429", _AZURE_RATE_LIMIT), RateLimitedError),
        (
            401,
            _openai_body("401", "Access denied due to invalid subscription key."),
            AuthenticationError,
        ),
        # LiteLLM: code is the status, type its own, the message OpenAI's behind a prefix
        (429, _openai_body("429", _LITELLM_QUOTA, "throttling_error"), QuotaExceededError),
        (
            429,
            _openai_body(
                "429",
                "No deployments available for selected model, Try again in 5 seconds. Passed "
                "model=gpt-image-2",
                "None",
            ),
            RateLimitedError,
        ),
        (
            400,
            _openai_body(
                "400",
                "{'error': '/images/generations: Invalid model name passed in model=image-gen.'}",
                "None",
            ),
            ModelNotFoundError,
        ),
        (
            400,
            _openai_body("400", "Authentication Error, No connected db.", "None"),
            AuthenticationError,
        ),
        (
            401,
            _openai_body(
                "401", "Authentication Error, Invalid proxy server token passed.", "auth_error"
            ),
            AuthenticationError,
        ),
        (
            400,
            _openai_body(
                "400",
                "litellm.ContentPolicyViolationError: litellm.ContentPolicyViolationError: "
                "OpenAIException - Your request was rejected by the safety system.",
                "None",
            ),
            PromptRejectedError,
        ),
        (
            400,
            _openai_body(
                "400",
                "Budget has been exceeded! Current cost: 10.2, Max budget: 10.0",
                "budget_exceeded",
            ),
            QuotaExceededError,
        ),
        (
            400,
            _openai_body("400", "litellm.BadRequestError: OpenAIException - Invalid size.", "None"),
            BadRequestError,
        ),
    ],
)
def test_openai_protocol_errors_are_read_from_every_signal(
    status: int, body: bytes, error_type: type[APIError]
) -> None:
    error = error_for_openai_response(status, httpx.Headers(), body, "gpt-image-2")
    assert type(error) is error_type, str(error)
    assert f"({status}, {status})" not in str(error)  # a gateway's code is only the status


def test_a_wait_named_only_in_the_message_is_honoured() -> None:
    litellm = _openai_body(
        "429", "No deployments available for selected model, Try again in 5 seconds."
    )
    azure = _openai_body("429", _AZURE_RATE_LIMIT)
    for body, wait in ((litellm, 5.0), (azure, 6.0)):
        error = error_for_openai_response(429, httpx.Headers(), body, "gpt-image-2")
        assert isinstance(error, RateLimitedError) and error.retry_after == wait
    with_header = error_for_openai_response(429, httpx.Headers({"retry-after": "2"}), azure, "m")
    assert isinstance(with_header, RateLimitedError) and with_header.retry_after == 2.0
