"""Stream a model tensor by tensor through a scorer: load sampled rows, score, drop."""
from __future__ import annotations

import collections
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from ggufmix.errors import InputError
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource
from ggufmix.layout.slots import Layout, Slot
from ggufmix.score.base import BlockStats, Kernels, ModelContext, TensorJob, scorers
from ggufmix.score.journal import Journal
from ggufmix.scores import Scores, TensorScores

logger = logging.getLogger(__name__)

# Rows sampled per tensor. 128 rows of SmolLM2-135M: errors within a few percent of 256 rows (18 of 211
# tensors planned differently at Q4_K_M size, all between near-equal options) in 60% of the time.
DEFAULT_ROWS = 128


def sample_rows(nrows: int, max_rows: int) -> np.ndarray:
    """Evenly spaced row indices, all rows when there are few: deterministic, covers the whole tensor."""
    if nrows <= max_rows:
        return np.arange(nrows)
    return np.unique(np.linspace(0, nrows - 1, max_rows).round().astype(np.int64))


def score_model(source: GGUFSource, layout: Layout, strategy: str, kernels: Kernels, *,
                imatrix: Imatrix | None = None, max_rows: int = DEFAULT_ROWS, threads: int = 2,
                progress: bool = True, journal: Journal | None = None, blocks: BlockStats | None = None,
                oracle: Any = None) -> Scores:
    """Score every quantizable tensor of ``source`` with the strategy's scorer.

    Args:
        imatrix: per-column mean squared activations of the weights it names (``Imatrix.values``), or None.
        max_rows: rows sampled per tensor (per-row scales make a row the natural unit).
        journal: where finished tensors are written as they come (resume after an interruption);
            tensors it already holds are not scored again.
        blocks: activation diagnostics for strategies that rank layers by them (lim, lieq).
        oracle: the KLD oracle's measurements for the ``kld`` strategy (score/oracle.py).
    """
    spec = scorers()[strategy]
    slots = [s for s in layout.slots if s.quantized]
    results: dict[str, TensorScores] = journal.load() if journal else {}
    todo = [s for s in slots if s.name not in results]
    jobs = (_job(source, s, kernels, imatrix, max_rows, spec.needs_rows) for s in todo)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        it = _bounded_map(pool, lambda j: (j.name, spec.fn(j)), jobs, 2 * max(1, threads))
        for name, ts in tqdm(it, total=len(slots), initial=len(slots) - len(todo), desc=f"scoring ({strategy})",
                             unit="tensor", disable=not progress, leave=False):
            results[name] = TensorScores(dict(ts.errors), ts.importance, dict(ts.stats))
            if journal:
                journal.add(name, results[name])
    if spec.finish is not None:
        ctx = ModelContext(tuple(slots), layout.n_layers, source.metadata, blocks, oracle)
        done = spec.finish({n: results[n] for n in (s.name for s in slots)}, ctx)
        results = {n: TensorScores(dict(ts.errors), ts.importance, dict(ts.stats)) for n, ts in done.items()}
    settings = {"max_rows": max_rows, "imatrix": None if imatrix is None else str(getattr(imatrix, "path", "yes"))}
    st = source.path.stat()
    src = {"path": str(source.path), "name": source.path.name, "size": st.st_size,
           "total_elements": layout.total_elements, "arch": layout.arch}
    return Scores(src, strategy, settings, layout, {s.name: results[s.name] for s in slots},
                  calibrated=spec.calibrated)


def _bounded_map(pool: ThreadPoolExecutor, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """``pool.map`` that keeps at most ``window`` items loaded: Executor.map consumes its whole input
    at once, which held every tensor's sampled rows in memory before the first was scored."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _job(source: GGUFSource, slot: Slot, kernels: Kernels, imatrix: Imatrix | None, max_rows: int,
         needs_rows: bool) -> TensorJob:
    ncols = slot.shape[0]
    nrows = slot.n_elements // ncols
    idx = sample_rows(nrows, max_rows) if needs_rows else np.arange(0)
    rows = source.rows(slot.name, idx) if needs_rows else np.zeros((0, ncols), np.float32)
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise InputError(f"{source.path}: tensor {slot.name!r} has NaN or infinite weights (row {int(idx[bad[0]])}); "
                         "the source is damaged")
    rows_per_group = slot.shape[1] if len(slot.shape) > 1 else 1
    imat = None
    if imatrix is not None and slot.name in imatrix:
        imat = imatrix.values(slot.name).reshape(-1, ncols)
    groups = (idx // rows_per_group) if imat is not None and imat.shape[0] > 1 else np.zeros(len(idx), np.int64)
    return TensorJob(slot.name, slot.role, slot.layer, slot.shape, tuple(slot.candidates), rows,
                     groups, imat, kernels, read=lambda index: source.rows(slot.name, index))
