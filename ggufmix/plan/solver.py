"""Multiple-choice knapsack: one option per item, total bytes within budget, least total cost.

Pure and deterministic. Per item, the lower convex hull of (bytes, cost); a Lagrangian relaxation
whose multiplier is found by bisection over the hull's breakpoints; then a greedy fill of what the
relaxation leaves unused, over all options (hull or not). The same approach as llama.cpp PR #15550.
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ggufmix.errors import BudgetError


@dataclass(frozen=True)
class Option:
    label: Hashable
    bytes: int
    cost: float


@dataclass(frozen=True)
class Item:
    key: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not self.options:
            raise ValueError(f"{self.key!r}: an item needs at least one option")


@dataclass(frozen=True)
class Solution:
    choice: dict[str, Hashable]
    bytes: int
    cost: float
    lam: float


def feasible_range(items: Sequence[Item]) -> tuple[int, int]:
    """Smallest and largest total bytes any choice can reach."""
    return (sum(min(o.bytes for o in it.options) for it in items),
            sum(max(o.bytes for o in it.options) for it in items))


def solve(items: Sequence[Item], budget: int) -> Solution:
    """The least-cost choice whose total bytes do not exceed ``budget``.

    Raises:
        BudgetError: even the smallest options exceed the budget.
    """
    lo, _ = feasible_range(items)
    if budget < lo:
        raise BudgetError(f"budget {budget} bytes is below the smallest achievable {lo} bytes")
    hulls = [_hull(it.options) for it in items]
    lam, picks = _lagrangian(hulls, budget)
    choice = {it.key: h[i] for it, h, i in zip(items, hulls, picks)}
    choice = _greedy_fill(items, choice, budget)
    return Solution({k: o.label for k, o in choice.items()}, sum(o.bytes for o in choice.values()),
                    sum(o.cost for o in choice.values()), lam)


def _hull(options: Sequence[Option]) -> list[Option]:
    """Lower convex hull of (bytes, cost), from the smallest option to the cheapest-cost one."""
    order = sorted(options, key=lambda o: (o.bytes, o.cost, str(o.label)))
    frontier: list[Option] = []
    for o in order:
        if frontier and o.cost >= frontier[-1].cost:
            continue  # dominated: more bytes, no less cost
        frontier.append(o)
    hull: list[Option] = []
    for o in frontier:
        while len(hull) >= 2 and _turns_up(hull[-2], hull[-1], o):
            hull.pop()
        hull.append(o)
    return hull


def _turns_up(a: Option, b: Option, c: Option) -> bool:
    """b lies on or above the segment a-c: it is not on the lower convex hull."""
    return (b.cost - a.cost) * (c.bytes - a.bytes) >= (c.cost - a.cost) * (b.bytes - a.bytes)


def _lagrangian(hulls: list[list[Option]], budget: int) -> tuple[float, list[int]]:
    """Bisection over the hulls' slopes for the smallest multiplier whose choice fits the budget."""
    slopes = sorted({_slope(h[i], h[i + 1]) for h in hulls for i in range(len(h) - 1)})
    lo, hi = 0, len(slopes)  # candidate multipliers: slopes[k] for k < len, +inf for len
    while lo < hi:
        mid = (lo + hi) // 2
        if _bytes_at(hulls, slopes[mid]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    lam = slopes[lo] if lo < len(slopes) else float("inf")
    return lam, [_pick(h, lam) for h in hulls]


def _slope(a: Option, b: Option) -> float:
    """Cost saved per byte spent moving from hull point a to b."""
    return (a.cost - b.cost) / (b.bytes - a.bytes)


def _pick(hull: list[Option], lam: float) -> int:
    """Index of the hull point minimising cost + lam * bytes; ties go to fewer bytes."""
    i = 0
    while i + 1 < len(hull) and _slope(hull[i], hull[i + 1]) > lam:
        i += 1
    return i


def _bytes_at(hulls: list[list[Option]], lam: float) -> int:
    return sum(h[_pick(h, lam)].bytes for h in hulls)


def _greedy_fill(items: Sequence[Item], choice: dict[str, Option], budget: int) -> dict[str, Option]:
    """Spend what is left on the upgrades with the best cost saved per byte, until none fits."""
    choice = dict(choice)
    left = budget - sum(o.bytes for o in choice.values())
    while True:
        best: tuple[float, str, Option] | None = None
        for it in items:
            cur = choice[it.key]
            for o in it.options:
                extra = o.bytes - cur.bytes
                if o.cost >= cur.cost or extra > left:
                    continue
                gain = (cur.cost - o.cost) / extra if extra > 0 else float("inf")
                if best is None or gain > best[0]:
                    best = (gain, it.key, o)
        if best is None:
            return choice
        _, key, o = best
        left -= o.bytes - choice[key].bytes
        choice[key] = o
