"""Fallback between routes: which routes a batch still uses, and why the others were dropped.

A route is dropped for the rest of the batch when it says the model is not there or
retired, rejects the key, says the quota or credit is spent, or stays down through the
whole retry budget; that request, and every later one, goes to the next route. A prompt
refused for its content is not sent elsewhere: it would be refused there too, and may be
billed.

The book is kept per flow run and per process: workers in other processes each learn a
dead route for themselves, at the cost of a call or two.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prefect.context import FlowRunContext, TaskRunContext

from prefect_gpt_image.errors import GptImageError, NoRouteLeftError, RateLimitedError
from prefect_gpt_image.retry_policy import GENERATION_RETRIES

if TYPE_CHECKING:
    from prefect_gpt_image.blocks._route import GptImageRoute

DOWN_AFTER_FAILURES = GENERATION_RETRIES + 1
"""Retryable failures in a row, with no success between, after which a route is down: the
whole retry budget of one request."""
BOOKS_KEPT = 64
"""Books of past flow runs kept in a long-lived process."""


def route_id(route: GptImageRoute) -> str:
    """A route's identity in the book: its endpoint, model and key (as given, so that two
    blocks that differ only by name are one route)."""
    return f"{route.endpoint_url} {route.model} {hash(route.api_key.get_secret_value())}"


class RouteBook:
    """The routes one batch has dropped, and the failures in a row of the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dropped: dict[str, tuple[str, BaseException]] = {}
        self._failures: dict[str, int] = {}

    def live(self, routes: Sequence[GptImageRoute]) -> list[GptImageRoute]:
        with self._lock:
            return [route for route in routes if route_id(route) not in self._dropped]

    def is_live(self, route: GptImageRoute) -> bool:
        with self._lock:
            return route_id(route) not in self._dropped

    def succeeded(self, route: GptImageRoute) -> None:
        with self._lock:
            self._failures.pop(route_id(route), None)

    def failed(self, route: GptImageRoute, error: GptImageError, *, fallback: bool) -> bool:
        """Record a failure; True if it drops the route (the request moves on). Being down
        drops a route only when there is a `fallback` to go to: with none, the retry
        policy goes on as it would, and a rate limit is never "down"."""
        key = route_id(route)
        with self._lock:
            if not error.drops_route:
                if not (fallback and error.retryable) or isinstance(error, RateLimitedError):
                    return False
                self._failures[key] = self._failures.get(key, 0) + 1
                if self._failures[key] < DOWN_AFTER_FAILURES:
                    return False
            self._dropped.setdefault(key, (route.route_name, error))
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


_books: OrderedDict[str, RouteBook] = OrderedDict()
_books_lock = threading.Lock()


def route_book() -> RouteBook:
    """The book of the current flow run (a task run alone has one of its own)."""
    task_context = TaskRunContext.get()
    flow_context = FlowRunContext.get()
    if task_context is not None and task_context.task_run.flow_run_id is not None:
        scope = str(task_context.task_run.flow_run_id)
    elif flow_context is not None and flow_context.flow_run is not None:
        scope = str(flow_context.flow_run.id)
    elif task_context is not None:
        scope = str(task_context.task_run.id)
    else:
        return RouteBook()
    with _books_lock:
        book = _books.get(scope)
        if book is None:
            book = _books[scope] = RouteBook()
            while len(_books) > BOOKS_KEPT:
                _books.popitem(last=False)
        return book
