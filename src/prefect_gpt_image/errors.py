"""Error types.

Every error says what went wrong and what the user can do about it, and carries
`retryable`: the one fact the retry policy needs. No error text ever includes the
API key.
"""

from __future__ import annotations


class GptImageError(Exception):
    """Base class for every error this package raises."""

    retryable: bool = False
    stops_batch: bool = False
    """True where every other request of the batch would fail the same way."""
    billed: bool = False
    """True where the API answered, and charged, before the failure (a broken answer,
    an image that could not be downloaded)."""
    paid_calls: int = 0
    """Charged answers the failed task run made, over all its attempts."""


class InvalidRequestError(GptImageError, ValueError):
    """Input refused before any paid call: a bad prompt, size, prefix or prompt file."""


class ConfigurationError(GptImageError):
    """The integration is not configured: no API key, an unknown block name."""


# --- The generation API ---------------------------------------------------------------


class APIError(GptImageError):
    """The API (or RapidAPI's gateway in front of it) answered with an error."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class AuthenticationError(APIError):
    """401: RapidAPI rejected the key."""

    stops_batch = True


class NotSubscribedError(APIError):
    """403: the key is valid but its RapidAPI app is not subscribed to this API."""

    stops_batch = True


class EndpointNotFoundError(APIError):
    """404: the host or path does not name an API; typically a retired model."""

    stops_batch = True


class PromptRejectedError(APIError):
    """400: the model refused the prompt (content policy)."""


class BadRequestError(APIError):
    """400/422: the API found the request malformed."""


class QuotaExceededError(APIError):
    """429 for a spent daily or monthly quota: retrying cannot help and may incur overage."""

    stops_batch = True


class RateLimitedError(APIError):
    """429 for a per-second or per-minute rate limit: retry after the advised delay."""

    retryable = True

    def __init__(self, message: str, *, status_code: int = 429, retry_after: float | None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx from the API or the gateway: usually transient."""

    retryable = True

    def __init__(self, message: str, *, status_code: int, retry_after: float | None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class APITimeoutError(GptImageError):
    """The API did not answer in time: retried, since the next attempt may be quicker."""

    retryable = True


class APIConnectionError(GptImageError):
    """The API could not be reached at all."""

    retryable = True


class InvalidResponseError(GptImageError):
    """A 200 answer that holds no usable image: no JSON, no URL, an expired URL.

    Retryable: the API gives no way to fetch that image again, so the only way to
    an image is another generation.
    """

    retryable = True


class InvalidImageError(GptImageError):
    """The downloaded bytes are not a PNG, JPEG or WebP image, or are too large."""


class UnsafeImageURLError(GptImageError):
    """The API pointed at an address this machine should not fetch from.

    Image URLs come from the API, so they are untrusted: a URL into a private
    network or a cloud metadata service is refused, not retried.
    """


# --- Storage --------------------------------------------------------------------------


class StorageError(GptImageError):
    """S3 refused or failed an operation."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class BudgetExceededError(GptImageError):
    """The batch would spend, or has spent, the flow's `max_cost_usd`."""

    stops_batch = True


class BatchFailedError(GptImageError):
    """More prompts failed than the flow's `allow_failures` permits.

    Raised after every good image and the manifest are stored; `report` holds them.
    """

    def __init__(self, message: str, report: object) -> None:
        super().__init__(message)
        self.report = report
