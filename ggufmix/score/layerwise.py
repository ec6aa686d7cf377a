"""The papers' layer-sensitivity scores as strategies: ``ewq``, ``ewq-norm``, ``zd``, ``lim``, ``lieq``,
``fastewq``, and each as a prior on the measured error (``measured+ewq`` ...).

All of them rank transformer blocks; the budget solver needs a cost per tensor and type. A pure paper
strategy gives every tensor of block ``b`` the cost ``importance(b) * noise(type)``, which the planner
multiplies by the tensor's share of the weights (plan/planner.make_plan): ``noise`` (quant_error.type_noise,
shared with ``uniform``) is the real
llama.cpp quantizer's noise-to-signal ratio on Gaussian weights of the tensor's width (so the types are
ordered as llama.cpp really quantizes, but nothing tensor-specific is measured), and
``importance = 2^clip(z)`` of the block's standardised score (stats.importance_from_scores). Equal
importances thus give every tensor the same bits, as the papers start from uniform bits and move the
least important layers down; one standard deviation of score is worth about half a bit. Tensors
outside blocks (embeddings, output) are not ranked by any of the papers; they get importance 1, the
geometric mean of the blocks', so that a pure strategy differs from ``uniform`` by the paper's block
ranking and nothing else. (They used to get the top block's importance, up to 4: that protected
SmolLM2's tied embedding, but spent up to a bit more on Qwen's untied 233M-parameter embedding and
head, 30% of its weights, and mixed a second effect into every comparison with ``uniform``.) A hybrid
``measured+<paper>`` keeps the measured per-tensor error and multiplies it by the paper's importance.

Choices where the papers leave details open are written where they are made.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ggufmix.score import stats
from ggufmix.score.base import ModelContext, TensorJob, TensorScore, register
from ggufmix.score.quant_error import generic_errors, measured

# Values per chunk when a statistic needs the whole tensor: ~4M (16 MB as float32), whole rows. The
# statistics accumulate chunk by chunk, so this is part of their result (the last bits), not only of speed.
CHUNK_VALUES = 1 << 22


def row_chunks(job: TensorJob) -> Iterator[stats.Chunk]:
    """The whole tensor, CHUNK_VALUES values at a time (entropy and z-scores are over every weight).

    F16 weights are read as stored into one buffer and converted a piece at a time by the engine's
    converter (``job.kernels.f16_to_f32``, numpy without it); other types come as float32 rows from
    ``job.read``. Either way the chunks hold the same float32 values: the statistics do not change.
    """
    if job.read is None:
        raise ValueError(f"{job.name}: this strategy reads whole tensors and got no reader")
    ncols = job.shape[0]
    nrows = int(np.prod(job.shape[1:])) if len(job.shape) > 1 else 1
    if job.read_f16 is None:
        yield from (stats.Chunk.of(c) for c in read_in_chunks(job.read, ncols, nrows))
        return
    convert = job.kernels.f16_to_f32 if job.kernels is not None else None
    step = max(1, CHUNK_VALUES // ncols)
    buf = np.empty(min(step, nrows) * ncols, np.float16)
    for start in range(0, nrows, step):
        stop = min(nrows, start + step)
        yield stats.Chunk(job.read_f16(start, stop, buf).reshape(-1), convert or _numpy_f16_to_f32)


def _numpy_f16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src.view(np.float16))


def read_in_chunks(read: Callable[[np.ndarray], np.ndarray], ncols: int, nrows: int) -> Iterator[np.ndarray]:
    """``read(row indices)`` over all ``nrows`` rows, ~CHUNK_VALUES values at a time."""
    step = max(1, CHUNK_VALUES // ncols)
    for start in range(0, nrows, step):
        yield read(np.arange(start, min(nrows, start + step)))


# -- per-tensor statistics ------------------------------------------------------------------------

def entropy_stats(job: TensorJob) -> dict[str, float]:
    acc = stats.SoftmaxEntropy()
    for chunk in row_chunks(job):
        acc.add_chunk(chunk)
    return {"entropy": acc.entropy, "entropy_excess": acc.excess, "n": float(acc.n)}


def zd_stats(job: TensorJob) -> dict[str, float]:
    """Two passes: mean and std, then the count beyond one std. A tensor of one chunk is counted in the
    chunk still held; a larger one is read again (from the page cache: a tensor can be larger than the
    memory one would hold it in)."""
    acc = stats.ZAccumulator()
    first, n_chunks = None, 0
    for chunk in row_chunks(job):
        acc.add_chunk(chunk)
        first, n_chunks = (chunk if n_chunks == 0 else None), n_chunks + 1  # later chunks reuse its buffer
    again = [first] if first is not None else row_chunks(job)
    above = sum(acc.count_above(chunk) for chunk in again)
    return {"z_share": above / acc.n if acc.n else 0.0, "n": float(acc.n)}


def energy_stats(job: TensorJob) -> dict[str, float]:
    """Top-k energy gain on the sampled rows against a Gaussian of the same sampled shape (LieQ computes
    it on the whole matrix; on 128 sampled rows the SVD costs milliseconds instead of seconds)."""
    rows = job.rows
    if rows.shape[0] < 2:
        return {"energy_gain": 1.0, "n": float(np.prod(job.shape))}
    return {"energy_gain": stats.energy_gain(rows), "n": float(np.prod(job.shape))}


def metadata_stats(job: TensorJob) -> dict[str, float]:
    return {"n": float(np.prod(job.shape))}


# -- per-block scores (higher = more important) -----------------------------------------------------

BlockScoreFn = Callable[[Mapping[str, Any], ModelContext], dict[int, float]]


def _weighted_by_block(scores: Mapping[str, Any], ctx: ModelContext, key: str) -> dict[int, float]:
    """Parameter-weighted mean of a per-tensor statistic over each block's tensors (EWQ's aggregation)."""
    pairs: dict[int, list[tuple[float, float]]] = {}
    for slot in ctx.slots:
        ts = scores.get(slot.name)
        if slot.layer is not None and ts is not None and key in ts.stats:
            pairs.setdefault(slot.layer, []).append((ts.stats[key], ts.stats.get("n", slot.n_elements)))
    return {b: stats.weighted_mean(p) for b, p in sorted(pairs.items())}


def ewq_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """EWQ: the parameter-weighted softmax entropy of the block (higher = more information = keep)."""
    return _weighted_by_block(scores, ctx, "entropy")


def ewq_norm_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """Size-normalised EWQ: minus the weighted excess ``ln n - H``. Where all blocks have the same shapes
    this ranks blocks exactly as raw entropy does (the ``ln n`` terms are equal); it differs for models
    whose blocks differ in size, where raw entropy would rank the bigger blocks higher for their size alone."""
    return {b: -v for b, v in _weighted_by_block(scores, ctx, "entropy_excess").items()}


def zd_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """ZD: share of weights beyond one standard deviation; more outliers = more important. The paper
    takes z-scores over the layer's weights jointly; we take them per matrix (matrices of one block have
    different scales) and weight the shares by parameter count."""
    return _weighted_by_block(scores, ctx, "z_share")


def lim_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """LIM: 1 - cos(input, output) of the block's hidden states on calibration text (more change = more
    important), measured in llama.cpp (engine/activations.py)."""
    if ctx.blocks is None or not ctx.blocks.distance:
        raise ValueError("lim needs block activations (calibration text)")
    return {b: d for b, d in ctx.blocks.distance.items() if 0 <= b < ctx.n_layers}


def lieq_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """LieQ's three diagnostics, each standardised over blocks and averaged with equal weight (the paper
    combines them; equal weights are our choice): the perplexity cost of removing the block (higher =
    more important), top-k energy gain of its weights (higher = more structure = more important), and the
    compactness of its outputs, minus the effective rank (a block whose outputs live in few directions
    concentrates information there: more important). Diagnostics that were not measured are left out."""
    parts = [stats.standardize(_weighted_by_block(scores, ctx, "energy_gain"))]
    if ctx.blocks is not None:
        if ctx.blocks.ppl_drop:
            parts.append(stats.standardize({b: v for b, v in ctx.blocks.ppl_drop.items() if 0 <= b < ctx.n_layers}))
        if ctx.blocks.erank:
            parts.append(stats.standardize({b: -v for b, v in ctx.blocks.erank.items() if 0 <= b < ctx.n_layers}))
    blocks = sorted(set.intersection(*(set(p) for p in parts)))
    return {b: float(np.mean([p[b] for p in parts])) for b in blocks}


def fastewq_blocks(scores: Mapping[str, Any], ctx: ModelContext) -> dict[int, float]:
    """FastEWQ: the shipped classifier's probability that full EWQ keeps the block (metadata only)."""
    from ggufmix.score.fastewq import predict_keep

    return predict_keep(ctx)


# -- finishing: block scores -> importances -----------------------------------------------------------

TierFn = Callable[[Mapping[int, float]], dict[int, int]]


def _fastewq_tiers(p_keep: Mapping[int, float]) -> dict[int, int]:
    """FastEWQ decides keep or quantize: the top tier or the bottom one."""
    return {b: 2 if p > 0.5 else 0 for b, p in p_keep.items()}


def _finisher(block_fn: BlockScoreFn, tiers: TierFn | None = None) -> Callable[
        [Mapping[str, Any], ModelContext], dict[str, TensorScore]]:
    """Block scores -> per-tensor importance (and EWQ's tier, for ``--rule``); tensors outside the blocks: 1."""
    def finish(scores: Mapping[str, Any], ctx: ModelContext) -> dict[str, TensorScore]:
        block_scores = block_fn(scores, ctx)
        imp = stats.importance_from_scores(block_scores)
        tier = tiers(block_scores) if tiers and block_scores else {}
        layers = {s.name: s.layer for s in ctx.slots}
        out = {}
        for name, ts in scores.items():
            block = layers.get(name)
            extra = {"block_importance": imp[block], "block_score": block_scores[block]} if block in imp else {}
            if block in tier:
                extra["ewq_tier"] = tier[block]
            out[name] = TensorScore(dict(ts.errors), imp.get(block, 1.0), {**ts.stats, **extra})
        return out
    return finish


# -- registration ---------------------------------------------------------------------------------------

StatFn = Callable[[TensorJob], dict[str, float]]
TIERED = {"ewq": stats.ewq_tiers, "ewq-norm": stats.ewq_tiers}
PAPERS: dict[str, tuple[StatFn, BlockScoreFn, str, bool, str]] = {
    # name: (per-tensor statistic, block score, activations needed, needs sampled rows, description)
    "ewq": (entropy_stats, ewq_blocks, "", False, "EWQ: parameter-weighted softmax entropy per block"),
    "ewq-norm": (entropy_stats, ewq_norm_blocks, "", False, "EWQ with size-normalised entropy (ln n - H)"),
    "zd": (zd_stats, zd_blocks, "", False, "ZD: share of weights with z-score > 1 per block"),
    "lim": (metadata_stats, lim_blocks, "blocks", False, "LIM: 1 - cos(block input, output) on calibration text"),
    "lieq": (energy_stats, lieq_blocks, "ablation", True,
             "LieQ: removal perplexity, output compactness and top-k energy gain per block"),
}


def _pure_fn(stat: StatFn) -> Callable[[TensorJob], TensorScore]:
    return lambda job: TensorScore(generic_errors(job), stats=stat(job))


def _hybrid_fn(stat: StatFn) -> Callable[[TensorJob], TensorScore]:
    def fn(job: TensorJob) -> TensorScore:
        m = measured(job)
        return TensorScore(m.errors, stats={**m.stats, **stat(job)})
    return fn


WHOLE_TENSOR = (entropy_stats, zd_stats)  # read every weight: numpy-bound, scored in processes where possible

for _name, (_stat, _blocks, _acts, _rows, _desc) in PAPERS.items():
    register(_name, needs_rows=_rows, calibrated=False, finish=_finisher(_blocks, TIERED.get(_name)),
             activations=_acts, gil_bound=_stat in WHOLE_TENSOR,
             description=f"{_desc}; type costs from the real quantizer on Gaussian weights")(_pure_fn(_stat))
    register(f"measured+{_name}", calibrated=True, finish=_finisher(_blocks), activations=_acts,
             description=f"measured error x {_name} block importance")(_hybrid_fn(_stat))

register("fastewq", needs_rows=False, calibrated=False, finish=_finisher(fastewq_blocks, _fastewq_tiers),
         reads_weights=False,
         description="FastEWQ: EWQ's decision predicted from metadata alone (no tensor data read)")(
    _pure_fn(metadata_stats))
