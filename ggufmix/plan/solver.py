"""Multiple-choice knapsack: one option per item, total bytes within budget, least total cost.

Pure and deterministic. Two answers, the cheaper one kept, each topped up by a greedy fill of the
bytes it leaves unused (over all options):

- the Lagrangian relaxation (llama.cpp PR #15550's approach): per item the lower convex hull of
  (bytes, cost), the multiplier found by bisection over the hull's breakpoints. It is optimal for the
  bytes it spends but can leave out one large step: at SmolLM2-135M's Q5_K_M size a tied embedding's
  Q5_1 -> Q8_0 (8.8 MB) did not fit at the multiplier, and the fill spent the bytes on small tensors,
  a predicted KLD 19% above what the same scores allowed;
- dynamic programming over a grid of byte steps (GRID steps across the feasible range, each option's
  bytes rounded up so the answer never exceeds the budget). Exact when the range fits the grid.

:func:`faster_within` then trades a bounded share of that cost for time (each option's ``seconds``).
"""
from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from ggufmix.errors import BudgetError

GRID = 1 << 16       # byte steps of the dynamic program across the feasible range
GRID_CELLS = 1 << 27  # items x steps it may hold (its choice table, a byte each); more items get fewer steps
SPEED_STEPS = 8      # bisection steps over the price of a second in faster_within (a relaxed solve each)
# The most a share of the quantize time may cost in shares of error, per unit of tradeoff: at the default 0.02,
# each 1% of error given up must save at least 10% of the time (rate 0.1); at 0.2, 1%. Without such a floor
# SmolLM2-135M gave up 1.7% for 11% of a 1.4-second quantize.
RATE_PER_TRADEOFF = 5.0


@dataclass(frozen=True)
class Option:
    label: Hashable
    bytes: int
    cost: float
    seconds: float = 0.0  # what realizing it takes (llama.cpp's quantizer: plan/speed.py)


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
    seconds: float = 0.0


def feasible_range(items: Sequence[Item]) -> tuple[int, int]:
    """Smallest and largest total bytes any choice can reach."""
    return (sum(min(o.bytes for o in it.options) for it in items),
            sum(max(o.bytes for o in it.options) for it in items))


def solve(items: Sequence[Item], budget: int, exact: bool = True) -> Solution:
    """The least-cost choice whose total bytes do not exceed ``budget`` (``exact=False``: the relaxation's
    answer only, 10x quicker, for searches that solve many times).

    Raises:
        BudgetError: even the smallest options exceed the budget.
    """
    lo, _ = feasible_range(items)
    if budget < lo:
        raise BudgetError(f"budget {budget} bytes is below the smallest achievable {lo} bytes")
    hulls = [_hull(it.options) for it in items]
    lam, picks = _lagrangian(hulls, budget)
    relaxed = _greedy_fill(items, {it.key: h[i] for it, h, i in zip(items, hulls, picks)}, budget)
    if not exact:
        return _solution(relaxed, lam)
    gridded = _greedy_fill(items, _dynamic(items, budget), budget)
    choice = min(relaxed, gridded, key=_total)
    return _solution(choice, lam)


def faster_within(items: Sequence[Item], budget: int, best: Solution, tradeoff: float) -> Solution:
    """The fewest-seconds choice found whose cost is at most ``(1 + tradeoff)`` times ``best``'s (the
    :func:`solve` answer), within the same budget.

    Each second is priced at ``rate * best.cost / best.seconds`` and added to the options' costs: at ``rate``
    a plan gives up 1% of error only for at least ``1 / rate`` % of the time. The rate is ``RATE_PER_TRADEOFF *
    tradeoff`` where that choice is within the tradeoff, else bisected (log scale) for the highest one that is,
    down to ``tradeoff``: there an exact choice cannot lose more than ``tradeoff`` (it would otherwise cost
    more, priced seconds included, than ``best``). The choices are the relaxation's (``solve(exact=False)``,
    a tenth of the time), each checked against the tradeoff.
    """
    if tradeoff <= 0 or best.seconds <= 0 or best.cost <= 0:
        return best
    limit, price = best.cost * (1 + tradeoff), best.cost / best.seconds
    real = {it.key: {o.label: o for o in it.options} for it in items}
    found = best

    def within(rate: float) -> bool:
        nonlocal found
        sol = _priced(items, real, budget, rate * price)
        if sol.cost > limit:
            return False
        if _faster(sol, found, best.seconds):
            found = sol
        return True
    lo, hi = math.log(tradeoff), math.log(RATE_PER_TRADEOFF * tradeoff)
    if not within(math.exp(hi)) and within(math.exp(lo)):
        for _ in range(SPEED_STEPS):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if within(math.exp(mid)) else (lo, mid)
    return found


def _faster(a: Solution, b: Solution, scale: float) -> bool:
    """``a`` takes fewer seconds than ``b``, or as many (sums in another order differ by rounding) for less cost."""
    return (round(a.seconds / scale, 9), a.cost) < (round(b.seconds / scale, 9), b.cost)


def _priced(items: Sequence[Item], real: dict[str, dict[Hashable, Option]], budget: int, price: float) -> Solution:
    """The relaxation's answer with each option's seconds added to its cost at ``price``, told in real costs
    (``real``: each item's options by label)."""
    priced = [Item(it.key, tuple(Option(o.label, o.bytes, o.cost + price * o.seconds, o.seconds)
                                 for o in it.options)) for it in items]
    sol = solve(priced, budget, exact=False)
    return _solution({k: real[k][label] for k, label in sol.choice.items()}, sol.lam)


def _solution(choice: dict[str, Option], lam: float) -> Solution:
    cost, used = _total(choice)
    return Solution({k: o.label for k, o in choice.items()}, used, cost, lam, sum(o.seconds for o in choice.values()))


def _total(choice: dict[str, Option]) -> tuple[float, int]:
    return sum(o.cost for o in choice.values()), sum(o.bytes for o in choice.values())


def _dynamic(items: Sequence[Item], budget: int) -> dict[str, Option]:
    """The least-cost choice on a grid of byte steps: each option's bytes above its item's smallest, rounded
    up to whole steps, so the choice fits ``budget`` in real bytes too."""
    lo, hi = feasible_range(items)
    steps = max(1, min(GRID, GRID_CELLS // len(items)))
    step = max(1, math.ceil((hi - lo) / steps))
    room = (budget - lo) // step
    frontiers = [_frontier(it.options) for it in items]
    widths = [[math.ceil((o.bytes - f[0].bytes) / step) for o in f] for f in frontiers]  # steps above the smallest
    best = np.zeros(room + 1)  # least cost of the items so far within c steps
    picks = np.zeros((len(items), room + 1), np.uint8)
    for i, (options, w) in enumerate(zip(frontiers, widths)):
        best, picks[i] = _add_item(best, [(k, o.cost) for k, o in zip(w, options)])
    choice, c = {}, room
    for i in range(len(items) - 1, -1, -1):
        k = picks[i, c]
        choice[items[i].key] = frontiers[i][k]
        c -= widths[i][k]
    return choice


def _add_item(best: np.ndarray, options: list[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One item's options (steps, cost) on top of ``best``: the new least costs and which option gave each."""
    out = np.full(best.size, np.inf)
    pick = np.zeros(best.size, np.uint8)
    for k, (w, cost) in enumerate(options):
        if w >= best.size:
            break
        cand = best[:best.size - w] + cost
        better = cand < out[w:]
        out[w:][better] = cand[better]
        pick[w:][better] = k
    return out, pick


def _frontier(options: Sequence[Option]) -> list[Option]:
    """Options by bytes, each cheaper than every smaller one (the rest are never worth their bytes)."""
    out: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bytes, o.cost, str(o.label))):
        if not out or o.cost < out[-1].cost:
            out.append(o)
    return out


def _hull(options: Sequence[Option]) -> list[Option]:
    """Lower convex hull of (bytes, cost), from the smallest option to the cheapest-cost one."""
    hull: list[Option] = []
    for o in _frontier(options):
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
