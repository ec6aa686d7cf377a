"""``ggufmix eval``: perplexity and KL-divergence of quantized GGUFs against their base, like
``llama-perplexity --kl-divergence``, in one call.

Two modes:

- ``cache=True`` (default): the base runs once per (model, text, ctx, chunks) and its top-k
  log-probabilities plus samples of its tail are kept on disk (:mod:`ggufmix.evaluate.basecache`);
  each quantized model then runs alone. KLD is an unbiased estimate (top-k exact, tail sampled), with
  the top-k lumped lower bound next to it; PPL, ln(PPL ratio), Δp and "same top" are exact.
- ``cache=False``: exact full-vocabulary KLD. The base and each quantized model run in lock-step,
  chunk by chunk, so the base's forward pass is repeated for every quantized model.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ggufmix.engine.llamalib import version
from ggufmix.engine.logits import (
    ChunkLogits,
    ChunkPlan,
    LogitsModel,
    plan_chunks,
)
from ggufmix.errors import InputError, UsageError
from ggufmix.evaluate import basecache
from ggufmix.evaluate.basecache import (
    BaseLogits,
    CacheKey,
    compress_topk,
    token_stats_topk,
)
from ggufmix.evaluate.metrics import (
    DivergenceAccumulator,
    DivergenceStats,
    Estimate,
    PerplexityAccumulator,
    PerplexityStats,
    paired_difference,
    token_stats_full,
)
from ggufmix.io.text import text_sha256
from ggufmix.numerics import target_nll

logger = logging.getLogger(__name__)

REPORT_FORMAT = "ggufmix.eval"
REPORT_VERSION = 1
_CACHED = "topk+tail-sample"


@dataclass(frozen=True)
class Throughput:
    """Where a model's evaluation time went.

    Attributes:
        decode_s: seconds in llama.cpp's forward passes.
        math_s: seconds in log-softmax and the metrics (KLD, NLL, top-1, cache compression).
        n_ctx_tokens: tokens run through the model (chunks x ctx).
        n_scored: scored tokens.
    """

    decode_s: float
    math_s: float
    n_ctx_tokens: int
    n_scored: int

    @property
    def forward_tokens_per_s(self) -> float:
        """Context tokens a second through the forward pass."""
        return self.n_ctx_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def math_tokens_per_s(self) -> float:
        """Scored tokens a second through log-softmax plus metrics."""
        return self.n_scored / self.math_s if self.math_s > 0 else float("nan")

    def to_json(self) -> dict[str, float]:
        return {"decode_s": self.decode_s, "math_s": self.math_s, "n_ctx_tokens": self.n_ctx_tokens,
                "n_scored": self.n_scored, "forward_tokens_per_s": self.forward_tokens_per_s,
                "math_tokens_per_s": self.math_tokens_per_s}


@dataclass(frozen=True)
class BaseResult:
    """The base model's own numbers; ``throughput`` is None when it came from the cache."""

    path: str
    file_bytes: int
    perplexity: PerplexityStats
    throughput: Throughput | None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "perplexity": self.perplexity.to_json(),
                "throughput": self.throughput.to_json() if self.throughput else None}


@dataclass(frozen=True)
class QuantResult:
    """One quantized model against the base."""

    path: str
    file_bytes: int
    perplexity: PerplexityStats
    divergence: DivergenceStats
    throughput: Throughput
    kld_per_token: np.ndarray | None = field(default=None, repr=False, compare=False)  # for paired comparisons

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "file_bytes": self.file_bytes, "perplexity": self.perplexity.to_json(),
                "divergence": self.divergence.to_json(), "throughput": self.throughput.to_json()}


@dataclass(frozen=True)
class EvalSettings:
    """Exactly what was evaluated, so a report can be reproduced."""

    ctx: int
    chunks_requested: int | None
    n_chunks: int
    n_scored_per_chunk: int
    text_sha256: str
    text_chars: int
    kld_mode: str  # "topk+tail-sample" (from the base cache) or "exact"
    topk: int | None
    tail_samples: int | None
    n_threads: int
    llama_cpp_python: str
    cache_file: str | None
    cache_hit: bool
    backend: str = "CPU"  # where the forward passes ran (llama.cpp's own system info)

    def __post_init__(self) -> None:
        if self.kld_mode not in (_CACHED, "exact"):
            raise ValueError(f"kld_mode={self.kld_mode!r}: expected {_CACHED!r} or 'exact'")


@dataclass(frozen=True)
class EvalReport:
    """What ``evaluate`` returns; ``to_json`` is the ``report.json`` artifact body."""

    settings: EvalSettings
    base: BaseResult
    quants: tuple[QuantResult, ...] = field(default_factory=tuple)

    def kld_against_first(self) -> list[tuple[QuantResult, Estimate]]:
        """Each later model's mean KLD minus the first's, paired on the same tokens (its error is the difference's)."""
        first = self.quants[0] if self.quants else None
        if first is None or first.kld_per_token is None:
            return []
        return [(q, paired_difference(first.kld_per_token, q.kld_per_token)) for q in self.quants[1:]
                if q.kld_per_token is not None]

    def to_json(self) -> dict[str, Any]:
        doc = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "settings": vars(self.settings).copy(),
               "base": self.base.to_json(), "quants": [q.to_json() for q in self.quants]}
        paired = self.kld_against_first()
        if paired:
            doc["kld_against_first"] = [{"path": q.path, **d.to_json()} for q, d in paired]
        return doc


def backend_report(n_gpu_layers: int) -> str:
    """``CPU`` or ``GPU offload (N layers)``, with llama.cpp's backend line (``CUDA : ...``, ``Metal : ...``)."""
    from ggufmix.engine.logits import system_info

    gpu, info = system_info()
    if n_gpu_layers and not gpu:
        logger.warning("--gpu-layers %d: this llama-cpp-python has no GPU backend; running on the CPU", n_gpu_layers)
    if not (n_gpu_layers and gpu):
        return "CPU"
    lines = [part.strip() for part in info.split("|") if ":" in part and not part.strip().startswith("CPU")]
    return f"GPU offload ({n_gpu_layers} layers): " + ("; ".join(lines[:2]) or "llama.cpp GPU backend")


def evaluate(base: Path, quants: Sequence[Path], text: str, *, ctx: int = 512, chunks: int | None = None,
             cache: bool = True, n_threads: int | None = None, progress: bool = True, n_gpu_layers: int = 0,
             topk: int = basecache.DEFAULT_TOPK, tail: int = basecache.DEFAULT_TAIL) -> EvalReport:
    """Perplexity of ``base`` and of each quantized model, and their divergence from the base.

    Args:
        base: the reference GGUF (F16 or the best you have).
        quants: GGUFs to compare with it (same tokenizer); may be empty for the base's PPL alone.
        text: the evaluation text.
        ctx: tokens per chunk (llama-perplexity ``-c``).
        chunks: chunks to score (``--chunks``); None for as many as the text holds.
        cache: read/write the base's top-k cache (KLD estimated) instead of exact lock-step KLD.
        n_threads: CPU threads for llama.cpp (default: all cores).
        n_gpu_layers: layers to offload to the GPU (Metal/CUDA builds of llama-cpp-python; -1: all).
        progress: show tqdm progress bars.
        topk: entries a token kept in the base cache.
        tail: samples a token of the base's tail kept in the cache (0: KLD is the lumped lower bound).

    Returns:
        The EvalReport.

    Raises:
        InputError: a model is missing or unloadable, the vocabularies differ, or the text is too short.
        UsageError: ctx, chunks or topk cannot work.
        EngineError: llama.cpp fails.
    """
    _validate(base, quants, ctx, chunks, topk, tail)
    threads = n_threads or os.cpu_count() or 1
    run = _Run(Path(base), [Path(q) for q in quants], text, ctx, chunks, threads, progress, n_gpu_layers)
    return run.with_cache(topk, tail) if cache else run.exact()


def _validate(base: Path, quants: Sequence[Path], ctx: int, chunks: int | None, topk: int, tail: int) -> None:
    if ctx < 4 or ctx % 2:
        raise UsageError(f"--ctx {ctx}: use an even context of at least 4 tokens (512 is llama-perplexity's)")
    if chunks is not None and chunks < 1:
        raise UsageError(f"--chunks {chunks}: must be at least 1")
    if topk < 1 or tail < 0:
        raise UsageError(f"top-k {topk} / tail samples {tail}: need top-k >= 1 and tail >= 0")
    for p in (base, *quants):
        if not Path(p).is_file():
            raise InputError(f"{p}: no such model file")


@dataclass
class _Timer:
    decode_s: float = 0.0
    math_s: float = 0.0

    def throughput(self, plan: ChunkPlan) -> Throughput:
        return Throughput(self.decode_s, self.math_s, plan.n_chunks * plan.ctx, plan.n_tokens_scored)


@dataclass
class _Run:
    base: Path
    quants: list[Path]
    text: str
    ctx: int
    chunks: int | None
    n_threads: int
    progress: bool
    n_gpu_layers: int = 0

    def _open(self, path: Path) -> LogitsModel:
        return LogitsModel(path, ctx=self.ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers)

    def _bar(self, it: Iterator[ChunkLogits], plan: ChunkPlan, path: Path) -> Iterator[ChunkLogits]:
        return tqdm(it, total=plan.n_chunks, desc=path.name, unit="chunk", disable=not self.progress, leave=False)

    def _settings(self, plan: ChunkPlan, key: CacheKey | None, hit: bool) -> EvalSettings:
        return EvalSettings(self.ctx, self.chunks, plan.n_chunks, plan.n_scored, text_sha256(self.text),
                            len(self.text), _CACHED if key else "exact", key.topk if key else None,
                            key.tail if key else None, self.n_threads, version(),
                            str(key.path()) if key else None, hit, backend_report(self.n_gpu_layers))

    # -- cached base (top-k) ---------------------------------------------------------------

    def with_cache(self, topk: int, tail: int) -> EvalReport:
        key = CacheKey.of(self.base, self.text, ctx=self.ctx, chunks=self.chunks, topk=topk, tail=tail,
                          llama_cpp=version())
        cached = basecache.load(key)
        hit = cached is not None
        if cached is None:
            cached, timer = self._build_base(topk, tail)
            _try_save(key, cached)
        else:
            logger.info("base logits from cache %s", key.path())
            timer = None
        base_ppl = PerplexityAccumulator()
        base_ppl.add(cached.rows.nll)
        base_res = BaseResult(str(self.base), self.base.stat().st_size, base_ppl.result(),
                              timer.throughput(cached.plan) if timer else None)
        quants = tuple(self._quant_topk(q, cached) for q in self.quants)
        settings = self._settings(cached.plan, key, hit)
        return EvalReport(settings, base_res, quants)

    def _build_base(self, topk: int, tail: int) -> tuple[BaseLogits, _Timer]:
        timer, rows, rng = _Timer(), [], np.random.default_rng(0)
        with self._open(self.base) as bm:
            tokens = bm.tokenize(self.text)
            plan = plan_chunks(len(tokens), self.ctx, self.chunks)
            for ch in self._bar(bm.iter_chunks(tokens, plan), plan, self.base):
                t0 = time.perf_counter()
                rows.append(compress_topk(ch.logprobs, ch.targets, topk, tail, rng))
                timer.decode_s += ch.decode_s
                timer.math_s += ch.softmax_s + time.perf_counter() - t0
            used = np.ascontiguousarray(tokens[:plan.n_chunks * plan.ctx])
            merged = basecache.TopKRows(*(np.concatenate([getattr(r, f) for r in rows])
                                          for f in basecache.TopKRows.__dataclass_fields__))
            return BaseLogits(used, plan, bm.n_vocab, bm.add_bos, bm.bos, merged, timer.decode_s), timer

    def _quant_topk(self, path: Path, base: BaseLogits) -> QuantResult:
        timer, acc = _Timer(), DivergenceAccumulator(kld_method=_CACHED)
        with self._open(path) as qm:
            _check_same_vocab(qm, base.n_vocab, base.add_bos, base.bos, self.base)
            for ch in self._bar(qm.iter_chunks(base.tokens, base.plan), base.plan, path):
                t0 = time.perf_counter()
                acc.add(token_stats_topk(base.chunk(ch.index), ch.logprobs, ch.targets))
                timer.decode_s += ch.decode_s
                timer.math_s += ch.softmax_s + time.perf_counter() - t0
        return _quant_result(path, acc, timer.throughput(base.plan))

    # -- exact (lock-step) -----------------------------------------------------------------

    def exact(self) -> EvalReport:
        base_timer = _Timer()
        with self._open(self.base) as bm:
            tokens = bm.tokenize(self.text)
            plan = plan_chunks(len(tokens), self.ctx, self.chunks)
            if self.quants:
                pairs = [self._quant_exact(bm, q, tokens, plan, base_timer) for q in self.quants]
                results, base_ppl = tuple(r for r, _ in pairs), pairs[0][1]
            else:
                results, base_ppl = (), self._base_only(bm, tokens, plan, base_timer)
        runs = max(1, len(self.quants))  # the base ran once per quantized model
        per_run = _Timer(base_timer.decode_s / runs, base_timer.math_s / runs)
        base_res = BaseResult(str(self.base), self.base.stat().st_size, base_ppl, per_run.throughput(plan))
        return EvalReport(self._settings(plan, None, False), base_res, results)

    def _base_only(self, bm: LogitsModel, tokens: np.ndarray, plan: ChunkPlan, timer: _Timer) -> PerplexityStats:
        acc = PerplexityAccumulator()
        for ch in self._bar(bm.iter_chunks(tokens, plan), plan, self.base):
            t0 = time.perf_counter()
            acc.add(target_nll(ch.logprobs, ch.targets))
            timer.decode_s += ch.decode_s
            timer.math_s += ch.softmax_s + time.perf_counter() - t0
        return acc.result()

    def _quant_exact(self, bm: LogitsModel, path: Path, tokens: np.ndarray, plan: ChunkPlan,
                     base_timer: _Timer) -> tuple[QuantResult, PerplexityStats]:
        timer, acc = _Timer(), DivergenceAccumulator(kld_method="exact")
        with self._open(path) as qm:
            _check_same_vocab(qm, bm.n_vocab, bm.add_bos, bm.bos, self.base)
            pairs = zip(bm.iter_chunks(tokens, plan), qm.iter_chunks(tokens, plan))
            for b, q in tqdm(pairs, total=plan.n_chunks, desc=path.name, unit="chunk", disable=not self.progress,
                             leave=False):
                t0 = time.perf_counter()
                acc.add(token_stats_full(b.logprobs, q.logprobs, q.targets))
                dt = time.perf_counter() - t0
                base_timer.decode_s += b.decode_s
                base_timer.math_s += b.softmax_s
                timer.decode_s += q.decode_s
                timer.math_s += q.softmax_s + dt
        return _quant_result(path, acc, timer.throughput(plan)), acc.base_perplexity()


def _quant_result(path: Path, acc: DivergenceAccumulator, tp: Throughput) -> QuantResult:
    div = acc.result()
    res = QuantResult(str(path), path.stat().st_size, acc.perplexity(), div, tp, acc.kld_per_token())
    logger.info("%s: PPL %.4f, KLD %.6f, same top %.2f%%, %.0f tok/s forward", path.name, res.perplexity.ppl.value,
                div.kld.value, 100 * div.same_top.value, tp.forward_tokens_per_s)
    return res


def _check_same_vocab(qm: LogitsModel, n_vocab: int, add_bos: bool, bos: int, base: Path) -> None:
    if (qm.n_vocab, qm.add_bos, qm.bos if qm.add_bos else -1) != (n_vocab, add_bos, bos if add_bos else -1):
        raise InputError(f"{qm.path}: its vocabulary ({qm.n_vocab} tokens, add_bos={qm.add_bos}, bos={qm.bos}) "
                         f"differs from {base} ({n_vocab}, add_bos={add_bos}, bos={bos}); compare models that "
                         "share a tokenizer")


def _try_save(key: CacheKey, base: BaseLogits) -> None:
    try:
        basecache.save(key, base)
    except OSError as e:
        logger.warning("could not write the base-logits cache %s (%s); continuing without it", key.path(), e)


_COLUMNS = ("model", "MB", "PPL", "ln(PPL/base)", "KLD mean", "KLD >=", "KLD med", "p90", "p99", "p99.9", "max",
            "same top %", "RMS Δp %", "fwd tok/s", "math tok/s")


def _quant_row(q: QuantResult) -> tuple[str, ...]:
    d, tp = q.divergence, q.throughput
    return (Path(q.path).name, f"{q.file_bytes / 1e6:.1f}", f"{q.perplexity.ppl.value:.4f}±{q.perplexity.ppl.stderr:.4f}",
            f"{d.ln_ppl_ratio.value:+.5f}±{d.ln_ppl_ratio.stderr:.5f}", f"{d.kld.value:.6f}±{d.kld.stderr:.6f}",
            f"{d.kld_lower_bound.value:.6f}" if d.kld_lower_bound else "-",
            f"{d.kld_median:.5f}", f"{d.kld_p90:.5f}", f"{d.kld_p99:.5f}", f"{d.kld_p999:.5f}", f"{d.kld_max:.4f}",
            f"{100 * d.same_top.value:.2f}±{100 * d.same_top.stderr:.2f}",
            f"{100 * d.dp_rms.value:.3f}±{100 * d.dp_rms.stderr:.3f}",
            f"{tp.forward_tokens_per_s:.0f}", f"{tp.math_tokens_per_s:.0f}")


def format_table(report: EvalReport) -> str:
    """A plain-text summary: the settings, the base's PPL and one row per quantized model."""
    s, b = report.settings, report.base
    kld_note = (f"KLD estimated from the base's top-{s.topk} + {s.tail_samples} tail samples cache "
                f"('KLD >=': the top-{s.topk} lumped lower bound)" if s.kld_mode == _CACHED
                else "exact full-vocabulary KLD")
    cache = f"; cache {'hit' if s.cache_hit else 'written'}: {s.cache_file}" if s.cache_file else ""
    lines = [
        f"{s.n_chunks} chunks x {s.n_scored_per_chunk} scored tokens, ctx {s.ctx}, backend {s.backend}; {kld_note}{cache}",
        f"base {Path(b.path).name} ({b.file_bytes / 1e6:.1f} MB): PPL {b.perplexity.ppl.value:.4f} "
        f"± {b.perplexity.ppl.stderr:.4f}"
        + (f", {b.throughput.forward_tokens_per_s:.0f} tok/s forward" if b.throughput else ""),
    ]
    if report.quants:
        rows = [_COLUMNS, *(_quant_row(q) for q in report.quants)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines.append("")
        lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    paired = report.kld_against_first()
    if paired:
        first = report.quants[0]
        lines += ["", f"KLD against {Path(first.path).name}, paired on the same tokens:"]
        base_kld = first.divergence.kld.value
        lines += [f"  {Path(q.path).name}  {d.value:+.6f} ± {d.stderr:.6f}"
                  + (f"  ({q.divergence.kld.value / base_kld:.3f}x)" if base_kld > 0 else "") for q, d in paired]
    return "\n".join(lines)
