"""The default, measured scorer: llama.cpp's real quantizer error for every candidate type."""
from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np

from ggufmix.score.base import Kernels, TensorJob, TensorScore, register
from ggufmix.types import QuantType, block_size

# ggml's IQ quantizers search codebooks and run ~50x slower than the others: they see every
# SLOW_STRIDE-th sampled row only (8 of SmolLM2's 128). Against every 4th row: SmolLM2's plans at Q4_K_M's size
# the same, at 4.5 bpw and Q2_K's size 11-16 of 272 tensors swap between near-equal types, KLD 0.3062 vs
# 0.3041 and 0.1594 vs 0.1608 (10 x 512 wiki tokens), and the build 0.4 s faster (docs/results.md).
SLOW_TYPES = frozenset({QuantType.IQ1_S, QuantType.IQ1_M, QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ2_S,
                        QuantType.IQ3_XXS, QuantType.IQ3_S, QuantType.IQ4_NL, QuantType.IQ4_XS})
SLOW_STRIDE = 16

# Values of a tensor quantized per candidate type: 128 rows of 512. Every ggml type quantizes blocks of
# 32-256 weights on their own, so a window of whole blocks of a row quantizes to exactly the bits the whole
# row gives there; wider rows are measured on one window each, the windows rotating along the row from one
# sampled row to the next, so every sampled row (and every part of the rows) still counts. Rows of at most
# WINDOW_VALUES / rows columns (or under twice the window) are measured whole. Against whole rows: within 8%
# per type on synthetic heavy-tailed tensors (tests/test_scorers.py); Qwen2.5-Coder-1.5B 5.5x faster, the same
# plan at 3 bpw and 9 of 339 tensors planned differently at 4 bpw (docs/results.md).
WINDOW_VALUES = 128 * 512
# With an imatrix, ggml-quants.c's quantize_row_q4_0_impl (and q4_1, q5_0, q5_1) weight every value by the whole
# row's mean square: a window would quantize differently, so these are measured on whole rows.
ROW_STAT_TYPES = frozenset({QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1})


@register("measured", description="imatrix-weighted error of llama.cpp's own quantizer, every type, sampled rows")
def measured(job: TensorJob) -> TensorScore:
    """Noise-to-signal ratio of ``W x`` for each candidate type.

    With per-column activation power ``a_j`` (the imatrix), the expected output error of a quantized
    row is ``sum_j a_j (w_j - q_j)^2`` (independent inputs). It is divided by ``typical(a) sum_j w_j^2``,
    the row's output power for inputs of the typical column's power, so the ratio is comparable across
    tensors of any size. Not by ``sum_j a_j w_j^2``: where one column carries most of the activation
    power (SmolLM2-135M's blk.11.ffn_down: 90%), that measures the error against the outlier channel
    alone and calls a Q2_K tensor nearly lossless (measured: it then cost 0.01 KLD more than uniform
    bits at Q4_K_M size). ``typical`` is the mean without the top 1% of columns. Without an imatrix
    ``a_j = 1`` and all forms agree. Rows of stacked experts are weighted by how often llama-imatrix saw
    each expert chosen (its count over the mean count), when the imatrix has per-expert counts.
    """
    windows = window_starts(job.rows.shape, job.candidates, WINDOW_VALUES)
    full = _column_weights(job)
    typical = typical_power(full)
    whole = _Sample(job.rows, full, typical, None)
    part = whole if windows is None else _Sample(_windows(job.rows, windows), _windows(full, windows), typical,
                                                 windows[0])
    if whole.signal <= 0.0:
        return TensorScore({t: 0.0 for t in job.candidates}, stats={"signal": 0.0})
    errors = {}
    for qtype in job.candidates:
        s = whole if job.imatrix is not None and qtype in ROW_STAT_TYPES else part
        sel = slice(None, None, SLOW_STRIDE) if qtype in SLOW_TYPES and len(s.rows) >= 4 * SLOW_STRIDE else slice(None)
        sig = float(s.row_signal[sel].sum())
        errors[qtype] = s.weighted_error(sel, _roundtrip(job, s.rows, s.starts, qtype, sel)) / sig if sig > 0 else 0.0
    return TensorScore(errors, stats={"signal": whole.signal / job.rows.size})


class _Sample:
    """The sampled rows (or their windows) as the error sums use them: values, column weights, each row's power."""

    def __init__(self, rows: np.ndarray, weights: np.ndarray, typical: np.ndarray, starts: np.ndarray | None) -> None:
        self.rows, self.weights, self.starts = np.ascontiguousarray(rows, np.float32), weights, starts
        x = rows.astype(np.float64)
        self.row_signal = typical.ravel() * np.einsum("ij,ij->i", x, x)
        self.signal = float(self.row_signal.sum())

    def weighted_error(self, sel: slice, deq: np.ndarray) -> float:
        """``sum_ij a_ij (x_ij - q_ij)^2`` over the selected rows: squares in float32 (the differences of two
        float32 values near each other are exact), sums in float64. One weight row broadcast over all rows
        cost 8x more as ``np.sum(a * d ** 2)`` (SmolLM2: 0.4 ms a type and tensor)."""
        d = self.rows[sel] - deq
        d *= d
        if self.weights.shape[0] == 1:
            return float(d.sum(axis=0, dtype=np.float64) @ self.weights[0])
        return float(np.einsum("ij,ij->", d, self.weights[sel], dtype=np.float64))


def window_starts(shape: tuple[int, int], candidates: tuple[QuantType, ...],
                  max_values: int) -> tuple[np.ndarray, int] | None:
    """First column of each sampled row's window and the windows' width, or None when rows are measured whole.

    Windows are whole blocks of every candidate type (their least common multiple) and rotate along the row:
    row ``i`` starts where row ``i - 1``'s window ended (the last one of a pass ends at the row's end), and the
    next pass starts where the row length left off, so the windows of consecutive rows tile the row."""
    n, ncols = shape
    align = int(np.lcm.reduce([block_size(t) for t in candidates])) if candidates else ncols
    width = max(align, max_values // max(n, 1) // align * align)
    if n * ncols <= max_values or 2 * width > ncols:  # under 2x less work is not worth a coarser estimate
        return None
    return np.minimum(np.arange(n) * width % ncols, ncols - width), width


def _windows(a: np.ndarray, windows: tuple[np.ndarray, int] | None) -> np.ndarray:
    """Each row's window of ``a`` (rows, ncols, or one row that every sampled row shares); ``a`` itself when
    rows are measured whole."""
    if windows is None:
        return a
    starts, width = windows
    a = np.broadcast_to(a, (len(starts), a.shape[1]))
    return a[np.arange(len(starts))[:, None], starts[:, None] + np.arange(width)]


# The Gaussian reference for the per-type noise: 32 rows of the tensor's width (its NSR is within ~1%),
# or fewer rows for wide tensors, so that no reference holds much more than 49152 values (32 rows of
# 1536). Every ggml type quantizes blocks of 32-256 weights independently, so a wider reference only
# costs time: 32 rows of a 70B model's 28672-wide ffn_down took seconds per type for nothing.
REFERENCE_ROWS = 32
REFERENCE_VALUES = 32 * 1536

_noise_lock = threading.Lock()
_noise: dict[tuple[QuantType, int], float] = {}


def reference_rows(ncols: int) -> int:
    """Rows of the Gaussian reference for tensors ``ncols`` wide."""
    return max(1, min(REFERENCE_ROWS, -(-REFERENCE_VALUES // ncols)))


def known_noise() -> dict[tuple[QuantType, int], float]:
    """Every (type, width) priced so far in this process, to be kept across runs (score/journal.PriceCache)."""
    with _noise_lock:
        return dict(_noise)


def remember_noise(table: Mapping[tuple[QuantType, int], float]) -> None:
    """Prices from an earlier run of the same code and llama.cpp (the reference is seeded: same values)."""
    with _noise_lock:
        _noise.update(table)


def type_noise(job: TensorJob, qtype: QuantType) -> float:
    """Noise-to-signal ratio of llama.cpp's quantizer for ``qtype`` on seeded Gaussian rows of the job's width."""
    return price(job.kernels, qtype, job.shape[0])


def price(kernels: Kernels, qtype: QuantType, ncols: int) -> float:
    """``type_noise`` for rows ``ncols`` wide: from the table when priced before, else measured and kept."""
    key = (qtype, ncols)
    with _noise_lock:
        if key in _noise:
            return _noise[key]
    x = np.random.default_rng(ncols).standard_normal((reference_rows(ncols), ncols)).astype(np.float32)
    flat = np.ones(ncols, np.float32)  # a flat imatrix: IQ1/IQ2 types refuse to quantize without one
    deq = kernels.dequantize(kernels.quantize(x, qtype, flat), qtype, ncols)
    value = float(np.sum((x.astype(np.float64) - deq) ** 2) / np.sum(x.astype(np.float64) ** 2))
    with _noise_lock:
        _noise[key] = value
    return value


def generic_errors(job: TensorJob) -> dict[QuantType, float]:
    return {t: type_noise(job, t) for t in job.candidates}


@register("uniform", needs_rows=False, calibrated=False, reads_weights=False,
          description="no measurement: every tensor alike, each type priced on Gaussian weights")
def uniform(job: TensorJob) -> TensorScore:
    """Every weight alike, not weighted by role: each type costs the noise llama.cpp's quantizer puts on
    Gaussian weights of the tensor's width, and the planner weights it by the tensor's element count, so
    the plan spreads bits as evenly as the row lengths allow, with the best type at each size (the baseline
    every measured strategy must beat, and the pure paper strategies with all blocks equal). Until the
    Gaussian prices it used the textbook ``2^(-2 bpw)``, which cannot tell Q4_0 from IQ4_NL at 4.5 bpw:
    the paper strategies then beat it by picking better types, not by their rankings."""
    return TensorScore(generic_errors(job))


OUTLIER_SHARE = 0.01


def typical_power(weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` (rows, ncols): the mean activation power of its columns without the top 1%."""
    ncols = weights.shape[1]
    keep = ncols - max(1, int(ncols * OUTLIER_SHARE)) if ncols > 1 else 1
    return np.partition(weights, keep - 1, axis=1)[:, :keep].mean(axis=1, keepdims=True)


def _column_weights(job: TensorJob) -> np.ndarray:
    """Per sampled row, its columns' activation power; for stacked experts also times the expert's share of
    the tokens routed (``job.usage``), so that an expert few tokens reach weighs little in the tensor's error
    and signal alike."""
    if job.imatrix is None:
        return np.ones((1, job.rows.shape[1]), dtype=np.float64)
    weights = job.imatrix[job.row_groups].astype(np.float64)
    if job.usage is not None:
        weights *= job.usage[job.row_groups].astype(np.float64)[:, None]
    return weights


def _roundtrip(job: TensorJob, rows: np.ndarray, starts: np.ndarray | None, qtype: QuantType, sel: slice) -> np.ndarray:
    """Quantize and dequantize the selected (windows of) sampled rows, one imatrix slice (expert and window) at
    a time."""
    rows, groups = rows[sel], job.row_groups[sel]
    ncols = rows.shape[1]
    if job.imatrix is None:
        return job.kernels.dequantize(job.kernels.quantize(rows, qtype, None), qtype, ncols)
    first = np.zeros(len(groups), np.int64) if starts is None else starts[sel]
    out = np.empty_like(rows)
    for g, c in sorted(set(zip(groups.tolist(), first.tolist()))):
        mask = (groups == g) & (first == c)
        blocks = job.kernels.quantize(rows[mask], qtype, job.imatrix[g, c:c + ncols])
        out[mask] = job.kernels.dequantize(blocks, qtype, ncols)
    return out
