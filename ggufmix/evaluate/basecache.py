"""The base model's log-probabilities, computed once and kept as a compact file.

For every scored token we keep:

- the base's ``k`` most likely tokens (ids and float32 log-probabilities) and the log of the mass of
  all other tokens (``p_rest``, summed from the small terms, no ``1 - sum`` cancellation);
- ``m`` tokens drawn from the base's tail (the distribution outside the top-k, renormalized) by
  systematic sampling, with their float32 log-probabilities;
- the base's NLL of the actual next token.

That is ``(k + m) * (2|4 + 4) + 8`` bytes a token (ids are uint16 when the vocabulary fits) instead
of ``4 * n_vocab`` for a logits row (perplexity.cpp's ``--kl-divergence-base`` file keeps
``2 * n_vocab``): with k = m = 64 and SmolLM2's 49152 tokens, 776 bytes instead of 196 kB.

Two KLDs come out of the cache (:func:`token_stats_topk`):

- the **lumped lower bound**, exact on the top-k and the rest as one bucket::

      KLD_k = sum_{i in top-k} p_i (log p_i - log q_i)  +  p_rest (log p_rest - log q_rest)

  Merging outcomes never increases a divergence (log-sum inequality), so KLD_k <= KLD. Measured on
  SmolLM2-135M (F16 base; Q8_0, Q4_K_M, Q2_K; wiki text, 10 x 512) it is only 82-83% of the exact
  KLD at k = 64 (87% at 128, 91% at 256): the 49k-token tail holds 11% of the mass on average
  (median 5%, p90 30%), and much of the divergence lives there.
- the **estimate** that ggufmix reports as KLD: the top-k part exact, the tail term
  ``sum_{i not in top-k} p_i log(p_i/q_i) = p_rest * E_{i ~ p_tail}[log p_i - log q_i]`` from the ``m``
  samples. It is unbiased for each token; on the same runs its mean is within 0.2-0.5% of the exact
  KLD at m = 64 (per-token error: median 3e-4 for Q8_0 whose median KLD is 2.7e-3).

PPL, ln(PPL ratio), Δp and "same top" need only the stored NLL and the top id: they are exact.

The file key is the model's size, mtime and resolved path (not a content hash: hashing a multi-GB
model on every eval costs more than it protects against), the text's sha256, ctx, the requested
chunks, k, m and the llama-cpp-python version.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggufmix.artifacts import cache_root, temp_beside
from ggufmix.engine.logits import ChunkPlan
from ggufmix.evaluate.metrics import TokenStats
from ggufmix.io.text import text_sha256
from ggufmix.numerics import target_nll

logger = logging.getLogger(__name__)

FORMAT = "ggufmix.base-logits"
FORMAT_VERSION = 1
DEFAULT_TOPK = 64
DEFAULT_TAIL = 64
_BLOCK = 1 << 20  # floats per exp() block


def cache_dir() -> Path:
    """``${GGUFMIX_CACHE:-~/.cache/ggufmix}/base-logits``."""
    return cache_root() / "base-logits"


@dataclass(frozen=True)
class TopKRows:
    """The cached base for a block of scored tokens.

    Attributes:
        ids: (n, k) token ids, most likely first (ties: lower id first, like ``np.argmax``).
        logprobs: (n, k) float32 log p of those ids.
        log_rest: (n,) float32 log of the mass outside the top-k; -inf when the top-k is the whole vocab.
        nll: (n,) float32 -log p(actual next token).
        tail_ids: (n, m) ids drawn from the tail distribution (systematic sampling; repeats allowed).
        tail_logprobs: (n, m) float32 log p of those ids.
    """

    ids: np.ndarray
    logprobs: np.ndarray
    log_rest: np.ndarray
    nll: np.ndarray
    tail_ids: np.ndarray
    tail_logprobs: np.ndarray

    def __post_init__(self) -> None:
        n = self.nll.shape[0]
        if (self.ids.shape != self.logprobs.shape or self.ids.shape[0] != n or self.log_rest.shape != (n,)
                or self.tail_ids.shape != self.tail_logprobs.shape or self.tail_ids.shape[0] != n):
            raise ValueError(f"TopKRows: inconsistent shapes ids {self.ids.shape}, logprobs {self.logprobs.shape}, "
                             f"log_rest {self.log_rest.shape}, nll {self.nll.shape}, tail {self.tail_ids.shape}")

    def __getitem__(self, rows: slice) -> TopKRows:
        return TopKRows(*(getattr(self, f)[rows] for f in _ROW_FIELDS))


_ROW_FIELDS = ("ids", "logprobs", "log_rest", "nll", "tail_ids", "tail_logprobs")


def _tail_probs(logprobs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """exp(logprobs) in float64 with the top-k entries set to 0."""
    e = np.exp(logprobs.astype(np.float64))
    np.put_along_axis(e, ids.astype(np.intp), 0.0, axis=1)
    return e


def _rest_mass(logprobs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Probability mass of each row outside ``ids``, summed from the small terms (no 1 - sum cancellation)."""
    out = np.empty(logprobs.shape[0], dtype=np.float64)
    rows = max(1, _BLOCK // logprobs.shape[1])
    for s in range(0, logprobs.shape[0], rows):
        e = np.exp(logprobs[s:s + rows])
        np.put_along_axis(e, ids[s:s + rows].astype(np.intp), 0.0, axis=1)
        out[s:s + rows] = e.sum(axis=1, dtype=np.float64)
    return out


def _top_ids(logprobs: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of each row, sorted by value descending, ties by id ascending."""
    n_vocab = logprobs.shape[1]
    cand = np.argpartition(-logprobs, k - 1, axis=1)[:, :k] if k < n_vocab else np.broadcast_to(
        np.arange(n_vocab), logprobs.shape)
    cand = np.sort(cand, axis=1)
    order = np.argsort(-np.take_along_axis(logprobs, cand, axis=1), axis=1, kind="stable")
    return np.take_along_axis(cand, order, axis=1)


def _tail_samples(logprobs: np.ndarray, ids: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m systematic samples per row from the tail distribution (p outside ``ids``, renormalized).

    Systematic sampling (one uniform offset, m evenly spaced points on the tail's CDF) keeps each
    token's inclusion frequency exactly proportional to its probability, with less variance than
    independent draws. Rows without a tail get id ``ids[:, 0]`` (its weight p_rest is 0).
    """
    out = np.repeat(ids[:, :1], m, axis=1).astype(np.intp)
    for r in range(logprobs.shape[0] if m else 0):
        cdf = np.cumsum(_tail_probs(logprobs[r:r + 1], ids[r:r + 1])[0])
        total = cdf[-1]
        if total <= 0:
            continue
        points = (rng.random() + np.arange(m)) / m * total
        last = int(np.flatnonzero(np.diff(cdf, prepend=0.0))[-1])  # float rounding must not land past it
        out[r] = np.minimum(np.searchsorted(cdf, points, side="right"), last)
    return out


def compress_topk(logprobs: np.ndarray, targets: np.ndarray, k: int = DEFAULT_TOPK, tail: int = DEFAULT_TAIL,
                  rng: np.random.Generator | None = None) -> TopKRows:
    """Keep the top-k of each log-softmax row, the lumped rest, tail samples and the target NLL.

    Args:
        logprobs: (n, n_vocab) float32 base log-probabilities.
        targets: (n,) actual next tokens.
        k: entries kept a row (capped at n_vocab).
        tail: samples drawn from the rest of each row (0 for none: then only the lower bound is usable).
        rng: source of the sampling offsets (default: seeded with 0, so caches are reproducible).

    Returns:
        TopKRows; ids are uint16 when the vocabulary fits, else int32.
    """
    if k < 1 or tail < 0:
        raise ValueError(f"top-k cache: k={k} must be at least 1 and tail={tail} at least 0")
    rng = rng or np.random.default_rng(0)
    k = min(k, logprobs.shape[1])
    rows = max(1, _BLOCK // logprobs.shape[1])  # argpartition makes int64 copies of its input
    ids = np.concatenate([_top_ids(logprobs[s:s + rows], k) for s in range(0, logprobs.shape[0], rows)])
    with np.errstate(divide="ignore"):
        log_rest = np.log(_rest_mass(logprobs, ids)).astype(np.float32)
    tail_ids = _tail_samples(logprobs, ids, tail, rng)
    id_type = np.uint16 if logprobs.shape[1] <= 1 << 16 else np.int32
    return TopKRows(ids.astype(id_type), np.take_along_axis(logprobs, ids, axis=1).astype(np.float32), log_rest,
                    target_nll(logprobs, targets).astype(np.float32), tail_ids.astype(id_type),
                    np.take_along_axis(logprobs, tail_ids, axis=1).astype(np.float32))


def token_stats_topk(base: TopKRows, quant_logprobs: np.ndarray, targets: np.ndarray) -> TokenStats:
    """Per-token statistics of a quantized model against the cached base.

    ``kld`` is the top-k + tail-sample estimate and ``kld_bound`` the lumped lower bound (see the module
    docstring); with no tail samples the estimate falls back to the bound. NLL, Δp and "same top" are
    exact. A quant rest mass that underflows to 0 is clamped to the smallest float64.

    Args:
        base: the base's TopKRows for these tokens.
        quant_logprobs: (n, n_vocab) float32 log q.
        targets: (n,) actual next tokens.

    Returns:
        The chunk's TokenStats.
    """
    ids = base.ids.astype(np.intp)
    p_log = base.logprobs.astype(np.float64)
    top = np.einsum("ij,ij->i", np.exp(p_log), p_log - np.take_along_axis(quant_logprobs, ids, axis=1))
    p_rest = np.exp(base.log_rest.astype(np.float64))
    bound, est = top.copy(), top.copy()
    has_rest = p_rest > 0
    if np.any(has_rest):
        q_rest = np.maximum(_rest_mass(quant_logprobs[has_rest], ids[has_rest]), np.finfo(np.float64).tiny)
        bound[has_rest] += p_rest[has_rest] * (base.log_rest[has_rest].astype(np.float64) - np.log(q_rest))
        est = _add_tail(est, base, quant_logprobs, p_rest) if base.tail_ids.shape[1] else bound
    return TokenStats(
        nll=target_nll(quant_logprobs, targets),
        nll_base=base.nll.astype(np.float64),
        kld=est,
        same_top=np.argmax(quant_logprobs, axis=1) == ids[:, 0],
        kld_bound=bound,
    )


def _add_tail(top: np.ndarray, base: TopKRows, quant_logprobs: np.ndarray, p_rest: np.ndarray) -> np.ndarray:
    # p_rest * mean over samples of (log p - log q): unbiased for sum_{tail} p log(p/q)
    q_tail = np.take_along_axis(quant_logprobs, base.tail_ids.astype(np.intp), axis=1).astype(np.float64)
    return top + p_rest * (base.tail_logprobs.astype(np.float64) - q_tail).mean(axis=1)


@dataclass(frozen=True)
class CacheKey:
    """Everything the base's scored log-probabilities depend on."""

    model_path: str
    model_size: int
    model_mtime_ns: int
    text_sha256: str
    ctx: int
    chunks: int | None
    topk: int
    tail: int
    llama_cpp: str

    @classmethod
    def of(cls, model: Path, text: str, *, ctx: int, chunks: int | None, topk: int, tail: int,
           llama_cpp: str) -> CacheKey:
        st = Path(model).stat()
        return cls(str(Path(model).resolve()), st.st_size, st.st_mtime_ns, text_sha256(text), ctx, chunks, topk,
                   tail, llama_cpp)

    def digest(self) -> str:
        blob = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / f"{Path(self.model_path).stem}-{self.digest()}.npz"


@dataclass(frozen=True)
class BaseLogits:
    """The cached base: the tokens it was run on, the chunking and the top-k rows of every chunk.

    Attributes:
        tokens: int32, the ``plan.n_chunks * plan.ctx`` tokens that were evaluated.
        plan: the chunking.
        n_vocab, add_bos, bos: the base vocabulary, checked against each quantized model.
        rows: TopKRows of all scored tokens, chunk after chunk.
        decode_s: seconds the base's forward passes took when the cache was built.
    """

    tokens: np.ndarray
    plan: ChunkPlan
    n_vocab: int
    add_bos: bool
    bos: int
    rows: TopKRows
    decode_s: float

    def chunk(self, index: int) -> TopKRows:
        n = self.plan.n_scored
        return self.rows[slice(index * n, (index + 1) * n)]


def save(key: CacheKey, base: BaseLogits, root: Path | None = None) -> Path:
    """Write ``base`` atomically under the key's file name.

    Returns:
        The written path.

    Raises:
        OSError: the cache folder is not writable (callers may treat it as a warning).
    """
    path = key.path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "key": asdict(key), "ctx": base.plan.ctx,
            "n_chunks": base.plan.n_chunks, "n_vocab": base.n_vocab, "add_bos": base.add_bos, "bos": base.bos,
            "decode_s": base.decode_s}
    tmp = temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), tokens=base.tokens,
                     **{name: getattr(base.rows, name) for name in _ROW_FIELDS})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("base logits cached in %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def load(key: CacheKey, root: Path | None = None) -> BaseLogits | None:
    """The cached base for ``key``, or None when absent, unreadable or of another format version."""
    path = key.path(root)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION or meta["key"] != asdict(key):
                logger.warning("%s: stale or foreign base-logits file, recomputing", path)
                return None
            rows = TopKRows(*(z[name] for name in _ROW_FIELDS))
            return BaseLogits(z["tokens"], ChunkPlan(meta["ctx"], meta["n_chunks"]), meta["n_vocab"],
                              meta["add_bos"], meta["bos"], rows, meta["decode_s"])
    except (OSError, ValueError, KeyError) as e:
        logger.warning("%s: unreadable base-logits file (%s), recomputing", path, e)
        return None
