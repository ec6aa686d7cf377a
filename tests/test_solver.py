from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufmix.errors import BudgetError
from ggufmix.plan.solver import Item, Option, faster_within, feasible_range, solve


@st.composite
def instances(draw: st.DrawFn) -> list[Item]:
    n = draw(st.integers(1, 8))
    items = []
    for i in range(n):
        k = draw(st.integers(1, 5))
        sizes = draw(st.lists(st.integers(1, 400), min_size=k, max_size=k, unique=True))
        costs = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=k, max_size=k))
        secs = draw(st.lists(st.floats(0, 50, allow_nan=False), min_size=k, max_size=k))
        items.append(Item(f"t{i}", tuple(Option(f"o{j}", b, c, t) for j, (b, c, t) in enumerate(zip(sizes, costs, secs)))))
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


@settings(max_examples=300, deadline=None)
@given(instances(), st.floats(0, 1))
def test_the_exact_optimum_when_the_sizes_fit_the_grid(items: list[Item], frac: float) -> None:
    """Up to 8 items of at most 400 bytes: the byte range fits the dynamic program's grid, so the answer is
    the brute-force optimum (the Lagrangian alone can miss by one item's worth)."""
    lo, hi = feasible_range(items)
    budget = int(lo + frac * (hi - lo))
    opt = _brute(items, budget)
    assert solve(items, budget).cost == pytest.approx(opt, rel=1e-9, abs=1e-9)


def test_a_large_step_the_relaxation_leaves_out() -> None:
    """SmolLM2-135M at Q5_K_M's size in small: the tied embedding's only step up (Q5_1 -> Q8_0) is large.
    The multiplier that fits the budget stops just short of it, and a greedy fill of the rest buys small
    steps (cost 20.6); paying for the embedding with lower blocks costs 15.4."""
    embd = Item("token_embd", (Option("Q5_1", 212, 17.2), Option("Q8_0", 300, 0.4)))
    block = (Option("Q4_0", 16, 2.0), Option("Q5_0", 20, 1.0), Option("Q5_1", 22, 0.7), Option("Q8_0", 30, 0.1))
    items = [embd, *(Item(f"blk.{i}", block) for i in range(10))]
    sol = solve(items, 480)
    assert sol.choice["token_embd"] == "Q8_0" and sol.bytes == 480
    assert sol.cost == pytest.approx(15.4) == pytest.approx(_brute(items, 480))


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


@settings(max_examples=200, deadline=None)
@given(instances(), st.floats(0, 1), st.sampled_from([0.0, 0.01, 0.1, 0.5]))
def test_a_faster_plan_stays_within_the_budget_and_the_tradeoff(items: list[Item], frac: float,
                                                               tradeoff: float) -> None:
    lo, hi = feasible_range(items)
    budget = int(lo + frac * (hi - lo))
    best = solve(items, budget)
    fast = faster_within(items, budget, best, tradeoff)
    assert fast.bytes <= budget
    assert fast.cost <= best.cost * (1 + tradeoff) + 1e-9
    assert fast.seconds <= best.seconds
    chosen = [next(o for o in it.options if o.label == fast.choice[it.key]) for it in items]
    assert fast.seconds == pytest.approx(sum(o.seconds for o in chosen))
    assert fast.cost == pytest.approx(sum(o.cost for o in chosen))
    if tradeoff == 0:
        assert fast == best


def test_slow_types_go_where_they_buy_the_least() -> None:
    """IQ4_XS against Q4_K in small: same bytes, the slow type a little better on every tensor, by more on
    the later ones. 1% may be given up: every tensor takes the fast type. 0.3%: the seven whose slow type
    buys least (their losses add up to 0.28%) take it, the other three keep the slow one."""
    items = [Item(f"blk.{i}", (Option("IQ4_XS", 17, 1.0, 10.0), Option("Q4_K", 17, 1 + 0.001 * (i + 1), 3.0)))
             for i in range(10)]
    best = solve(items, 170)
    assert set(best.choice.values()) == {"IQ4_XS"} and best.seconds == 100
    assert set(faster_within(items, 170, best, 0.01).choice.values()) == {"Q4_K"}
    some = faster_within(items, 170, best, 0.003)
    assert [some.choice[f"blk.{i}"] for i in range(10)] == ["Q4_K"] * 7 + ["IQ4_XS"] * 3
    assert some.seconds == pytest.approx(51) and some.cost == pytest.approx(10.028)
