"""Refine a ``kld`` plan end to end: the real plan's KLD in memory, then byte-neutral swaps that lower it.

The solver adds up per-tensor KLDs as if quantizing one tensor never changed what another costs; the
oracle can check the sum. Every planned tensor is swapped into the loaded source at its planned type
(quantized and dequantized by llama.cpp's kernels, no file), and the whole plan's KLD on the calibration
chunks is measured. Then moves are tried, best predicted first: one tensor a type up, paid for by one or
more tensors a type down (what the scores say costs least per byte freed), never over the budget. A move
that lowers the measured KLD is kept; the search stops at the time limit or when no move of the current
plan helps. What a greedy end-to-end search finds: the oracle.
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ggufmix.imatrix import Imatrix
from ggufmix.io.text import read_text
from ggufmix.plan.plan import Plan, PlanEntry
from ggufmix.plan.planner import DEFAULT_TIES
from ggufmix.score.oracle import Oracle, OracleSettings
from ggufmix.scores import Scores
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

MIN_GAIN = 1e-6      # a kept move must lower the measured mean KLD by more than this


@dataclass(frozen=True)
class Move:
    """Types to set (tensor -> type) and the scores' predicted KLD change (negative: better)."""

    changes: tuple[tuple[str, QuantType], ...]
    predicted: float
    extra_bytes: int


@dataclass(frozen=True)
class Refined:
    plan: Plan
    kld_planned: float   # the solver's plan, measured whole
    kld: float           # after the search
    tried: int
    kept: int
    seconds: float


Options = Mapping[str, Mapping[QuantType, tuple[int, float]]]  # tensor -> type -> (bytes, predicted cost)


def moves(chosen: Mapping[str, QuantType], options: Options, slack: int) -> list[Move]:
    """Every one-up move of the current types, each paid for by the cheapest one-down moves of other tensors
    (cost per byte freed), sorted by predicted change, best first. ``slack``: bytes left under the budget."""
    downs = sorted(((cost - options[n][chosen[n]][1]) / max(freed, 1), n, t, freed, cost - options[n][chosen[n]][1])
                   for n, t, freed, cost in _steps(chosen, options, down=True))
    out = []
    for name, up, extra, cost in _steps(chosen, options, down=False):
        gain = cost - options[name][chosen[name]][1]  # negative: the upgrade lowers the predicted KLD
        need, changes, delta = extra - slack, [(name, up)], gain
        for _, n, t, freed, loss in downs:
            if need <= 0:
                break
            if n != name:
                changes.append((n, t))
                need -= freed
                delta += loss
        if need <= 0:
            out.append(Move(tuple(changes), delta, slack + need))  # net bytes added: at most the slack
    return sorted(out, key=lambda m: (m.predicted, m.changes))


def _steps(chosen: Mapping[str, QuantType], options: Options, down: bool) -> list[tuple[str, QuantType, int, float]]:
    """Per tensor, the nearest type with fewer (``down``) or more bytes: (name, type, bytes moved, its cost)."""
    out = []
    for name, cur in chosen.items():
        b0 = options[name][cur][0]
        side = [(b, c, t) for t, (b, c) in options[name].items() if (b < b0 if down else b > b0)]
        if side:
            b, c, t = max(side, key=lambda x: (x[0], -x[1])) if down else min(side, key=lambda x: (x[0], x[1]))
            out.append((name, t, abs(b0 - b), c))
    return out


def options_of(plan: Plan, scores: Scores) -> Options:
    """What each movable tensor may take: the plan's palette, minus pinned and tied tensors."""
    allowed = plan.settings.get("types")
    pins = [re.compile(p.rpartition("=")[0]) for p in plan.settings.get("pins", [])]
    ties = [re.compile(rx) for rx, _ in DEFAULT_TIES]
    out = {}
    for s in scores.layout.slots:
        if not s.quantized or any(p.search(s.name) for p in pins) or any(t.match(s.name) for t in ties):
            continue
        ts = scores.tensors[s.name]
        out[s.name] = {t: (b, ts.importance * ts.errors[t]) for t, b in s.candidates.items()
                       if allowed is None or t.name in allowed}
    return out


def refine(plan: Plan, scores: Scores, source: Path, imatrix: Imatrix | None, *, minutes: float,
           progress: bool = True) -> Refined:
    """Search byte-neutral moves from ``plan`` for up to ``minutes``, measured end to end by the oracle.

    Raises:
        UsageError: the scores carry no oracle settings (not ``--strategy kld``).
    """
    from ggufmix.errors import UsageError

    if scores.settings.get("units") != "kld":
        raise UsageError("--search-minutes refines plans of --strategy kld only (it needs the oracle's settings)")
    o = scores.settings["oracle"]
    settings = OracleSettings(chunks=o["chunks"], ctx=o["ctx"], widths=tuple(o["widths"]), start=o["start"],
                              max_types=o["max_types"])
    t0 = time.perf_counter()
    chosen = {e.name: e.qtype for e in plan.quantized()}
    options = options_of(plan, scores)
    with Oracle(source, scores.layout, read_text(Path(scores.settings["calib"]["text"])), settings, imatrix) as oracle:
        for name, t in chosen.items():
            oracle.swap(name, t)
        planned = oracle.divergence()[0]
        # the minutes are the search's own: loading the source and swapping the whole plan in come first (on
        # Qwen2.5-Coder-1.5B at Q2_K's size, with its slow IQ2/IQ3 quantizers, they took longer than 5 minutes)
        tried, kept, best = _search(oracle, chosen, options, plan.budget_bytes - plan.total_bytes, planned,
                                    time.perf_counter() + 60 * minutes, progress)
    logger.info("refine: KLD %.5f -> %.5f (%d moves tried, %d kept)", planned, best, tried, kept)
    new = _with_types(plan, scores, chosen)
    info = {"kld_planned": planned, "kld": best, "tried": tried, "kept": kept, "minutes": minutes,
            "calib_chunks": settings.chunks}
    return Refined(replace(new, settings={**new.settings, "refine": info}), planned, best, tried, kept,
                   time.perf_counter() - t0)


def _search(oracle: Oracle, chosen: dict[str, QuantType], options: Options, slack: int, best: float,
            deadline: float, progress: bool) -> tuple[int, int, float]:
    """Greedy rounds until the deadline or a round in which no move helps; ``chosen`` is updated in place.
    A round tries every move while time is left: the scores' ranking is what the search checks, so a move
    ranked low may still be the one that helps (at SmolLM2's Q5_K_M size none of the first 40 did)."""
    tried = kept = 0
    rejected: set[tuple[tuple[str, QuantType], ...]] = set()
    bar = tqdm(desc="refine (moves)", unit="move", disable=not progress)
    while time.perf_counter() < deadline:
        movable = {n: chosen[n] for n in options}
        cands = [m for m in moves(movable, options, slack) if m.changes not in rejected]  # best predicted first
        improved = False
        for m in cands:
            if time.perf_counter() >= deadline:
                break
            old = {n: chosen[n] for n, _ in m.changes}
            for n, t in m.changes:
                oracle.swap(n, t)
            kld = oracle.divergence()[0]
            tried += 1
            bar.update()
            if kld < best - MIN_GAIN:
                best, improved, kept = kld, True, kept + 1
                chosen.update(dict(m.changes))
                slack -= m.extra_bytes
                bar.set_postfix(kld=f"{best:.5f}", kept=kept)
                break
            for n, t in old.items():
                oracle.swap(n, t)
            rejected.add(m.changes)
        if not improved:
            break
    bar.close()
    return tried, kept, best


def _with_types(plan: Plan, scores: Scores, chosen: Mapping[str, QuantType]) -> Plan:
    slots = scores.layout.by_name()
    entries: list[PlanEntry] = []
    for e in plan.entries:
        t = chosen.get(e.name)
        if t is None or t == e.qtype:
            entries.append(e)
            continue
        ts = scores.tensors[e.name]
        cost = e.cost * ts.errors[t] / ts.errors[e.qtype] if e.cost and ts.errors[e.qtype] else ts.errors[t]
        entries.append(replace(e, qtype=t, bytes=slots[e.name].candidates[t], error=ts.errors[t], cost=cost))
    return replace(plan, entries=tuple(entries))
