"""Pure numerics behind the paper strategies: weight entropy, z-score share, singular-value energy,
effective rank, and the mapping from a per-block score to an importance multiplier.

Every function takes arrays and returns numbers; nothing here opens a file or calls llama.cpp.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np


# Values per piece: the element-wise work of a chunk runs a piece at a time, in buffers that stay in the core's
# L2 cache (512 KB of float32 each) instead of 16 MB temporaries streamed through memory for every step, with
# the F16 -> float32 conversion in the same pass. A multiple of numpy's 8192-value reduction buffer: numpy
# sums float32 with dtype=float64 by adding the pairwise sums of 8192-value buffers one after another, so the
# pieces' sums carried on with ``initial=`` are the bits of one sum over the whole chunk.
PIECE = 1 << 17


def _floats(chunk: np.ndarray) -> np.ndarray:
    """Weights as a flat float array: float64 stays (exact tests), anything narrower becomes float32.

    The element-wise work (exp, products) of the weight statistics runs in float32, ~2x faster than float64,
    while every sum accumulates in float64 (numpy's pairwise summation): on 16M N(0, 0.02) weights the
    softmax excess ln N - H (~2e-4) agrees with the all-float64 computation to 4e-9.
    """
    x = np.asarray(chunk)
    return (x if x.dtype == np.float64 else x.astype(np.float32, copy=False)).ravel()


@dataclass(frozen=True)
class Chunk:
    """One chunk of a tensor's weights, which the accumulators read a piece at a time (see PIECE).

    The statistics accumulate chunk by chunk, and where chunks end changes their last bits; within a chunk
    the pieces give the same bits as the whole. ``values`` are flat, as stored; ``convert(stored, out)``
    writes stored values as float32 into ``out`` (F16 weights: the engine's converter), None when they are
    float32 or float64 already.
    """

    values: np.ndarray
    convert: Callable[[np.ndarray, np.ndarray], None] | None = None

    @classmethod
    def of(cls, chunk: np.ndarray) -> Chunk:
        return cls(_floats(chunk))

    @property
    def size(self) -> int:
        return int(self.values.size)

    def pieces(self) -> Iterator[np.ndarray]:
        """The values as floats, PIECE at a time; converted ones share one buffer, valid until the next piece.
        A float64 chunk comes whole (its sum has no buffers to follow: one pairwise sum, as before pieces)."""
        x = self.values
        if self.convert is None:
            step = x.size if x.dtype == np.float64 else PIECE
            yield from (x[i:i + step] for i in range(0, x.size, max(step, 1)))
            return
        buf = np.empty(min(PIECE, x.size), np.float32)
        for i in range(0, x.size, PIECE):
            part = x[i:i + PIECE]
            self.convert(part, buf[:part.size])
            yield buf[:part.size]

    def max(self) -> float:
        """The largest value, NaN if any value is NaN (numpy's max)."""
        return float(np.max([p.max() for p in self.pieces()]))


def _sum64(x: np.ndarray, carried: np.float64 | float) -> np.float64:
    """``carried`` plus the float64 sum of ``x``: over a chunk's pieces, the bits of ``chunk.sum(dtype=float64)``."""
    return np.add.reduce(x, dtype=np.float64, initial=carried)


@dataclass
class SoftmaxEntropy:
    """Shannon entropy of ``softmax(w.flatten())`` in one streaming pass (EWQ, arXiv 2503.04704, eq. 1-2).

    The softmax of a whole tensor is never held: with the running maximum ``m``, ``s0 = sum e^(x-m)``
    and ``s1 = sum e^(x-m) x``, the entropy is ``m + ln s0 - s1 / s0`` (= ln Z - E_p[x]). Chunks may come
    in any order and size; the result equals the direct formula to rounding.
    """

    m: float = -math.inf
    s0: float = 0.0
    s1: float = 0.0
    n: int = 0

    def add(self, chunk: np.ndarray) -> None:
        self.add_chunk(Chunk.of(chunk))

    def add_chunk(self, chunk: Chunk) -> None:
        """One chunk: its maximum first (one sweep over the pieces), then the two sums (a second)."""
        if chunk.size == 0:
            return
        m = max(self.m, chunk.max())
        scale = math.exp(self.m - m) if self.n else 0.0
        s0 = s1 = np.float64(0.0)
        scratch = None
        for x in chunk.pieces():
            scratch = np.empty_like(x) if scratch is None else scratch
            e = np.subtract(x, x.dtype.type(m), out=scratch[:x.size])
            np.exp(e, out=e)
            s0 = _sum64(e, s0)
            s1 = _sum64(np.multiply(e, x, out=e), s1)
        self.s0 = self.s0 * scale + float(s0)
        self.s1 = self.s1 * scale + float(s1)
        self.m, self.n = m, self.n + chunk.size

    @property
    def entropy(self) -> float:
        """Nats; ``ln n`` for a constant tensor, lower the more a few large weights dominate."""
        if not self.n:
            raise ValueError("entropy of an empty tensor")
        return self.m + math.log(self.s0) - self.s1 / self.s0

    @property
    def excess(self) -> float:
        """``ln n - H``: the KL divergence of the softmax distribution from uniform, free of the tensor's size.

        For small weights ``H ~ ln n - var/2``, so raw entropy mostly says how big a tensor is; the excess
        (~ var/2) compares tensors of any size. Higher excess = lower size-normalised entropy.
        """
        return math.log(self.n) - self.entropy


def z_share(w: np.ndarray, threshold: float = 1.0) -> float:
    """Share of weights whose z-score ``(w - mean) / std`` exceeds ``threshold`` (ZD, arXiv 2406.17415:
    one-sided, as the paper writes it). A Gaussian gives 0.1587 at threshold 1, a uniform 0.2113."""
    x = np.asarray(w, dtype=np.float64).ravel()
    return ZAccumulator.of(x).share_above(x, threshold)


@dataclass
class ZAccumulator:
    """Mean and standard deviation over chunks (first pass), then the share above a z threshold (second)."""

    n: int = 0
    s1: float = 0.0
    s2: float = 0.0

    @classmethod
    def of(cls, x: np.ndarray) -> ZAccumulator:
        acc = cls()
        acc.add(x)
        return acc

    def add(self, chunk: np.ndarray) -> None:
        self.add_chunk(Chunk.of(chunk))

    def add_chunk(self, chunk: Chunk) -> None:
        s1 = s2 = np.float64(0.0)
        scratch = None
        for x in chunk.pieces():
            scratch = np.empty_like(x) if scratch is None else scratch
            s1 = _sum64(x, s1)
            s2 = _sum64(np.multiply(x, x, out=scratch[:x.size]), s2)
        self.n += chunk.size
        self.s1 += float(s1)
        self.s2 += float(s2)

    @property
    def mean(self) -> float:
        return self.s1 / self.n if self.n else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.s2 / self.n - self.mean ** 2, 0.0)) if self.n else 0.0

    def count_above(self, chunk: np.ndarray | Chunk, threshold: float = 1.0) -> int:
        """Values above ``mean + threshold * std`` (compared in the values' own precision, as numpy does
        with a Python float); 0 for a constant tensor."""
        if self.std == 0.0:
            return 0
        limit = self.mean + threshold * self.std
        pieces = (chunk if isinstance(chunk, Chunk) else Chunk.of(chunk)).pieces()
        return sum(int(np.count_nonzero(x > limit)) for x in pieces)

    def share_above(self, x: np.ndarray, threshold: float = 1.0) -> float:
        return self.count_above(x, threshold) / self.n if self.n else 0.0


def topk_energy(w: np.ndarray, k: int) -> float:
    """Share of ``||w||_F^2`` in the top ``k`` singular values of the 2-D array ``w``."""
    s = np.linalg.svd(np.asarray(w, dtype=np.float64), compute_uv=False)
    total = float(np.sum(s * s))
    return float(np.sum(s[:k] ** 2)) / total if total > 0 else 0.0


def energy_k(shape: tuple[int, int], share: float = 0.05) -> int:
    """The ``k`` of top-k energy: ``share`` of the rank, at least 1 (LieQ leaves k to the user)."""
    return max(1, round(share * min(shape)))


def random_topk_energy(shape: tuple[int, int], k: int, seed: int = 0) -> float:
    """Top-k energy share of a Gaussian matrix of ``shape`` (the Marchenko-Pastur reference), seeded."""
    g = np.random.default_rng(seed).standard_normal(shape)
    return topk_energy(g, k)


def energy_gain(w: np.ndarray, share: float = 0.05, seed: int = 0) -> float:
    """LieQ's top-k energy gain (arXiv 2508.03332): top-k energy of ``w`` over a random matrix's.

    1 for noise; the more of the weight's energy sits in a few directions, the higher.
    """
    k = energy_k(w.shape, share)
    return topk_energy(w, k) / random_topk_energy(w.shape, k, seed)


def weighted_mean(values: Iterable[tuple[float, float]]) -> float:
    """``sum(v * w) / sum(w)`` over (value, weight) pairs (EWQ's parameter-weighted block entropy)."""
    pairs = list(values)
    total = sum(w for _, w in pairs)
    if total <= 0:
        raise ValueError("weights sum to zero")
    return sum(v * w for v, w in pairs) / total


# A block one standard deviation above the mean counts twice as much per unit of noise as an average one:
# with noise ~ 2^(-2 bits), the solver then gives it ~0.5 bit more. Clipped at 2 std (at most 1 bit).
Z_CLIP = 2.0


def importance_from_scores(scores: Mapping[int, float], higher_is_important: bool = True) -> dict[int, float]:
    """Per-block score -> importance multiplier ``2^clip(z)`` (z: standardised over blocks).

    The papers rank layers; the budget solver needs a weight per layer. A geometric scale keeps the
    ranking and gives equal spread to every score family, whatever its units.
    """
    sign = 1.0 if higher_is_important else -1.0
    return {b: float(2.0 ** np.clip(sign * z, -Z_CLIP, Z_CLIP)) for b, z in standardize(scores).items()}


def standardize(scores: Mapping[int, float]) -> dict[int, float]:
    """``(v - mean) / std`` over the values; all 0 when they are equal."""
    if not scores:
        return {}
    v = np.array(list(scores.values()), dtype=np.float64)
    sd = v.std()
    z = (v - v.mean()) / sd if sd > 0 else np.zeros_like(v)
    return {b: float(zi) for b, zi in zip(scores, z)}


def ewq_tiers(block_entropy: Mapping[int, float], spread: float = 1.0) -> dict[int, int]:
    """EWQ's block decision: tier 0 (quantize hardest) below ``mean - spread * std``, tier 2 (keep the most
    precision) above the mean, tier 1 between. Lower entropy = less information = quantized harder."""
    v = np.array(list(block_entropy.values()), dtype=np.float64)
    mu, sd = float(v.mean()), float(v.std())
    return {b: 0 if h < mu - spread * sd else (2 if h > mu else 1) for b, h in block_entropy.items()}
