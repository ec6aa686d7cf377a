"""Perplexity and KL-divergence statistics, pure numpy, mirroring llama.cpp's ``llama-perplexity``.

The per-token numbers come from log-softmax rows (the engine yields them, one chunk at a time); the
accumulators keep running sums, so memory does not grow with the text except for the per-token KLD
values (4 bytes a token) that the percentiles need.

Definitions follow ``tools/perplexity/perplexity.cpp`` (llama.cpp as vendored by llama-cpp-python
0.3.36), functions ``kl_divergence`` and ``log_softmax(..., kl_divergence_result &)``:

- NLL of a token is ``-log q(actual next token)``; PPL = exp(mean NLL).
- KLD of a token is ``sum_i p_i (log p_i - log q_i)`` with p the base, q the quantized model.
- "Same top p" is the fraction of tokens where argmax q == argmax p.
- Δp is ``q(actual next token) - p(actual next token)`` (the probability of the *actual* next token,
  not of the base's top token); we report its RMS like perplexity.cpp's ``RMS Δp``.
- Every ``±`` is perplexity.cpp's ``mean_and_uncertainty``: the standard error of the mean,
  ``sqrt((E[x²] - E[x]²) / (n - 1))``, set to 0 for ``n <= 10``; ``Estimate.ci95`` widens it by 1.96.

Where we differ from perplexity.cpp (all on purpose, all small):

- perplexity.cpp stores the base log-probabilities as uint16 over ``[max - 16, max]`` and drops base
  entries with ``log p <= -16`` from the KLD sum. We use the float32 log-probabilities, all of them.
- Base ties for the top token: perplexity.cpp compares uint16-rounded values; we compare float32.
- Percentiles use numpy's linear interpolation, which is perplexity.cpp's ``percentile`` lambda.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ggufmix.numerics import target_nll

logger = logging.getLogger(__name__)

_Z95 = 1.959963984540054


def _check_rows(name: str, rows: np.ndarray, targets: np.ndarray) -> None:
    if rows.ndim != 2 or targets.ndim != 1 or rows.shape[0] != targets.shape[0]:
        raise ValueError(f"{name}: expected (n, vocab) rows and n targets, got {rows.shape} and {targets.shape}")


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error (perplexity.cpp's ``value ± uncertainty``)."""

    value: float
    stderr: float

    @property
    def ci95(self) -> tuple[float, float]:
        """Normal-approximation 95% confidence interval (perplexity.cpp prints ±1 standard error)."""
        return (self.value - _Z95 * self.stderr, self.value + _Z95 * self.stderr)

    def to_json(self) -> dict[str, float]:
        lo, hi = self.ci95
        return {"value": self.value, "stderr": self.stderr, "ci95_low": lo, "ci95_high": hi}


def mean_and_uncertainty(total: float, total_sq: float, count: int) -> Estimate:
    """perplexity.cpp's ``mean_and_uncertainty``: mean and standard error from running sums.

    Args:
        total: sum of the values.
        total_sq: sum of their squares.
        count: how many values.

    Returns:
        The mean and ``sqrt(var / (count - 1))``; the error is 0 when ``count <= 10`` or var <= 0.
    """
    if count < 1:
        return Estimate(0.0, 0.0)
    mean = total / count
    var = total_sq / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0
    return Estimate(mean, err)


def paired_difference(first: np.ndarray, second: np.ndarray) -> Estimate:
    """Mean of ``second - first`` over the same tokens, with its standard error.

    Two models evaluated on one text share each token's difficulty, which is part of either model's own error; in
    the difference it cancels, so the paired error says better whether one model beats the other (two 3 bpw files
    of one 1.5B model on 4 x 512 tokens: ±0.011 against ±0.015 each).

    Raises:
        ValueError: the arrays cover different numbers of tokens.
    """
    if first.shape != second.shape:
        raise ValueError(f"paired_difference: {first.size} tokens against {second.size}")
    d = second.astype(np.float64) - first.astype(np.float64)
    return mean_and_uncertainty(float(d.sum()), float(np.dot(d, d)), d.size)


def covariance_of_means(sum_a: float, sum_b: float, sum_ab: float, count: int) -> float:
    """perplexity.cpp's ``covariance`` lambda: Cov(a, b) / (n - 1), 0 below 10 values."""
    if count < 10:
        return 0.0
    return (sum_ab / count - (sum_a / count) * (sum_b / count)) / (count - 1)


@dataclass(frozen=True)
class TokenStats:
    """Per-token numbers of one chunk, quantized model against the base.

    Attributes:
        nll: -log q(actual next token), float64.
        nll_base: -log p(actual next token), float64.
        kld: KL(p || q) of each token, float64: exact, or an unbiased estimate from the base cache.
        same_top: argmax q == argmax p, bool.
        kld_bound: a per-token lower bound of KL(p || q) when ``kld`` is an estimate, else None.
    """

    nll: np.ndarray
    nll_base: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    kld_bound: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.nll.shape[0]
        for name in ("nll_base", "kld", "same_top", "kld_bound"):
            if getattr(self, name) is not None and getattr(self, name).shape != (n,):
                raise ValueError(f"TokenStats.{name}: shape {getattr(self, name).shape}, expected ({n},)")


def kld_rows(base_logprobs: np.ndarray, quant_logprobs: np.ndarray) -> np.ndarray:
    """Exact full-vocabulary KL(p || q) of each row, from log-probabilities.

    Args:
        base_logprobs: (n, vocab) log p, float32.
        quant_logprobs: (n, vocab) log q, float32.

    Returns:
        (n,) float64 KLD; terms with p == 0 contribute 0.
    """
    if base_logprobs.shape != quant_logprobs.shape:
        raise ValueError(f"kld_rows: base {base_logprobs.shape} and quant {quant_logprobs.shape} differ")
    out = np.empty(base_logprobs.shape[0], dtype=np.float64)
    block = max(1, (1 << 22) // max(1, base_logprobs.shape[1]))  # ~16 MB temporaries, cache friendly
    for s in range(0, base_logprobs.shape[0], block):
        p_log = base_logprobs[s:s + block]
        diff = p_log - quant_logprobs[s:s + block]
        out[s:s + block] = np.einsum("ij,ij->i", np.exp(p_log), diff, dtype=np.float64)
    return out


def token_stats_full(base_logprobs: np.ndarray, quant_logprobs: np.ndarray, targets: np.ndarray) -> TokenStats:
    """Per-token statistics from two full log-softmax blocks (the exact path).

    Args:
        base_logprobs: (n, vocab) log p of the base model.
        quant_logprobs: (n, vocab) log q of the quantized model.
        targets: (n,) actual next tokens.

    Returns:
        The chunk's TokenStats.
    """
    _check_rows("token_stats_full", quant_logprobs, targets)
    return TokenStats(
        nll=target_nll(quant_logprobs, targets),
        nll_base=target_nll(base_logprobs, targets),
        kld=kld_rows(base_logprobs, quant_logprobs),
        same_top=np.argmax(quant_logprobs, axis=1) == np.argmax(base_logprobs, axis=1),
    )


@dataclass(frozen=True)
class PerplexityStats:
    """PPL of one model over the scored tokens.

    Attributes:
        ppl: exp(mean NLL) with perplexity.cpp's uncertainty ``ppl * stderr(NLL)``.
        mean_nll: ln(PPL) with its standard error.
        n_tokens: scored tokens.
    """

    ppl: Estimate
    mean_nll: Estimate
    n_tokens: int

    def to_json(self) -> dict[str, object]:
        return {"ppl": self.ppl.to_json(), "ln_ppl": self.mean_nll.to_json(), "n_tokens": self.n_tokens}


@dataclass
class PerplexityAccumulator:
    """Running sums for perplexity (perplexity.cpp ``perplexity()``: ``nll``, ``nll2``, ``count``)."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    count: int = 0

    def add(self, nll: np.ndarray) -> None:
        """Add one chunk's per-token NLL values."""
        nll = np.asarray(nll, dtype=np.float64)
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float(np.dot(nll, nll))
        self.count += int(nll.size)

    def result(self) -> PerplexityStats:
        """PPL ± perplexity.cpp's uncertainty."""
        est = mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count)
        ppl = math.exp(est.value)
        return PerplexityStats(Estimate(ppl, ppl * est.stderr), est, self.count)


@dataclass(frozen=True)
class DivergenceStats:
    """A quantized model against the base, perplexity.cpp's ``--kl-divergence`` summary.

    Attributes:
        kld: mean KLD ± standard error (for ``kld_method == "topk+tail-sample"`` the error includes the
            sampling noise of the estimate).
        kld_median, kld_p90, kld_p99, kld_p999, kld_max: over tokens.
        same_top: fraction of tokens with the same top token, ± sqrt(p(1-p)/(n-1)).
        dp_rms: RMS of Δp = q(next) - p(next) (a fraction, not %), ± perplexity.cpp's error.
        dp_mean: mean Δp ± standard error.
        ln_ppl_ratio: ln(PPL(Q)/PPL(base)) ± error that accounts for the correlation of the two NLLs.
        ppl_corr: correlation of ln PPL(Q) and ln PPL(base) (perplexity.cpp's ``Cor(...)``).
        n_tokens: scored tokens.
        kld_method: "exact" (full vocabulary) or "topk+tail-sample" (from the base cache).
        kld_lower_bound: from the cache, the mean of the top-k lumped lower bound; None when exact.
    """

    kld: Estimate
    kld_median: float
    kld_p90: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top: Estimate
    dp_rms: Estimate
    dp_mean: Estimate
    ln_ppl_ratio: Estimate
    ppl_corr: float
    n_tokens: int
    kld_method: str
    kld_lower_bound: Estimate | None

    @property
    def ppl_ratio(self) -> Estimate:
        """PPL(Q)/PPL(base) with perplexity.cpp's delta-method uncertainty."""
        r = math.exp(self.ln_ppl_ratio.value)
        return Estimate(r, r * self.ln_ppl_ratio.stderr)

    def to_json(self) -> dict[str, object]:
        return {
            "kld_mean": self.kld.to_json(), "kld_median": self.kld_median, "kld_p90": self.kld_p90,
            "kld_p99": self.kld_p99, "kld_p99_9": self.kld_p999, "kld_max": self.kld_max,
            "kld_method": self.kld_method,
            "kld_lower_bound": self.kld_lower_bound.to_json() if self.kld_lower_bound else None, "same_top": self.same_top.to_json(),
            "dp_rms": self.dp_rms.to_json(), "dp_mean": self.dp_mean.to_json(),
            "ln_ppl_ratio": self.ln_ppl_ratio.to_json(), "ppl_ratio": self.ppl_ratio.to_json(),
            "ppl_corr": self.ppl_corr, "n_tokens": self.n_tokens,
        }


@dataclass
class DivergenceAccumulator:
    """Running sums of perplexity.cpp's ``kl_divergence_result`` plus the per-token KLD values.

    Args:
        kld_method: how the per-token KLD was obtained ("exact" or "topk+tail-sample").
    """

    kld_method: str = "exact"
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_SUM_KEYS, 0.0))
    n_same_top: int = 0
    count: int = 0
    _kld_values: list[np.ndarray] = field(default_factory=list)

    def add(self, stats: TokenStats) -> None:
        """Add one chunk's per-token statistics."""
        dp = np.exp(-stats.nll) - np.exp(-stats.nll_base)
        s = self.sums
        s["nll"] += float(stats.nll.sum())
        s["nll2"] += float(np.dot(stats.nll, stats.nll))
        s["nll_base"] += float(stats.nll_base.sum())
        s["nll_base2"] += float(np.dot(stats.nll_base, stats.nll_base))
        s["nll_nll_base"] += float(np.dot(stats.nll, stats.nll_base))
        s["kld"] += float(stats.kld.sum())
        s["kld2"] += float(np.dot(stats.kld, stats.kld))
        s["dp"] += float(dp.sum())
        s["dp2"] += float(np.dot(dp, dp))
        s["dp4"] += float(np.sum(dp**4))
        if stats.kld_bound is not None:
            s["kld_bound"] += float(stats.kld_bound.sum())
            s["kld_bound2"] += float(np.dot(stats.kld_bound, stats.kld_bound))
        self.n_same_top += int(np.count_nonzero(stats.same_top))
        self.count += int(stats.nll.size)
        self._kld_values.append(stats.kld.astype(np.float32))

    def kld_per_token(self) -> np.ndarray:
        """Every token's KLD, in the order the chunks were added."""
        return np.concatenate(self._kld_values) if self._kld_values else np.zeros(0, np.float32)

    def perplexity(self) -> PerplexityStats:
        """PPL of the quantized model over the tokens seen so far."""
        acc = PerplexityAccumulator(self.sums["nll"], self.sums["nll2"], self.count)
        return acc.result()

    def base_perplexity(self) -> PerplexityStats:
        """PPL of the base over the same tokens."""
        acc = PerplexityAccumulator(self.sums["nll_base"], self.sums["nll_base2"], self.count)
        return acc.result()

    def result(self) -> DivergenceStats:
        """The summary perplexity.cpp prints after ``--kl-divergence``.

        Raises:
            ValueError: when no token was added.
        """
        if self.count == 0:
            raise ValueError("DivergenceAccumulator: no tokens were added")
        s, n = self.sums, self.count
        kld_all = self.kld_per_token().astype(np.float64)
        median, p90, p99, p999 = np.quantile(kld_all, [0.5, 0.9, 0.99, 0.999])
        ln_q = mean_and_uncertainty(s["nll"], s["nll2"], n)
        ln_b = mean_and_uncertainty(s["nll_base"], s["nll_base2"], n)
        cov = covariance_of_means(s["nll"], s["nll_base"], s["nll_nll_base"], n)
        ratio_var = ln_q.stderr**2 + ln_b.stderr**2 - 2.0 * cov
        corr = cov / (ln_q.stderr * ln_b.stderr) if ln_q.stderr > 0 and ln_b.stderr > 0 else 0.0
        return DivergenceStats(
            kld=mean_and_uncertainty(s["kld"], s["kld2"], n),
            kld_median=float(median), kld_p90=float(p90), kld_p99=float(p99), kld_p999=float(p999),
            kld_max=float(kld_all.max()),
            same_top=_binomial(self.n_same_top, n),
            dp_rms=_rms(s["dp2"], s["dp4"], n),
            dp_mean=mean_and_uncertainty(s["dp"], s["dp2"], n),
            ln_ppl_ratio=Estimate(ln_q.value - ln_b.value, math.sqrt(max(ratio_var, 0.0))),
            ppl_corr=corr, n_tokens=n, kld_method=self.kld_method,
            kld_lower_bound=(mean_and_uncertainty(s["kld_bound"], s["kld_bound2"], n)
                             if self.kld_method != "exact" else None),
        )


_SUM_KEYS = ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "dp", "dp2", "dp4",
             "kld_bound", "kld_bound2")


def _binomial(hits: int, n: int) -> Estimate:
    # perplexity.cpp: p_top_unc = sqrt(p (1 - p) / (count - 1))
    p = hits / n
    return Estimate(p, math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def _rms(sum_sq: float, sum_4: float, n: int) -> Estimate:
    # perplexity.cpp: rms = sqrt(mean(Δp²)), unc = 0.5 / rms * stderr(Δp²)
    mse = mean_and_uncertainty(sum_sq, sum_4, n)
    rms = math.sqrt(mse.value)
    return Estimate(rms, 0.5 / rms * mse.stderr if rms > 0 else 0.0)


def divergence(base_logprobs: np.ndarray, quant_logprobs: np.ndarray, targets: np.ndarray,
               block: int = 256) -> DivergenceStats:
    """The exact summary of ``quant`` against ``base`` over every row, in blocks of rows (bounded scratch).

    Args:
        base_logprobs: (n, vocab) log p (a memmapped ``.npy`` is fine).
        quant_logprobs: (n, vocab) log q, the same positions.
        targets: (n,) actual next tokens.

    Returns:
        The DivergenceStats (KLD, top-1 agreement ...).

    Raises:
        ValueError: the shapes differ or there are no rows.
    """
    if base_logprobs.shape != quant_logprobs.shape:
        raise ValueError(f"divergence: base {base_logprobs.shape} and quant {quant_logprobs.shape} differ")
    acc = DivergenceAccumulator(kld_method="exact")
    for s in range(0, base_logprobs.shape[0], block):
        acc.add(token_stats_full(np.asarray(base_logprobs[s:s + block]), np.asarray(quant_logprobs[s:s + block]),
                                 targets[s:s + block]))
    return acc.result()


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (embedding models); 0 for a zero row.

    Raises:
        ValueError: the shapes differ.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"cosine_rows: expected two (n, dim) arrays of one shape, got {a.shape} and {b.shape}")
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = np.einsum("ij,ij->i", x, y)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
