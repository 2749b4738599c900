"""The money rules, in one place: what a call cost, the most a request can cost, and the
hard budget no paid attempt passes.

- Billing: a call's cost is the provider's usage priced at the model's token prices, when
  the answer reports usage; otherwise the model's price for that quality and size, times
  the images; otherwise the route's flat price (a route with one describes its model that
  way). Budgets price a request at its worst case: `auto` quality as the model's dearest,
  every image asked for, no input cached. OpenAI's Batch API charges half of all that.
- The budget: no paid attempt, first or retry, is sent unless its worst case fits. A run's
  `max_cost_usd` is a ledger per flow run. Before a call is sent, its worst case
  (`worst_case_cost`) is reserved; when the answer comes, the reservation becomes what the
  call cost. A call that timed out after it was sent keeps its reservation as "possibly
  charged": the provider may have finished it. An attempt whose reservation would pass the
  cap is not sent.

The budget also says what each task run was charged, over all its attempts: a broken answer
is charged, and so is the retry that replaces it. The task's result carries that total, and
the flow reads a failed task run's from here. It lives in the flow run's process: workers in
other processes (Dask) are held by the flow's own check when it submits (`within_cap`),
which counts each generation once. What was charged is recorded as `_charges.Charges`, a
leaf that errors and results carry too.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from prefect_gpt_image._charges import NO_CHARGES, Charges
from prefect_gpt_image._routes import serving_routes
from prefect_gpt_image._run_scope import RunScoped
from prefect_gpt_image.errors import BudgetExceededError, InvalidRequestError
from prefect_gpt_image.models import ImageRequest, Usage

if TYPE_CHECKING:
    from prefect_gpt_image._routes import Route
    from prefect_gpt_image.model_table import ModelSpec

PROMPT_CHARS_PER_TOKEN_AT_LEAST = 2
"""A prompt has at most one text token per this many characters: the worst case's bound."""
BATCH_PRICE_FACTOR = 0.5
"""What OpenAI's Batch API charges, as a share of the synchronous price."""
INPUT_IMAGE_TOKENS_AT_MOST = 6_240
"""The most image tokens one input of an edit (or its mask) is counted as, at high input
fidelity on the largest sizes: the worst case's bound."""


def call_cost(
    spec: ModelSpec, request: ImageRequest, images: int, usage: Usage | None, *, batch: bool = False
) -> float:
    """What one answered call cost, in USD; `batch`: answered through the Batch API."""
    cost = _synchronous_cost(spec, request, images, usage)
    return batch_price(cost) if batch else cost


def batch_price(usd: float) -> float:
    """What the Batch API charges for what costs `usd` synchronously."""
    return round(usd * BATCH_PRICE_FACTOR, 6)


def synchronous_cost(batch_cost: float) -> float:
    """What an answer the Batch API charged `batch_cost` for costs synchronously."""
    return round(batch_cost / BATCH_PRICE_FACTOR, 6)


def _synchronous_cost(
    spec: ModelSpec, request: ImageRequest, images: int, usage: Usage | None
) -> float:
    if usage is not None and spec.token_prices is not None and spec.flat_price_usd is None:
        prices = spec.token_prices
        text, image = usage.text_input_tokens, usage.image_input_tokens
        if text + image == 0:
            text = usage.input_tokens
        # Cached input is billed at its own price, where the model lists one.
        cached_text = min(usage.cached_text_input_tokens, text)
        cached_image = min(usage.cached_image_input_tokens, image)
        cost = (
            (text - cached_text) * prices.text_input
            + cached_text * _or(prices.cached_text_input, prices.text_input)
            + (image - cached_image) * prices.image_input
            + cached_image * _or(prices.cached_image_input, prices.image_input)
            + usage.output_tokens * prices.image_output
        ) / 1e6
        return round(cost, 6)
    price = spec.price_per_image(request.quality, request.width, request.height) or 0.0
    return round(price * images, 6)


def _or(price: float | None, otherwise: float) -> float:
    return otherwise if price is None else price


def worst_case_cost(spec: ModelSpec, request: ImageRequest) -> float:
    """The most `request` can cost: every image, `auto` priced as the model's dearest
    quality, and its prompt and inputs uncached."""
    images = (spec.price_per_image(request.quality, request.width, request.height) or 0.0) * (
        request.n
    )
    if spec.flat_price_usd is not None or spec.token_prices is None:
        return round(images, 6)
    tokens = math.ceil(len(request.prompt) / PROMPT_CHARS_PER_TOKEN_AT_LEAST)
    inputs = (len(request.images) + (request.mask is not None)) * INPUT_IMAGE_TOKENS_AT_MOST
    prices = spec.token_prices
    return round(images + (tokens * prices.text_input + inputs * prices.image_input) / 1e6, 6)


def worst_case_over_routes(
    request: ImageRequest, routes: Sequence[Route], *, batch: bool = False
) -> float:
    """The most `request` can cost on whichever of `routes` serves it; `batch`: through the
    Batch API."""
    worst = max(
        worst_case_cost(route.model_spec(), request) for route in serving_routes(request, routes)
    )
    return batch_price(worst) if batch else worst


class RoutePrice(BaseModel):
    """What a prompt set would cost on one route, before anything is paid."""

    route: str
    model: str
    requests: int = Field(description="Requests the route can serve.")
    images: int = Field(description="Images those requests ask for.")
    worst_case_usd: float = Field(
        description="Their cost at worst: auto quality as the model's dearest."
    )
    batch_worst_case_usd: float | None = Field(
        default=None,
        description="The same through OpenAI's Batch API, where the route has it and it "
        "takes the model.",
    )
    refused: list[str] = Field(
        default_factory=list, description="Why the route cannot serve the others."
    )
    qualities: list[str] = Field(default_factory=list, description="The model's qualities.")
    complexities: list[str] = Field(
        default_factory=list, description="The model's `complexity` settings, if any."
    )
    image_output_per_million_usd: float | None = Field(
        default=None, description="USD per million image output tokens, for token-priced models."
    )
    flat_price_usd: float | None = Field(
        default=None, description="USD per image, for a route priced per image."
    )


def price_on_route(requests: Sequence[ImageRequest], route: Route) -> RoutePrice:
    """Price `requests` on `route`, and say which it cannot serve."""
    spec = route.model_spec()
    served: list[ImageRequest] = []
    refused: list[str] = []
    for request in requests:
        try:
            route.check_request(request)
        except InvalidRequestError as exc:
            refused.append(str(exc))
        else:
            served.append(request)
    worst = round(sum(worst_case_cost(spec, request) for request in served), 6)
    return RoutePrice(
        route=route.route_name,
        model=route.model,
        requests=len(served),
        images=sum(request.n for request in served),
        worst_case_usd=worst,
        batch_worst_case_usd=batch_price(worst) if route.has_batch_api and spec.batch_api else None,
        refused=refused,
        qualities=list(spec.qualities),
        complexities=list(spec.complexities),
        image_output_per_million_usd=(
            spec.token_prices.image_output
            if spec.token_prices is not None and spec.flat_price_usd is None
            else None
        ),
        flat_price_usd=spec.flat_price_usd,
    )


_EPSILON_USD = 1e-9
"""Sums of prices carry float rounding: a cap is passed only by more than this."""


def within_cap(committed_usd: float, max_usd: float | None) -> bool:
    """Whether `committed_usd` (spent, held or planned) stays within the cap `max_usd`
    (None: no cap)."""
    return max_usd is None or committed_usd <= max_usd + _EPSILON_USD


class Budget:
    """What one run may still spend."""

    def __init__(self, max_usd: float | None = None) -> None:
        self.max_usd = max_usd
        self._lock = threading.Lock()
        self._spent = 0.0
        self._possibly = 0.0
        self._reserved = 0.0
        self._by_owner: defaultdict[str | None, Charges] = defaultdict(Charges)

    @property
    def spent_usd(self) -> float:
        return round(self._spent, 6)

    @property
    def possibly_spent_usd(self) -> float:
        return round(self._possibly, 6)

    def charges_of(self, owner: str) -> Charges:
        """What the calls made for `owner` (a task run) were charged, in every attempt."""
        with self._lock:
            return self._by_owner.get(owner, NO_CHARGES)

    def reserve(self, worst_case_usd: float, owner: str | None = None) -> Reservation:
        """Hold `worst_case_usd` for one call made for `owner`, or refuse the call if it
        could pass the cap."""
        with self._lock:
            committed = self._spent + self._possibly + self._reserved
            cap = self.max_usd
            if cap is not None and not within_cap(committed + worst_case_usd, cap):
                raise BudgetExceededError(
                    f"The next call could cost ${worst_case_usd:.4f}, and ${committed:.2f} is "
                    f"spent or held: together over max_cost_usd=${cap:.2f}. It was not "
                    "sent."
                )
            self._reserved += worst_case_usd
        return Reservation(self, worst_case_usd, owner)

    def _settle(self, held: float, charges: Charges, owner: str | None) -> None:
        with self._lock:
            self._reserved -= held
            self._spent += charges.usd
            self._possibly += charges.possibly_usd
            if owner is not None:
                self._by_owner[owner] += charges


class Reservation:
    """The worst case of one call, held until its answer says what it cost."""

    def __init__(self, budget: Budget, held: float, owner: str | None) -> None:
        self._budget = budget
        self._owner = owner
        self.held = held
        self._settled = False

    def charged(self, usd: float) -> Charges:
        """The call was answered and cost `usd`; returns what it was charged."""
        return self._settle(Charges(calls=1, usd=round(usd, 6)))

    def not_charged(self) -> Charges:
        """The call was refused, or never sent: nothing to bill."""
        return self._settle(NO_CHARGES)

    def possibly_charged(self) -> Charges:
        """The call was sent but not answered: the provider may bill its worst case."""
        return self._settle(Charges(possibly_usd=round(self.held, 6)))

    def _settle(self, charges: Charges) -> Charges:
        if not self._settled:
            self._settled = True
            self._budget._settle(self.held, charges, self._owner)
        return charges


_budgets: RunScoped[Budget] = RunScoped(Budget)


def run_budget() -> Budget:
    """The budget of the current flow run: uncapped unless the run set one."""
    return _budgets.get()
