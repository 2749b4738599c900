"""The hard budget: no paid attempt, first or retry, is sent unless its worst case fits.

A batch's `max_cost_usd` is a ledger per flow run. Before a call is sent, its worst case
(`billing.worst_case_cost`) is reserved; when the answer comes, the reservation becomes
what the call cost. A call that timed out after it was sent keeps its reservation as
"possibly charged": the provider may have finished it. An attempt whose reservation would
pass the cap is not sent.

The ledger lives in the flow run's process: workers in other processes (Dask) are held
by the flow's own check when it submits, which counts each generation once.
"""

from __future__ import annotations

import threading

from prefect_gpt_image.errors import BudgetExceededError
from prefect_gpt_image.run_scope import RunScoped

_EPSILON_USD = 1e-9


class Budget:
    """What one batch may still spend."""

    def __init__(self, max_usd: float | None = None) -> None:
        self.max_usd = max_usd
        self._lock = threading.Lock()
        self._spent = 0.0
        self._possibly = 0.0
        self._reserved = 0.0

    @property
    def spent_usd(self) -> float:
        return round(self._spent, 6)

    @property
    def possibly_spent_usd(self) -> float:
        return round(self._possibly, 6)

    def reserve(self, worst_case_usd: float) -> Reservation:
        """Hold `worst_case_usd` for one call, or refuse the call if it could pass the cap."""
        with self._lock:
            committed = self._spent + self._possibly + self._reserved
            cap = self.max_usd
            if cap is not None and committed + worst_case_usd > cap + _EPSILON_USD:
                raise BudgetExceededError(
                    f"The next call could cost ${worst_case_usd:.4f}, and ${committed:.2f} is "
                    f"spent or held: together over max_cost_usd=${cap:.2f}. It was not "
                    "sent."
                )
            self._reserved += worst_case_usd
        return Reservation(self, worst_case_usd)

    def _settle(self, held: float, charged: float, possibly: float) -> None:
        with self._lock:
            self._reserved -= held
            self._spent += charged
            self._possibly += possibly


class Reservation:
    """The worst case of one call, held until its answer says what it cost."""

    def __init__(self, budget: Budget, held: float) -> None:
        self._budget = budget
        self.held = held
        self._settled = False

    def charged(self, usd: float) -> None:
        """The call was answered and cost `usd` (zero for a refusal the provider does not bill)."""
        self._settle(usd, 0.0)

    def possibly_charged(self) -> None:
        """The call was sent but not answered: the provider may bill its worst case."""
        self._settle(0.0, self.held)

    def _settle(self, charged: float, possibly: float) -> None:
        if not self._settled:
            self._settled = True
            self._budget._settle(self.held, charged, possibly)


_budgets: RunScoped[Budget] = RunScoped(Budget)


def run_budget() -> Budget:
    """The budget of the current flow run: uncapped unless the batch set one."""
    return _budgets.get()
