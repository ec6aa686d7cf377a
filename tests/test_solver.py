from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufmix.errors import BudgetError
from ggufmix.plan.solver import Item, Option, feasible_range, solve


@st.composite
def instances(draw: st.DrawFn) -> list[Item]:
    n = draw(st.integers(1, 8))
    items = []
    for i in range(n):
        k = draw(st.integers(1, 5))
        sizes = draw(st.lists(st.integers(1, 400), min_size=k, max_size=k, unique=True))
        costs = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=k, max_size=k))
        items.append(Item(f"t{i}", tuple(Option(f"o{j}", b, c) for j, (b, c) in enumerate(zip(sizes, costs)))))
    return items


def _brute(items: list[Item], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*(it.options for it in items)):
        if sum(o.bytes for o in combo) <= budget:
            best = min(best, sum(o.cost for o in combo))
    return best


@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0, 1))
def test_never_over_budget_and_deterministic(items: list[Item], frac: float) -> None:
    lo, hi = feasible_range(items)
    budget = int(lo + frac * (hi - lo))
    a = solve(items, budget)
    assert a.bytes <= budget
    assert a == solve(items, budget)
    chosen = {it.key: next(o for o in it.options if o.label == a.choice[it.key]) for it in items}
    assert a.bytes == sum(o.bytes for o in chosen.values())


@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0, 1), st.floats(0, 1))
def test_monotone_in_budget(items: list[Item], f1: float, f2: float) -> None:
    lo, hi = feasible_range(items)
    b1, b2 = sorted((int(lo + f1 * (hi - lo)), int(lo + f2 * (hi - lo))))
    assert solve(items, b2).cost <= solve(items, b1).cost + 1e-9


@settings(max_examples=150, deadline=None)
@given(instances(), st.floats(0, 1))
def test_close_to_the_exact_optimum(items: list[Item], frac: float) -> None:
    """The Lagrangian solution is optimal for the bytes it uses; what it leaves unspent costs at most
    one item's worth: the result is within the largest single-item cost spread of the exact optimum."""
    lo, hi = feasible_range(items)
    budget = int(lo + frac * (hi - lo))
    spread = max(max(o.cost for o in it.options) - min(o.cost for o in it.options) for it in items)
    opt = _brute(items, budget)
    assert opt - 1e-9 <= solve(items, budget).cost <= opt + spread + 1e-9


def test_known_instance() -> None:
    a = Item("a", (Option("q2", 10, 9.0), Option("q4", 20, 3.0), Option("q8", 40, 0.0)))
    b = Item("b", (Option("q2", 10, 1.0), Option("q4", 20, 0.5), Option("q8", 40, 0.0)))
    # 50 bytes: a gains most per byte, so it goes to q4 (or q8) first
    sol = solve([a, b], 50)
    assert sol.choice == {"a": "q8", "b": "q2"} and sol.bytes == 50 and sol.cost == 1.0
    assert solve([a, b], 80).choice == {"a": "q8", "b": "q8"}
    assert solve([a, b], 20).choice == {"a": "q2", "b": "q2"}


def test_infeasible_budget() -> None:
    a = Item("a", (Option("q2", 10, 9.0),))
    with pytest.raises(BudgetError, match="smallest achievable 10"):
        solve([a], 9)
