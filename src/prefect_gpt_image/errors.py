"""Error types.

Every error says what went wrong and what the user can do about it, and carries
`retryable`: the one fact the retry policy needs. No error text ever includes the
API key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prefect_gpt_image._charges import NO_CHARGES, Charges

if TYPE_CHECKING:
    from prefect_gpt_image.models import RunReport


class GptImageError(Exception):
    """Base class for every error this package raises."""

    retryable: bool = False
    drops_route: bool = False
    """True where every other request to the same route would fail the same way: the run
    goes on through the next route, if there is one."""
    stops_run: bool = False
    """True where every other request of the run would fail the same way."""
    charges: Charges = NO_CHARGES
    """What the failed call was charged, set where its answer was read: a broken answer
    or an image that could not be downloaded is charged; a call that timed out after it
    was sent may be."""

    @property
    def billed(self) -> bool:
        """Whether the API answered, and charged, before the failure."""
        return self.charges.calls > 0

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle without calling `__init__` again: subclasses take keyword-only fields,
        which `Exception`'s own pickling would drop, so a Dask worker or a process pool
        could not hand the error back. The fields travel in `__dict__`."""
        return _rebuild, (type(self), self.args), self.__dict__


def _rebuild(cls: type[GptImageError], args: tuple[Any, ...]) -> GptImageError:
    """An error of `cls` with `args`, its fields to be restored by unpickling."""
    error = cls.__new__(cls, *args)
    error.args = args
    return error


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
    """401: the provider rejected the key."""

    drops_route = True
    stops_run = True


class AccessDeniedError(APIError):
    """403: the key is valid but may not use this API or model."""

    drops_route = True
    stops_run = True


class NotSubscribedError(AccessDeniedError):
    """403: the key is valid but its RapidAPI app is not subscribed to this API."""


class EndpointNotFoundError(APIError):
    """404: the host or path does not name an API; typically a retired model."""

    drops_route = True
    stops_run = True


class ModelNotFoundError(EndpointNotFoundError):
    """404 `model_not_found` or 410: the route does not serve the model, or retired it."""


class PromptRejectedError(APIError):
    """400: the model refused the prompt (content policy)."""


class BadRequestError(APIError):
    """400/422: the API found the request malformed."""


class QuotaExceededError(APIError):
    """429 for a spent quota (`insufficient_quota`), or 402: a billing problem that
    retrying cannot help, and may incur overage."""

    drops_route = True
    stops_run = True


class RouteDroppedError(GptImageError):
    """The route was dropped while the request waited for its turn: it was not called."""

    drops_route = True


class PaidFailuresError(GptImageError):
    """Charged answers in a row held no usable image: the route is not paid again this run."""

    drops_route = True
    stops_run = True


class NoRouteLeftError(GptImageError):
    """Every route of the request was dropped; the message names each, and why."""

    drops_route = True
    stops_run = True


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


class BatchNotDoneError(GptImageError):
    """An OpenAI batch ended (expired, cancelled, refused) without answering the request.

    The next run sends it again: nothing was charged for it.
    """


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
    """The run would spend, or has spent, the flow's `max_cost_usd`."""

    stops_run = True


class RunFailedError(GptImageError):
    """More prompts failed than the flow's `allow_failures` permits.

    Raised after every good image and the manifest are stored; `report` holds them.
    """

    def __init__(self, message: str, report: RunReport) -> None:
        super().__init__(message)
        self.report = report


class ReviewTimeoutError(GptImageError):
    """No review decision came in time: nothing was published, and every image is kept.

    Its message says how to publish later, from the run's manifest.
    """
