"""The money rules on their own, without a flow: what the budget holds, spends and refuses."""

from __future__ import annotations

import threading

import pytest

from prefect_gpt_image._billing import Budget
from prefect_gpt_image._charges import Charges
from prefect_gpt_image.errors import BudgetExceededError


def test_a_reservation_becomes_what_the_answer_cost() -> None:
    budget = Budget(max_usd=1.0)

    charged = budget.reserve(0.25, owner="run-a").charged(0.04)
    budget.reserve(0.25, owner="run-a").not_charged()
    budget.reserve(0.25, owner="run-b").possibly_charged()

    assert charged == Charges(calls=1, usd=0.04)
    assert (budget.spent_usd, budget.possibly_spent_usd) == (0.04, 0.25)
    assert budget.charges_of("run-a") == Charges(calls=1, usd=0.04)
    assert budget.charges_of("run-b") == Charges(possibly_usd=0.25)
    assert budget.charges_of("run-c") == Charges()


def test_held_and_possibly_charged_calls_count_against_the_cap() -> None:
    budget = Budget(max_usd=0.10)
    held = budget.reserve(0.04)
    budget.reserve(0.04).possibly_charged()

    with pytest.raises(BudgetExceededError, match=r"\$0\.08 is spent or held") as refused:
        budget.reserve(0.04)

    assert "max_cost_usd=$0.10" in str(refused.value) and "It was not sent" in str(refused.value)
    held.charged(0.01)  # the answer cost less than its worst case: room again
    budget.reserve(0.04)


def test_an_attempt_that_fits_exactly_is_sent() -> None:
    budget = Budget(max_usd=0.09)
    for _ in range(3):
        budget.reserve(0.03).charged(0.03)

    with pytest.raises(BudgetExceededError):
        budget.reserve(0.03)
    assert budget.spent_usd == 0.09


def test_a_reservation_settles_once() -> None:
    budget = Budget(max_usd=1.0)
    reservation = budget.reserve(0.5, owner="run")
    reservation.charged(0.2)
    reservation.charged(0.2)
    reservation.not_charged()

    assert budget.spent_usd == 0.2
    assert budget.charges_of("run") == Charges(calls=1, usd=0.2)
    budget.reserve(0.8)  # the 0.5 held is free again


def test_without_a_cap_nothing_is_refused() -> None:
    budget = Budget()
    for _ in range(100):
        budget.reserve(1_000.0).charged(1_000.0)
    assert budget.spent_usd == 100_000.0


def test_threads_racing_for_the_last_dollar_never_pass_the_cap() -> None:
    budget = Budget(max_usd=1.0)
    sent: list[int] = []
    start = threading.Barrier(50)

    def attempt(n: int) -> None:
        start.wait()
        for _ in range(4):
            try:
                reservation = budget.reserve(0.03)
            except BudgetExceededError:
                return
            sent.append(n)
            reservation.charged(0.03)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(sent) == 33  # $0.99; a 34th would pass $1.00
    assert budget.spent_usd == pytest.approx(0.99)
