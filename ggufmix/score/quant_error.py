"""The default, measured scorer: llama.cpp's real quantizer error for every candidate type."""
from __future__ import annotations

import numpy as np

from ggufmix.score.base import TensorJob, TensorScore, register
from ggufmix.types import QuantType, bits_per_weight


# ggml's IQ quantizers search codebooks and run ~50x slower than the others: they see every
# SLOW_STRIDE-th sampled row only (the error estimate stays within a few percent, measured on SmolLM2).
SLOW_TYPES = frozenset({QuantType.IQ1_S, QuantType.IQ1_M, QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ2_S,
                        QuantType.IQ3_XXS, QuantType.IQ3_S, QuantType.IQ4_NL, QuantType.IQ4_XS})
SLOW_STRIDE = 4


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
    ``a_j = 1`` and all forms agree.
    """
    weights = _column_weights(job)
    x = job.rows.astype(np.float64)
    power = typical_power(weights) * x * x
    signal = float(power.sum())
    if signal <= 0.0:
        return TensorScore({t: 0.0 for t in job.candidates}, stats={"signal": 0.0})
    errors = {}
    for qtype in job.candidates:
        sel = slice(None, None, SLOW_STRIDE) if qtype in SLOW_TYPES and len(x) >= 4 * SLOW_STRIDE else slice(None)
        deq = _roundtrip(job, qtype, sel)
        err = weights[sel] if weights.shape[0] > 1 else weights
        sig = float(power[sel].sum())
        errors[qtype] = float(np.sum(err * (x[sel] - deq) ** 2)) / sig if sig > 0 else 0.0
    return TensorScore(errors, stats={"signal": signal / job.rows.size})


@register("uniform", needs_rows=False, calibrated=False,
          description="no measurement: every tensor alike, error 2^(-2 bpw)")
def uniform(job: TensorJob) -> TensorScore:
    """The textbook rate-distortion model, identical for every weight and not weighted by role: the planner
    weights it by each tensor's element count, so the plan spreads bits as evenly as the tensors' row
    lengths allow (the baseline every measured strategy must beat)."""
    return TensorScore({t: float(2.0 ** (-2.0 * bits_per_weight(t))) for t in job.candidates})


OUTLIER_SHARE = 0.01


def typical_power(weights: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` (rows, ncols): the mean activation power of its columns without the top 1%."""
    ncols = weights.shape[1]
    keep = ncols - max(1, int(ncols * OUTLIER_SHARE)) if ncols > 1 else 1
    return np.partition(weights, keep - 1, axis=1)[:, :keep].mean(axis=1, keepdims=True)


def _column_weights(job: TensorJob) -> np.ndarray:
    if job.imatrix is None:
        return np.ones((1, job.rows.shape[1]), dtype=np.float64)
    return job.imatrix[job.row_groups].astype(np.float64)


def _roundtrip(job: TensorJob, qtype: QuantType, sel: slice) -> np.ndarray:
    """Quantize and dequantize the selected sampled rows, one imatrix slice (expert) at a time."""
    rows, groups = job.rows[sel], job.row_groups[sel]
    ncols = rows.shape[1]
    if job.imatrix is None:
        return job.kernels.dequantize(job.kernels.quantize(rows, qtype, None), qtype, ncols)
    out = np.empty_like(rows)
    for g in np.unique(groups):
        mask = groups == g
        blocks = job.kernels.quantize(rows[mask], qtype, job.imatrix[g])
        out[mask] = job.kernels.dequantize(blocks, qtype, ncols)
    return out
