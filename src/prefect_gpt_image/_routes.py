"""Fallback between routes: which routes a run still uses, and why the others were dropped.

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
from typing import TYPE_CHECKING, Any

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

from prefect_gpt_image._events import ROUTE_DROPPED, emit
from prefect_gpt_image._retry_policy import GENERATION_RETRIES
from prefect_gpt_image._run_scope import RunScoped
from prefect_gpt_image.errors import (
    GptImageError,
    NoRouteLeftError,
    PaidFailuresError,
    RateLimitedError,
)

if TYPE_CHECKING:
    from prefect_gpt_image.blocks._route import GptImageRoute

DOWN_AFTER_FAILURES = GENERATION_RETRIES + 1
"""Retryable failures in a row, with no success between, after which a route is down: the
whole retry budget of one request."""
PAID_FAILURES_BEFORE_BREAKING = 3
"""Charged answers in a row that held no usable image, after which a route is not paid
again in this run: a systematic fault (every image URL answering 403, say) would otherwise
be paid for on every request and every retry."""


def route_id(route: GptImageRoute) -> str:
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

    def live(self, routes: Sequence[GptImageRoute]) -> list[GptImageRoute]:
        with self._lock:
            return [route for route in routes if route_id(route) not in self._dropped]

    def is_live(self, route: GptImageRoute) -> bool:
        with self._lock:
            return route_id(route) not in self._dropped

    def succeeded(self, route: GptImageRoute) -> None:
        with self._lock:
            self._failures.pop(route_id(route), None)
            self._paid_failures.pop(route_id(route), None)

    def failed(self, route: GptImageRoute, error: GptImageError, *, fallback: bool) -> bool:
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

    def exhausted(self, routes: Sequence[GptImageRoute]) -> GptImageError:
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
