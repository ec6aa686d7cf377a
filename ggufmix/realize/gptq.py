"""GPTQ-style error feedback with llama.cpp's own rounding (pure numerics).

A weight ``W`` (rows = outputs, columns = inputs) feeds a matrix multiplication whose inputs have the
second-moment matrix ``H = sum x x^T`` on calibration text. The layer's output error of a rounded ``Q``
is ``tr((W - Q) H (W - Q)^T)``. GPTQ (Frantar et al., arXiv 2210.17323) rounds the columns in order and
moves each rounding error onto the columns not yet rounded, so that later columns cancel it.

GGUF types round a whole block of a row at once (32 or 256 columns, with shared scales), so here the
unit is the type's block: llama.cpp quantizes block ``b`` of every row (its own kernel, with the
imatrix), and the block's error ``E`` moves onto the columns after it, the optimal update for a block
fixed at once: ``W[:, rest] -= E U[b, b]^-1 U[b, rest]`` with ``U`` the upper Cholesky factor of
``H^-1``. llama.cpp rounds the blocks of K, IQ and Q8_0 types independently, so quantizing the final
``W`` gives back the blocks rounded here: the compensated weight goes into the source file and
llama_model_quantize does the rest. Q4_0..Q5_1 with an imatrix weigh values by the whole row's mean
square; a block alone rounds some values differently, with the same error within 1%
(tests/test_gptq.py).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Damping: a share of the mean diagonal added to H (GPTQ uses 0.01). On SmolLM2 at Q4_K_M's size, 0.1 and 32
# chunks gave held-out KLD 0.0367 against 0.0384 with 0.01 and 16 chunks (work notes, docs/results.md).
DAMP = 0.1

Roundtrip = Callable[[np.ndarray, slice], np.ndarray]


def inverse_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``H^-1 = U^T U``), float32.

    Without forming the inverse: with ``J`` the reversal, ``J H J = R R^T`` (R lower) gives ``H = Ũ Ũ^T`` with
    ``Ũ = J R J`` upper, so ``U = Ũ^-1 = J R^-1 J``: one Cholesky and one triangular inverse, a quarter of
    inverting ``H`` and factoring the inverse. Inputs that never fired (zero diagonal) get a unit diagonal.
    In float32, as GPTQ does: the damping bounds the condition number by ``cols / damp``, and on an 8960-column
    matrix the factor came out within 5e-7 of float64's in a third of the time (10 s against 30 s, 2 cores).
    """
    h = np.array(h, dtype=np.float32)
    dead = np.diagonal(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diagonal(h), dtype=np.float64))
    r = np.linalg.cholesky(h[::-1, ::-1])
    return np.ascontiguousarray(lower_inverse(r)[::-1, ::-1])


def lower_inverse(r: np.ndarray, leaf: int = 256) -> np.ndarray:
    """The inverse of a lower-triangular matrix by halves, ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1,
    D^-1]]``: matrix products only, about n^3/3 operations."""
    n = r.shape[0]
    if n <= leaf:
        return np.tril(np.linalg.inv(r))
    k = n // 2
    a_inv, d_inv = lower_inverse(r[:k, :k], leaf), lower_inverse(r[k:, k:], leaf)
    out = np.zeros_like(r)
    out[:k, :k], out[k:, k:] = a_inv, d_inv
    out[k:, :k] = -d_inv @ (r[k:, :k] @ a_inv)
    return out


def feedback_steps(u: np.ndarray, block: int) -> list[np.ndarray]:
    """For each block ``b`` but the last, ``U[b, b]^-1 U[b, rest]``: how its error moves onto the later columns
    (the same for every row and every type with this block size)."""
    cols = u.shape[0]
    if cols % block or u.shape != (cols, cols):
        raise ValueError(f"a {u.shape} factor does not split into blocks of {block}")
    return [np.linalg.solve(u[b0:b0 + block, b0:b0 + block], u[b0:b0 + block, b0 + block:]).astype(np.float32)
            for b0 in range(0, cols - block, block)]


def compensate(w: np.ndarray, steps: list[np.ndarray], block: int, roundtrip: Roundtrip,
               store: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The weight to hand the quantizer: ``w`` with each block's rounding error moved onto later columns.

    Args:
        w: float32 (rows, cols); cols a whole number of ``block``.
        steps: ``feedback_steps(inverse_factor(H), block)`` for this weight's input.
        block: the type's block size (columns rounded together).
        roundtrip: ``(w_block, cols)`` -> ``dequantize(quantize(w_block))`` with the columns' imatrix
            slice.
        store: the source file's rounding (float32 -> F16 -> float32 for an F16 source), so that the
            quantizer's input is the value rounded here; None for F32.

    Returns:
        float32 (rows, cols); quantizing it block by block gives what ``roundtrip`` returned here.
    """
    rows, cols = w.shape
    if cols % block or len(steps) != cols // block - 1:
        raise ValueError(f"a ({rows}, {cols}) weight with blocks of {block} and {len(steps)} steps do not match")
    out = np.array(w, dtype=np.float32)
    for i, b0 in enumerate(range(0, cols, block)):
        b1 = b0 + block
        running = out[:, b0:b1].copy()
        if store is not None:
            out[:, b0:b1] = store(running)
        err = running - roundtrip(out[:, b0:b1], slice(b0, b1))
        if b1 < cols:
            out[:, b1:] -= err @ steps[i]
    return out


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``tr((w - q) H (w - q)^T)``: the summed squared output error over the inputs ``H`` came from."""
    d = np.asarray(w, np.float32) - np.asarray(q, np.float32)
    return float(np.sum((d @ np.asarray(h, np.float32)) * d, dtype=np.float64))
