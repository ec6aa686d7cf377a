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

``compensate_columns`` is GPTQ's own unit, the column, inside the block: llama.cpp's rounding of the block fixes
its grid (scales), then each column is rounded on that grid and its error moved onto the block's later columns
too; their codes go into llama.cpp's bytes for the block as they are (realize/compensate.py's COLUMN_TYPES).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from ggufmix.numerics import lattice_codes

# Damping: a share of the mean diagonal added to H (GPTQ uses 0.01). On SmolLM2 at Q4_K_M's size, 0.1 and 32
# chunks gave held-out KLD 0.0367 against 0.0384 with 0.01 and 16 chunks (work notes, docs/results.md).
DAMP = 0.1

Roundtrip = Callable[[np.ndarray, slice], np.ndarray]
# Columns whose errors move onto each other one at a time before the rest of the block takes them in one product
# (GPTQ's lazy batch): a 256-wide block's rank-one updates would otherwise rewrite the whole block per column.
COLUMN_BATCH = 32


@dataclass(frozen=True)
class Lattice:
    """What llama.cpp's rounding of a block (its scales as it chose them) lets each value be, float32 (rows, block):
    ``zero + step * code`` for codes in ``codes``, or with ``levels`` (IQ4_XS) ``step * levels[code]``."""

    step: np.ndarray
    zero: np.ndarray
    codes: tuple[int, int]
    levels: np.ndarray | None = None

    def columns(self) -> Lattice:
        """The same lattice held by columns, ``(block, rows)``, each column contiguous."""
        return replace(self, step=np.ascontiguousarray(self.step.T), zero=np.ascontiguousarray(self.zero.T))

    def nearest(self, x: np.ndarray, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Column ``j``'s nearest values to ``x`` and their codes (of a lattice held by columns)."""
        if self.levels is None:
            return on_grid(x, self.step[j], self.zero[j], self.codes)
        return on_levels(x, self.step[j], self.levels)


# ``(w_block, cols)`` -> the block's Lattice.
Grid = Callable[[np.ndarray, slice], Lattice]


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


def compensate_columns(w: np.ndarray, u: np.ndarray, block: int, grid: Grid,
                       store: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ column by column on llama.cpp's grid: the rounded weight, each column's error moved onto the columns
    after it, inside its block too.

    Each block is quantized by llama.cpp as it stands after the earlier blocks' feedback, which fixes its scales;
    its columns are then rounded one at a time on that lattice. The codes go into llama.cpp's bytes for the block
    (engine/kernels.pack_codes), so the file holds exactly what was rounded here.

    Args:
        w: float32 (rows, cols); cols a whole number of ``block``.
        u: ``inverse_factor(H)`` for this weight's input.
        block: the type's block size.
        grid: ``(w_block, cols)`` -> the Lattice of llama.cpp's rounding of the block (imatrix slice included).
        store: the source file's rounding, applied to each block before llama.cpp sees it; None for F32.

    Returns:
        The rounded values, float32 (rows, cols), and their codes, int8.
    """
    rows, cols = w.shape
    if cols % block or u.shape != (cols, cols):
        raise ValueError(f"a ({rows}, {cols}) weight, blocks of {block} and a {u.shape} factor do not match")
    out = np.array(w, dtype=np.float32)
    rounded = np.empty_like(out)
    codes = np.empty(out.shape, dtype=np.int8)
    for b0 in range(0, cols, block):
        b1 = b0 + block
        part = out[:, b0:b1] if store is None else store(out[:, b0:b1])
        lattice = grid(part, slice(b0, b1)).columns()
        rounded[:, b0:b1], codes[:, b0:b1], err = round_block_columns(part.T.copy(), lattice, u[b0:b1, b0:b1])
        if b1 < cols:
            out[:, b1:] -= err @ u[b0:b1, b1:]
    return rounded, codes


def round_block_columns(part_t: np.ndarray, lattice: Lattice, ub: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block's columns in turn (held as rows, ``(block, rows)``, so that each is contiguous): round each on its
    lattice (held by columns) and move its error onto the block's later columns. Returns the rounded block, its
    codes and its errors over ``U``'s diagonal (for the columns after the block), each (rows, block)."""
    block = part_t.shape[0]
    err_t = np.empty_like(part_t)
    rounded_t = np.empty_like(part_t)
    codes_t = np.empty(part_t.shape, dtype=np.int8)
    for s0 in range(0, block, COLUMN_BATCH):
        s1 = min(s0 + COLUMN_BATCH, block)
        for j in range(s0, s1):
            rounded_t[j], codes_t[j] = lattice.nearest(part_t[j], j)
            err_t[j] = (part_t[j] - rounded_t[j]) / ub[j, j]
            part_t[j + 1:s1] -= np.outer(ub[j, j + 1:s1], err_t[j])
        part_t[s1:] -= ub[s0:s1, s1:].T @ err_t[s0:s1]
    return rounded_t.T, codes_t.T, err_t.T


def on_grid(x: np.ndarray, step: np.ndarray, zero: np.ndarray, codes: tuple[int, int]
            ) -> tuple[np.ndarray, np.ndarray]:
    """The nearest of ``zero + code * step`` (codes within ``codes``) and its code; ``zero`` (code 0) where the step
    is 0 (a block of zeros)."""
    code = np.clip(lattice_codes(x, step, zero), codes[0], codes[1])
    return (zero + code * step).astype(np.float32), code.astype(np.int8)


def on_levels(x: np.ndarray, step: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest of ``step * levels[code]`` (``levels`` ascending) and its code."""
    code = lattice_codes(x, step, 0.0, levels)
    return (step * levels[code]).astype(np.float32), code.astype(np.int8)


def output_error(w: np.ndarray, q: np.ndarray, h: np.ndarray) -> float:
    """``tr((w - q) H (w - q)^T)``: the summed squared output error over the inputs ``H`` came from."""
    d = np.asarray(w, np.float32) - np.asarray(q, np.float32)
    return float(np.sum((d @ np.asarray(h, np.float32)) * d, dtype=np.float64))
