"""The hard budget: no paid attempt, first or retry, is sent unless its worst case fits.

A run's `max_cost_usd` is a ledger per flow run. Before a call is sent, its worst case
(`billing.worst_case_cost`) is reserved; when the answer comes, the reservation becomes
what the call cost. A call that timed out after it was sent keeps its reservation as
"possibly charged": the provider may have finished it. An attempt whose reservation would
pass the cap is not sent.

The ledger also says what each task run was charged, over all its attempts: a broken
answer is charged, and so is the retry that replaces it. The task's result carries that
total, and the flow reads a failed task run's from here.

The ledger lives in the flow run's process: workers in other processes (Dask) are held
by the flow's own check when it submits, which counts each generation once.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prefect_gpt_image._charges import NO_CHARGES, Charges
from prefect_gpt_image._run_scope import RunScoped
from prefect_gpt_image.errors import BudgetExceededError

_EPSILON_USD = 1e-9


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
            if cap is not None and committed + worst_case_usd > cap + _EPSILON_USD:
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
