"""Maths shared by the engine, the scorers and evaluation: it sits below all of them and imports none.

log-softmax and NLL as llama.cpp's perplexity tool computes them (float32 values, float64 sums);
the effective rank of LieQ's representational compactness; the nearest code on a quantization block's lattice.
"""
from __future__ import annotations

import math

import numpy as np

_SOFTMAX_BLOCK = 1 << 20  # floats per log-softmax block (4 MB): bounded scratch, cache friendly


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32 (float64 sums), like perplexity.cpp's ``log_softmax``.

    Args:
        logits: (n, vocab) raw logits.

    Returns:
        (n, vocab) float32 log-probabilities.
    """
    x = np.asarray(logits, dtype=np.float32)
    out = np.empty_like(x)
    log_softmax_into(x, out)
    return out


def log_softmax_into(logits: np.ndarray, out: np.ndarray) -> None:
    """Row-wise log-softmax of float32 ``logits`` into ``out``, in blocks of rows (bounded scratch)."""
    rows = max(1, _SOFTMAX_BLOCK // logits.shape[1])
    for s in range(0, logits.shape[0], rows):
        src, dst = logits[s:s + rows], out[s:s + rows]
        np.subtract(src, src.max(axis=1, keepdims=True), out=dst)
        lse = np.log(np.exp(dst).sum(axis=1, dtype=np.float64)).astype(np.float32)
        dst -= lse[:, None]


def target_nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log prob of each row's actual next token, float64.

    Raises:
        ValueError: ``logprobs`` is not (n, vocab) with n ``targets``.
    """
    if logprobs.ndim != 2 or targets.ndim != 1 or logprobs.shape[0] != targets.shape[0]:
        raise ValueError(f"target_nll: expected (n, vocab) rows and n targets, got {logprobs.shape} and {targets.shape}")
    return -np.take_along_axis(logprobs, targets[:, None].astype(np.intp), axis=1)[:, 0].astype(np.float64)


def effective_rank(x: np.ndarray) -> float:
    """Roy & Vetterli's effective rank of the rows of ``x``: ``exp`` of the entropy of the normalised
    singular values (1 for rank one, ``min(shape)`` for a perfectly isotropic matrix)."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def lattice_codes(x: np.ndarray, step: np.ndarray, zero: np.ndarray | float, levels: np.ndarray | None = None
                  ) -> np.ndarray:
    """The nearest code of each value on its block's lattice: ``zero + step * code`` or, with ``levels``
    (ascending), ``step * levels[code]``; int32, unclipped, 0 where the step is 0 (a block of zeros)."""
    safe = np.where(step == 0, 1.0, step)
    if levels is None:
        code = np.rint((x - zero) / safe)
    else:
        code = np.searchsorted((levels[1:] + levels[:-1]) / 2, x / safe)
    return np.where(step == 0, 0, code).astype(np.int32)
