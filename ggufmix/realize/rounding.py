"""A wider search for the scales of Q4_1 / Q5_1 blocks and Q4_K / Q5_K super-blocks, kept block by block where it
rounds with less imatrix-weighted error than llama.cpp's own quantizer.

llama.cpp fits each block's scale and minimum with a short search (``make_qkx3_quants``) under its own weighting,
the imatrix times ``sqrt(sigma2 + x^2)``, and for the K types then rounds the eight sub-blocks' scales and minimums
to 6 bits and the codes again, without fitting anything to the rounded scales. Here each block starts from many
scales and offsets and refits both by weighted least squares after each rounding of its codes; for the K types the
super-block's two scales are chosen over a few candidates, each sub-block's 6-bit scale and minimum moved by one
step where that rounds better, and the two refitted to the rounded integers. The weight of each value is the
imatrix alone: the output error for inputs whose columns' powers are the imatrix.

``build --search-rounding``. On SmolLM2-135M's plan at Q5_K_M's size the search lowered the imatrix-weighted error
of its Q5_1 weights by 6.5% and of its Q5_K ffn_down by 11%, and the file's KLD by 4-9% on four held-out texts; on
Qwen2.5-Coder-1.5B's by 4-8% on three of four, for 23 minutes of numpy on 2 cores (docs/results.md).
"""
from __future__ import annotations

import logging
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ggufmix.engine import kernels
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import open_gguf, writable_tensors
from ggufmix.plan.plan import Plan
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

# The largest code of each searched type: values are scale * code + offset, codes 0..top.
AFFINE_32 = {QuantType.Q4_1: 15, QuantType.Q5_1: 31}
AFFINE_K = {QuantType.Q4_K: 15, QuantType.Q5_K: 31}
SEARCHED = frozenset(AFFINE_32) | frozenset(AFFINE_K)
SUB = 32       # a K super-block's sub-block (each with a 6-bit scale and minimum)
SUBS = 8       # sub-blocks per 256-value super-block
SIX_BITS = 63
# Starting scales: the block's range over top + 4s codes; starting offsets: the block's minimum moved by t tenths
# of its range. 20 x 4 starts with 3 refits each took Q5_1's error 6.5% under llama.cpp's on SmolLM2-135M, 160 x 4
# a further 0.5%, 16 x 1 half as far.
SCALE_STARTS = tuple(np.linspace(-0.3, 0.3, 20))
OFFSET_STARTS = (0.0, -0.1, 0.1, -0.2)
# A K type's sub-blocks start from fewer: its integer scales are searched after. On Qwen2.5-Coder-1.5B's
# blk.10.ffn_up at Q5_K, 10 x 2 starts left 0.911 of llama.cpp's error in 0.74 s (256 rows), 20 x 4 0.903 in 1.7 s.
K_SCALE_STARTS = tuple(np.linspace(-0.3, 0.3, 10))
K_OFFSET_STARTS = (0.0, -0.1)
REFITS = 3
# The K super-block's scales over the largest sub-block's / 63, tried in every pair.
K_SCALE_SHRINK = (1.0, 0.97, 0.94, 0.91, 0.88)
K_MIN_SHRINK = (1.0, 0.95, 0.9, 0.85)
ROWS_AT_ONCE = 256
READ_ROWS = 16 * ROWS_AT_ONCE  # source rows read at once by write_searched


def half(a: np.ndarray) -> np.ndarray:
    """``a`` as the F16 a block header stores, in float32."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def codes_on(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, top: int) -> np.ndarray:
    """Each value's nearest code on ``offset + scale * code`` (the last axis of ``x`` is the block's values):
    numerics.lattice_codes per block, kept float32 (its int32 codes would turn every product after into float64)."""
    safe = np.where(scale > 0, scale, 1.0)
    return np.where(scale[..., None] > 0, np.clip(np.rint((x - offset[..., None]) / safe[..., None]), 0, top), 0)


def weighted_error(x: np.ndarray, w: np.ndarray, scale: np.ndarray, offset: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (w * (x - scale[..., None] * q - offset[..., None]) ** 2).sum(-1)


def solve_pair(m11: np.ndarray, m12: np.ndarray, m22: np.ndarray, b1: np.ndarray, b2: np.ndarray,
               old1: np.ndarray, old2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each block's weighted least squares in two unknowns, ``[[m11, m12], [m12, m22]] c = [b1, b2]``; the old
    values where the system is degenerate."""
    det = m11 * m22 - m12 * m12
    ok = det > 1e-30
    safe = np.where(ok, det, 1.0)
    return np.where(ok, (m22 * b1 - m12 * b2) / safe, old1), np.where(ok, (m11 * b2 - m12 * b1) / safe, old2)


def refit(x: np.ndarray, w: np.ndarray, q: np.ndarray, scale: np.ndarray, offset: np.ndarray, nonpositive: bool
          ) -> tuple[np.ndarray, np.ndarray]:
    """The weighted least-squares scale and offset for codes ``q`` (blocks are rows); where the fit is degenerate
    or its scale not positive, the old ones; with ``nonpositive`` the offset at most 0 (a K type's minimum is
    subtracted), the scale then refitted alone."""
    sw, sq, sqq = w.sum(1), (w * q).sum(1), (w * q * q).sum(1)
    sx, sqx = (w * x).sum(1), (w * q * x).sum(1)
    s, o = solve_pair(sqq, sq, sw, sqx, sx, scale, offset)
    if nonpositive:
        alone = np.where(sqq > 0, sqx / np.where(sqq > 0, sqq, 1.0), scale)
        s, o = np.where(o > 0, alone, s), np.minimum(o, 0.0)
    return np.where(s > 0, s, scale), o


def fit_affine(x: np.ndarray, w: np.ndarray, top: int, *, nonpositive: bool, stored: bool,
               starts: tuple[tuple[float, ...], tuple[float, ...]] = (SCALE_STARTS, OFFSET_STARTS)
               ) -> tuple[np.ndarray, np.ndarray]:
    """The best scale and offset of each block (row of ``x``) over ``starts`` (scales x offsets), REFITS refits
    each; ``stored``: both rounded to F16 as the header holds them (Q4_1 / Q5_1)."""
    lo, hi = np.minimum(x.min(1), 0.0) if nonpositive else x.min(1), x.max(1)
    best = np.full(len(x), np.inf, dtype=np.float32)
    best_s, best_o = np.zeros_like(best), np.zeros_like(best)
    keep = half if stored else (lambda a: a)
    for shift in starts[1]:
        o0 = np.minimum(lo + shift * (hi - lo) * 0.1, 0.0)
        for grow in starts[0]:
            s, o = np.maximum((hi - o0) / (top + 4 * grow), 1e-12), o0
            for _ in range(REFITS):
                s, o = refit(x, w, codes_on(x, s, o, top), s, o, nonpositive)
                s, o = keep(s), keep(o)
            e = weighted_error(x, w, s, o, codes_on(x, s, o, top))
            better = e < best
            best, best_s[better], best_o[better] = np.where(better, e, best), s[better], o[better]
    return best_s, best_o


def search_32(x: np.ndarray, w: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1 / Q5_1 blocks (rows of 32): the header's scale ``d`` and minimum ``m`` (F16 values) and the codes."""
    d, m = fit_affine(x, w, top, nonpositive=False, stored=True)
    return d, m, codes_on(x, d, m, top).astype(np.int32)


def search_k(x: np.ndarray, w: np.ndarray, top: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K / Q5_K super-blocks, ``x`` and ``w`` (n, 8, 32): the header's ``d`` and ``dmin`` (F16 values), each
    sub-block's 6-bit scale and minimum (n, 8) and the codes (n, 8, 32)."""
    n = len(x)
    s, o = fit_affine(x.reshape(-1, SUB), w.reshape(-1, SUB), top, nonpositive=True, stored=False,
                      starts=(K_SCALE_STARTS, K_OFFSET_STARTS))
    s, mins = s.reshape(n, SUBS), -o.reshape(n, SUBS)
    best = np.full(n, np.inf, dtype=np.float32)
    found = (np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros((n, SUBS)), np.zeros((n, SUBS)))
    for fd in K_SCALE_SHRINK:
        for fm in K_MIN_SHRINK:
            d, dmin = half(s.max(1) / SIX_BITS / fd), half(mins.max(1) / SIX_BITS / fm)
            cand = _best_integers(x, w, top, d, dmin, _six_bits(s, d), _six_bits(mins, dmin))
            e = _k_error(x, w, top, *cand)
            better = e < best
            best = np.where(better, e, best)
            for held, new in zip(found, cand):
                held[better] = new[better]
    d, dmin, sc, mn = found
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), codes_on(x, d[:, None] * sc, -dmin[:, None] * mn,
                                                                         top).astype(np.int32)


def _six_bits(v: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(v / np.where(unit > 0, unit, 1.0)[:, None]), 0, SIX_BITS)


def _k_error(x: np.ndarray, w: np.ndarray, top: int, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray,
             mn: np.ndarray) -> np.ndarray:
    scale, offset = d[:, None] * sc, -dmin[:, None] * mn
    return weighted_error(x, w, scale, offset, codes_on(x, scale, offset, top)).sum(1)


def _best_integers(x: np.ndarray, w: np.ndarray, top: int, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray,
                   mn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each sub-block's scale and minimum moved by one step where that rounds better, then ``d`` and ``dmin``
    refitted to the integers and codes (kept where that rounds better)."""
    err = np.full(sc.shape, np.inf, dtype=np.float32)
    best_sc, best_mn = sc.copy(), mn.copy()
    for ds in (-1, 0, 1):
        for dm in (-1, 0, 1):
            s2, m2 = np.clip(sc + ds, 0, SIX_BITS), np.clip(mn + dm, 0, SIX_BITS)
            scale, offset = d[:, None] * s2, -dmin[:, None] * m2
            e = weighted_error(x, w, scale, offset, codes_on(x, scale, offset, top))
            better = e < err
            err, best_sc[better], best_mn[better] = np.where(better, e, err), s2[better], m2[better]
    q = codes_on(x, d[:, None] * best_sc, -dmin[:, None] * best_mn, top)
    a1, a2 = best_sc[..., None] * q, -np.broadcast_to(best_mn[..., None], q.shape)
    m11, m12, m22 = (w * a1 * a1).sum((1, 2)), (w * a1 * a2).sum((1, 2)), (w * a2 * a2).sum((1, 2))
    b1, b2 = (w * a1 * x).sum((1, 2)), (w * a2 * x).sum((1, 2))
    d2, dmin2 = (half(np.maximum(c, 0.0)) for c in solve_pair(m11, m12, m22, b1, b2, d, dmin))
    refitted = _k_error(x, w, top, d2, dmin2, best_sc, best_mn) < err.sum(1)
    return np.where(refitted, d2, d), np.where(refitted, dmin2, dmin), best_sc, best_mn


def searched_blocks(rows: np.ndarray, qtype: QuantType, blocks: np.ndarray, imatrix: np.ndarray | None
                    ) -> np.ndarray:
    """``blocks`` (llama.cpp's for ``rows``, (nrows, row bytes)) with each block the search rounds with less
    imatrix-weighted error replaced by the search's."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, ncols = x.shape
    w = np.broadcast_to(np.ones(ncols, np.float32) if imatrix is None else imatrix.astype(np.float32), x.shape)
    if qtype in AFFINE_32:
        d, m, q = search_32(x.reshape(-1, SUB), np.ascontiguousarray(w).reshape(-1, SUB), AFFINE_32[qtype])
        ours = kernels.with_header(blocks, qtype, d, m)
    else:
        shape = (-1, SUBS, SUB)
        d, dmin, sc, mn, q = search_k(x.reshape(shape), np.ascontiguousarray(w).reshape(shape), AFFINE_K[qtype])
        ours = kernels.with_header(blocks, qtype, d, dmin, sc, mn)
    ours = kernels.pack_codes(ours, qtype, q.reshape(nrows, ncols))
    return _better_blocks(x, w, qtype, blocks, ours)


def _better_blocks(x: np.ndarray, w: np.ndarray, qtype: QuantType, theirs: np.ndarray, ours: np.ndarray
                   ) -> np.ndarray:
    nrows, ncols = x.shape
    per = SUB if qtype in AFFINE_32 else SUB * SUBS
    err = [(w * (x - kernels.dequantize_rows(b, qtype, ncols)) ** 2).reshape(nrows, -1, per).sum(-1)
           for b in (theirs, ours)]
    size = kernels.type_size(qtype)
    out = np.array(theirs, copy=True).reshape(nrows, -1, size)
    take = err[1] < err[0]
    out[take] = ours.reshape(nrows, -1, size)[take]
    return out.reshape(theirs.shape)


def quantize_searched(rows: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None, threads: int = 1
                      ) -> np.ndarray:
    """llama.cpp's blocks for ``rows``, improved by the search where ``qtype`` is SEARCHED (ROWS_AT_ONCE rows a
    task, ``threads`` at once)."""
    blocks = kernels.quantize_rows(rows, qtype, imatrix, threads)
    return _searched_over(rows, qtype, blocks, imatrix, threads) if qtype in SEARCHED else blocks


def write_searched(quantized: Path, values: Path, plan: Plan, imatrix: Imatrix | None, skip: Collection[str] = (),
                   threads: int = 1) -> None:
    """Search the blocks of every planned weight at a SEARCHED type but ``skip``, from its values in ``values``
    (the file llama.cpp quantized), and write the better ones into ``quantized`` in place."""
    todo = [e for e in plan.quantized() if e.qtype in SEARCHED and e.name not in skip]
    if not todo:
        return
    src = open_gguf(values)
    with writable_tensors(quantized) as tensors:
        for e in todo:
            info, raw = tensors[e.name]
            if info.qtype != e.qtype:
                continue  # verify() names the fallback
            im = imatrix.values(e.name) if imatrix is not None and e.name in imatrix.names else None
            blocks = raw.reshape(info.nrows, -1)
            for r0 in range(0, info.nrows, READ_ROWS):  # a slice of the float rows in memory at a time
                rows = src.rows(e.name, np.arange(r0, min(info.nrows, r0 + READ_ROWS)))
                blocks[r0:r0 + len(rows)] = _searched_over(rows, e.qtype, blocks[r0:r0 + len(rows)], im, threads)
    logger.info("rounding: %d weights' blocks searched", len(todo))


def _searched_over(rows: np.ndarray, qtype: QuantType, blocks: np.ndarray, imatrix: np.ndarray | None,
                   threads: int) -> np.ndarray:
    spans = [(r0, min(len(rows), r0 + ROWS_AT_ONCE)) for r0 in range(0, len(rows), ROWS_AT_ONCE)]

    def part(span: tuple[int, int]) -> np.ndarray:
        return searched_blocks(rows[span[0]:span[1]], qtype, blocks[span[0]:span[1]], imatrix)
    if threads > 1 and len(spans) > 1:
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(part, spans)), axis=0)
    return np.concatenate([part(s) for s in spans], axis=0)
