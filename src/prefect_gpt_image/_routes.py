"""The route rules, in one place: what a route is to the package, which routes may serve a
request, and which a run still uses (fallback), and why the others were dropped.

A route is a credentials block (`prefect_gpt_image.blocks`): a provider's endpoint, its key
and the model behind it. The package speaks to it only through `Route`, a protocol the
blocks meet, so that nothing below the blocks imports them.

A route is dropped for the rest of the run when it says the model is not there or
retired, rejects the key, says the quota or credit is spent, or stays down through the
whole retry budget; that request, and every later one, goes to the next route. A prompt
refused for its content is not sent elsewhere: it would be refused there too, and may be
billed.

The book is kept per flow run and per process: workers in other processes each learn a
dead route for themselves, at the cost of a call or two.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, TypeGuard

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from pydantic import SecretStr

from prefect_gpt_image._events import ROUTE_DROPPED, emit
from prefect_gpt_image._retry_policy import DOWN_AFTER_FAILURES, PAID_FAILURES_BEFORE_BREAKING
from prefect_gpt_image._run_scope import RunScoped
from prefect_gpt_image.errors import (
    ConfigurationError,
    GptImageError,
    InvalidRequestError,
    NoRouteLeftError,
    PaidFailuresError,
    RateLimitedError,
)
from prefect_gpt_image.model_table import check_batch_api

if TYPE_CHECKING:
    from prefect_gpt_image._client import (
        AsyncGenerationClient,
        GenerationClient,
        OpenAIClient,
        RapidAPIClient,
    )
    from prefect_gpt_image.model_table import ModelSpec
    from prefect_gpt_image.models import ImageRequest


class Route(Protocol):
    """What the package needs of a route; `blocks.GptImageRoute` documents each member."""

    has_batch_api: ClassVar[bool]

    @property
    def api_key(self) -> SecretStr: ...
    @property
    def model(self) -> str: ...
    @property
    def models(self) -> dict[str, ModelSpec]: ...
    @property
    def default_extras(self) -> dict[str, Any]: ...
    @property
    def timeout_seconds(self) -> float: ...
    @property
    def max_image_bytes(self) -> int: ...
    @property
    def endpoint_url(self) -> str: ...
    @property
    def shown_url(self) -> str: ...
    @property
    def route_name(self) -> str: ...
    @property
    def can_edit(self) -> bool: ...
    def model_spec(self) -> ModelSpec: ...
    def check_request(self, request: ImageRequest) -> None: ...
    def lacks(self, request: ImageRequest) -> str | None: ...
    def cache_identity(self) -> dict[str, Any]: ...
    def get_client(self) -> GenerationClient: ...
    def get_async_client(self) -> AsyncGenerationClient: ...


class RapidAPIRoute(Route, Protocol):
    """A route to NexaAPI's endpoint on RapidAPI (`blocks.RapidAPICredentials`)."""

    @property
    def api_host(self) -> str: ...
    def get_client(self) -> RapidAPIClient: ...


class OpenAIRoute(Route, Protocol):
    """A route that speaks the OpenAI protocol (`blocks.OpenAICredentials`)."""

    @property
    def base_url(self) -> str: ...
    @property
    def auth_header(self) -> Literal["authorization", "api-key"]: ...
    @property
    def organization(self) -> str | None: ...
    @property
    def project(self) -> str | None: ...
    @property
    def batch_max_requests(self) -> int: ...
    @property
    def batch_max_file_bytes(self) -> int: ...
    def get_client(self) -> OpenAIClient: ...


def has_batch_api(route: Route) -> TypeGuard[OpenAIRoute]:
    """Whether `route`'s provider has OpenAI's Batch API (only OpenAI-protocol routes do)."""
    return route.has_batch_api


def serving_routes(request: ImageRequest, routes: Sequence[Route]) -> list[Route]:
    """The routes that may serve `request`, in order: those that have all it needs (an
    edit, a field its model takes). A route that lacks it is never given it; with none
    left, the request is refused before anything is paid."""
    able = [route for route in routes if route.lacks(request) is None]
    if able:
        return able
    if request.is_edit and not any(route.can_edit for route in routes):
        names = ", ".join(route.route_name for route in routes)
        raise InvalidRequestError(
            f"No route given can edit images ({names}): RapidAPI's endpoint only "
            "generates. Add an OpenAICredentials route (OpenAI, Azure OpenAI or a gateway) "
            "whose model edits."
        )
    reasons = "; ".join(str(route.lacks(request)) for route in routes)
    raise InvalidRequestError(f"No route given can serve this request: {reasons}.")


def batch_api_route(routes: Sequence[Route], requests: Sequence[ImageRequest]) -> OpenAIRoute:
    """The route a run with `batch` on sends through: OpenAI's Batch API is the first
    route's, which must speak the OpenAI protocol and whose model the Batch API takes;
    batches hold generations only."""
    route = routes[0]
    if not has_batch_api(route):
        raise ConfigurationError(
            f"batch sends through OpenAI's Batch API, which the route {route.route_name} "
            "does not have: give an OpenAICredentials block as the first credentials, or "
            "turn batch off."
        )
    if any(request.is_edit for request in requests):
        raise InvalidRequestError(
            "OpenAI's Batch API takes generations only: run the edits with batch off."
        )
    check_batch_api(route.model, route.model_spec(), route.models)
    return route


def route_id(route: Route) -> str:
    """A route's identity in the book: its endpoint, model and key (as given, so that two
    blocks that differ only by name are one route)."""
    return f"{route.endpoint_url} {route.model} {hash(route.api_key.get_secret_value())}"


class RouteBook:
    """The routes one run has dropped, and the failures in a row of the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dropped: dict[str, tuple[str, BaseException]] = {}
        self._failures: dict[str, int] = {}
        self._paid_failures: dict[str, int] = {}

    def live(self, routes: Sequence[Route]) -> list[Route]:
        with self._lock:
            return [route for route in routes if route_id(route) not in self._dropped]

    def is_live(self, route: Route) -> bool:
        with self._lock:
            return route_id(route) not in self._dropped

    def succeeded(self, route: Route) -> None:
        with self._lock:
            self._failures.pop(route_id(route), None)
            self._paid_failures.pop(route_id(route), None)

    def failed(self, route: Route, error: GptImageError, *, fallback: bool) -> bool:
        """Record a failure; True if it drops the route (the request moves on). The run's
        log says so once, whichever request met it first. Being down drops a route only
        when there is a `fallback` to go to: with none, the retry policy goes on as it
        would, and a rate limit is never "down"."""
        key = route_id(route)
        with self._lock:
            if error.billed:
                paid = self._paid_failures[key] = self._paid_failures.get(key, 0) + 1
                if paid >= PAID_FAILURES_BEFORE_BREAKING:
                    error = PaidFailuresError(
                        f"{paid} answers in a row from {route.route_name} were charged but held "
                        f"no usable image, so this run stops paying it. The last: {error}"
                    )
            if not error.drops_route:
                if not (fallback and error.retryable) or isinstance(error, RateLimitedError):
                    return False
                self._failures[key] = self._failures.get(key, 0) + 1
                if self._failures[key] < DOWN_AFTER_FAILURES:
                    return False
            if key in self._dropped:  # by another request meanwhile, which said so
                return True
            self._dropped[key] = (route.route_name, error)
        _run_logger().warning(
            "Dropped the route %s (%s) for the rest of this run: %s",
            route.route_name,
            route.model,
            error,
        )
        emit(
            ROUTE_DROPPED,
            {
                "route": route.route_name,
                "model": route.model,
                "reason": str(error),
                "error_type": type(error).__name__,
                "fallback": fallback,
            },
        )
        return True

    def exhausted(self, routes: Sequence[Route]) -> GptImageError:
        """The error when no route is left: the route's own for one, else one message
        that names each route and why it was dropped."""
        with self._lock:
            reasons = [self._dropped[route_id(r)] for r in routes if route_id(r) in self._dropped]
        if len(reasons) == 1 and isinstance(reasons[0][1], GptImageError):
            return reasons[0][1]
        listed = "; ".join(f"{name}: {type(error).__name__}: {error}" for name, error in reasons)
        return NoRouteLeftError(f"Every route was dropped. {listed}")


def _run_logger() -> logging.Logger | logging.LoggerAdapter[Any]:
    """The logger of the current task or flow run, whose lines reach the run's page; a
    book used outside any run logs to this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


_books: RunScoped[RouteBook] = RunScoped(RouteBook)


def route_book() -> RouteBook:
    """The book of the current flow run (a task run alone has one of its own)."""
    return _books.get()
