"""Guard the plan's rounding against erased columns: an input channel whose weights the imatrix lets round to noise.

llama.cpp's imatrix-weighted quantizers choose each block's scale (and min) for the columns the imatrix says are
loud. A column that is quiet on the imatrix's text but shares its block with a very loud one can lose all of its
weights: Qwen2.5-Coder-1.5B's blk.2.ffn_down column 8317 sits in the same 32 columns as column 8300 (530x the
median power) and comes out of Q4_K with a relative error of 1.01, as if it were zero. On the calibration text its
input never goes over 9.2; in a children's story it reaches 140, and those few tokens gave the default's file at
Q3_K_M's size a largest token KLD of 2.8 (docs/results.md, "An erased column"). The imatrix cannot see a channel
its text does not use, so the guard asks the weights instead: every planned tensor is rounded at its type, and
where a column's relative error is over ERASED, that column's importance is raised STEP times, and the tensor is
rounded again. A raise can push a neighbour over: with 8317 raised 9x, 8290 and 8310 in its block go from under
0.8 to 0.96 and 0.86. So every column is checked again each round, and whatever is still erased is raised STEP
times more (up to CAP); the factors of the round with the fewest erased columns are kept (8317 9x, 8290 and 8310
3x: none left). Grid types such as IQ3_S do not respond to a raise and are left alone; where no round leaves fewer
erased columns than the imatrix alone (Q3_K in a block like this one), nothing is raised.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from tqdm import tqdm

from ggufmix.engine.oracle import quant_roundtrip
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource
from ggufmix.plan.plan import Plan, PlanEntry
from ggufmix.score.stream import sample_rows
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

ERASED = 0.8   # a column's ||Q(w) - w|| / ||w|| above this has lost most of what it carried
STEP = 3.0     # how much more the quantizer is told to care about a column each round it is erased
CAP = 81.0     # and at most this much in all (four rounds)
ROUNDS = 8     # roundings of one tensor at most (the first, then raises)
DEAD = 0.1     # a column whose weights and imatrix value are both under this share of the median's is left alone
ROWS = 2048    # rows sampled per tensor (all of attn and ffn_down on Qwen2.5-1.5B; a quarter of ffn_up)
# Types whose quantizer trades columns through the imatrix and can be told to keep one: the scale (and min)
# searches of the K and legacy types, IQ4's. IQ3_S's grid brought no column back at 30x (IQ1-IQ3 left out).
GUARDED = frozenset({QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K,
                     QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1, QuantType.IQ4_XS,
                     QuantType.IQ4_NL})


@dataclass(frozen=True)
class Guarded:
    """The imatrix to quantize with, and per tensor the columns whose importance was raised."""

    imatrix: Imatrix
    columns: Mapping[str, Mapping[int, float]] = field(default_factory=dict)  # tensor -> {column: factor}
    seconds: float = 0.0

    def summary(self) -> dict[str, object]:
        return {"erased_above": ERASED, "step": STEP, "cap": CAP, "seconds": round(self.seconds, 1),
                "columns": {n: {str(c): f for c, f in cols.items()} for n, cols in self.columns.items()}}


def column_errors(w: np.ndarray, rounded: np.ndarray) -> np.ndarray:
    """Each column's relative rounding error ``||Q(w)[:, j] - w[:, j]|| / ||w[:, j]||`` (0 for an all-zero column)."""
    norm = np.linalg.norm(w, axis=0)
    err = np.linalg.norm(rounded - w, axis=0)
    return np.where(norm > 0, err / np.maximum(norm, 1e-30), 0.0)


def raise_factors(w: np.ndarray, values: np.ndarray,
                  round_with: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    """Per-column factors for the imatrix ``values`` that leave the fewest columns of ``w`` (rows, cols) erased, or
    None where none is erased or no raise leaves fewer; ``round_with(values)`` rounds ``w`` with those importances.

    Each round every column still erased is raised STEP times more, up to CAP, and all columns are checked again.
    Of the round with the fewest, the raises of the columns it leaves erased are dropped where that leaves no more:
    they cost their blocks' other columns and bought nothing. Dead columns are not counted (``_live_columns``).
    """
    live = _live_columns(w, values)

    def erased(factors: np.ndarray) -> np.ndarray:
        return (column_errors(w, round_with(values * factors)) > ERASED) & live

    factors = np.ones(values.shape, np.float32)
    best, left = factors, erased(factors)
    now = left
    for _ in range(ROUNDS - 1):
        grow = now & (factors * STEP <= CAP)
        if not grow.any():
            break
        factors = np.where(grow, factors * STEP, factors).astype(np.float32)
        now = erased(factors)
        if now.sum() < left.sum():
            best, left = factors, now
    if left.any() and (best[left] > 1).any():
        kept = np.where(left, 1.0, best).astype(np.float32)
        if erased(kept).sum() <= left.sum():
            best = kept
    return None if (best == 1).all() else best


def _live_columns(w: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Columns the model uses: weights or imatrix value at least DEAD of the tensor's median column's.
    Qwen2.5-Coder-1.5B's blk.1.attn_v has 9 columns at a twentieth of the median weights and a hundredth of its input
    power; Q5_K rounds them to noise, 81x raises brought back 2, and the file did not change measurably
    (docs/results.md)."""
    norm = np.linalg.norm(w, axis=0)
    return (norm >= DEAD * np.median(norm)) | (values >= DEAD * np.median(values))


def guard_imatrix(source: GGUFSource, plan: Plan, imatrix: Imatrix, *, threads: int = 1,
                  progress: bool = True) -> Guarded:
    """``imatrix`` with the erased columns of the plan's GUARDED-type dense weights raised (see the module);
    ``threads`` row ranges rounded at once (the result does not depend on it)."""
    t0 = time.perf_counter()
    sums = dict(imatrix.sums)
    columns: dict[str, dict[int, float]] = {}
    todo = [e for e in plan.quantized() if e.qtype in GUARDED and e.name in imatrix and imatrix.n_mat(e.name) == 1]
    for e in tqdm(todo, desc="guard: erased columns", unit="tensor", disable=not progress):
        factors = _guard_one(source, e, imatrix.values(e.name), threads)
        if factors is not None:
            sums[e.name] = np.asarray(imatrix.sums[e.name], np.float32) * factors
            columns[e.name] = {int(c): float(factors[c]) for c in np.flatnonzero(factors != 1)}
    if columns:
        logger.info("guard: %d columns in %d tensors raised against rounding to noise (%s)",
                    sum(map(len, columns.values())), len(columns), ", ".join(list(columns)[:3]))
    return Guarded(replace(imatrix, sums=sums), columns, time.perf_counter() - t0)


def _guard_one(source: GGUFSource, e: PlanEntry, values: np.ndarray, threads: int) -> np.ndarray | None:
    w = source.rows(e.name, sample_rows(source.tensors[e.name].nrows, ROWS))
    return raise_factors(w, values, lambda v: quant_roundtrip(w, e.qtype, v.reshape(1, -1), threads=threads))
