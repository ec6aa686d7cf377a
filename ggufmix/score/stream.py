"""Stream a model tensor by tensor through a scorer: load sampled rows, score, drop."""
from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ggufmix.errors import InputError
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource
from ggufmix.layout.slots import Layout, Slot
from ggufmix.score.base import BlockStats, Kernels, ModelContext, ScorerSpec, TensorJob, scorers
from ggufmix.score.journal import Journal
from ggufmix.score.quant_error import price
from ggufmix.scores import Scores, TensorScores
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

# Rows sampled per tensor. 128 rows of SmolLM2-135M: errors within a few percent of 256 rows (18 of 211
# tensors planned differently at Q4_K_M size, all between near-equal options) in 60% of the time.
DEFAULT_ROWS = 128


def sample_rows(nrows: int, max_rows: int) -> np.ndarray:
    """Evenly spaced row indices, all rows when there are few: deterministic, covers the whole tensor.

    The runner asks for at least one row per stacked expert: ``max_rows`` evenly spaced rows of an
    ``E x R``-row tensor with ``max_rows == E`` land in every expert exactly once (the step is between R
    and 2R), where 128 rows of DeepSeek-V3's 256 experts saw only every other expert."""
    if nrows <= max_rows:
        return np.arange(nrows)
    return np.unique(np.linspace(0, nrows - 1, max_rows).round().astype(np.int64))


@dataclass(frozen=True)
class TensorTask:
    """One tensor's measurement as data that can travel to another machine: where the source is, which
    tensor, how to score it, and its imatrix slice (tens of KB). Never weights: whoever runs the task
    reads the tensor's rows from ``path`` itself."""

    path: str
    slot: Slot
    strategy: str
    max_rows: int
    imatrix: np.ndarray | None = None   # (n experts or 1, ncols) per-column mean squared activation
    usage: np.ndarray | None = None     # (n experts,) activation count of each expert over the mean count


class Runner(Protocol):
    """Runs tensor tasks somewhere and yields ``(name, scores)`` as they finish, in any order."""

    def map(self, tasks: Iterator[TensorTask]) -> Iterator[tuple[str, TensorScores]]: ...


def run_task(task: TensorTask, source: GGUFSource, kernels: Kernels) -> TensorScores:
    """Read the task's rows from ``source`` and score them with its strategy (the unit of work everywhere)."""
    spec = scorers()[task.strategy]
    ts = spec.fn(_job(source, task.slot, kernels, task.imatrix, task.max_rows, spec.needs_rows, task.usage))
    return TensorScores(dict(ts.errors), ts.importance, dict(ts.stats))


@dataclass
class ThreadRunner:
    """Tasks on this machine's threads (the ctypes kernels release the GIL), at most 2 per thread loaded."""

    source: GGUFSource
    kernels: Kernels
    threads: int = 2

    def map(self, tasks: Iterator[TensorTask]) -> Iterator[tuple[str, TensorScores]]:
        n = max(1, self.threads)
        with ThreadPoolExecutor(n) as pool:
            yield from _bounded_map(pool, lambda t: (t.slot.name, run_task(t, self.source, self.kernels)), tasks, 2 * n)


@dataclass
class ForkRunner:
    """Tasks in ``processes`` forked worker processes, for the scorers that run numpy over every weight (ewq, zd).

    Their threads queue for the GIL between numpy's calls, each a few dozen microseconds on a piece of a
    tensor: on 2 cores, 2 threads scored SmolLM2 ~1.3x as fast as one, 2 processes ~1.7x. A forked worker
    starts in milliseconds with the parent's opened source and kernels (a spawned one would import numpy,
    gguf and llama_cpp first: ~0.5 s, a whole run on a small model). The workers run no llama.cpp code of
    their own (see ``_before_fork``). Tasks go out in batches of ~BATCH_VALUES weights, results come back
    as batches finish.
    """

    source: GGUFSource
    kernels: Kernels
    processes: int = 2

    def map(self, tasks: Iterator[TensorTask]) -> Iterator[tuple[str, TensorScores]]:
        todo = list(tasks)  # a task is a few hundred bytes: the weights stay on disk
        self._before_fork(todo)
        n = max(1, self.processes)
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_start_worker,
                                 initargs=(self.source, self.kernels)) as pool:
            for done in _bounded_map(pool, _score_in_worker, _batches(iter(todo), BATCH_VALUES), 2 * n):
                yield from done

    def _before_fork(self, todo: list[TensorTask]) -> None:
        """Everything a worker would load from llama.cpp, loaded here: every type price the tasks need, and
        the F16 converter. Pricing an IQ type runs ggml's OpenMP grid set-up, and a forked child of a process
        whose OpenMP threads exist waits forever for them (they are not forked): the children must not."""
        for task in todo:
            for qtype in task.slot.candidates:
                price(self.kernels, qtype, task.slot.shape[0])
        if self.kernels.f16_to_f32 is not None:
            self.kernels.f16_to_f32(np.zeros(1, np.float16), np.zeros(1, np.float32))


def can_fork() -> bool:
    """Whether this OS starts processes by fork (Linux, the BSDs; not Windows; macOS forks, but its system
    libraries may abort a forked child that uses them, so not there either)."""
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def local_runner(spec: ScorerSpec, source: GGUFSource, kernels: Kernels, workers: int) -> Runner:
    """``workers`` threads, or as many forked processes for a GIL-bound scorer where the OS forks."""
    if spec.gil_bound and workers > 1 and can_fork():
        return ForkRunner(source, kernels, workers)
    return ThreadRunner(source, kernels, workers)


_WORKER: list[Any] = []  # a forked worker's (source, kernels)


def _start_worker(source: GGUFSource, kernels: Kernels) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the parent, which stops the workers
    _WORKER[:] = [source, kernels]


# Weights per batch of tasks sent to a forked worker: ~10 ms of work, so that the ~0.3 ms a task costs to
# send, run and answer stays small (SmolLM2's 211 tensors are ~1M weights each).
BATCH_VALUES = 1 << 23


def _batches(tasks: Iterator[TensorTask], values: int) -> Iterator[list[TensorTask]]:
    """Consecutive tasks in lists of at least ``values`` weights (a larger tensor alone; the rest at the end)."""
    batch: list[TensorTask] = []
    size = 0
    for task in tasks:
        batch.append(task)
        size += task.slot.n_elements
        if size >= values:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _score_in_worker(batch: list[TensorTask]) -> list[tuple[str, TensorScores]]:
    return [(t.slot.name, run_task(t, _WORKER[0], _WORKER[1])) for t in batch]


def n_matrices(shape: tuple[int, ...]) -> int:
    """Matrices stacked in a tensor: the experts of a 3-D ``ffn_*_exps`` (ggml order: cols, rows, experts), else 1."""
    return int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1


def score_model(source: GGUFSource, layout: Layout, strategy: str, kernels: Kernels, *,
                imatrix: Imatrix | None = None, max_rows: int = DEFAULT_ROWS, threads: int = 2,
                progress: bool = True, journal: Journal | None = None, blocks: BlockStats | None = None,
                runner: Runner | None = None, oracle: Any = None, check: Callable[[], Any] | None = None) -> Scores:
    """Score every quantizable tensor of ``source`` with the strategy's scorer.

    Args:
        imatrix: per-column mean squared activations of the weights it names (``Imatrix.values``), or None.
        max_rows: rows sampled per tensor (per-row scales make a row the natural unit).
        journal: where finished tensors are written as they come (resume after an interruption);
            tensors it already holds are not scored again.
        blocks: activation diagnostics for strategies that rank layers by them (lim, lieq).
        runner: where the tensors are scored (default: ``threads`` threads here; score/cluster.py: Ray).
        oracle: the KLD oracle's measurements for the ``kld`` strategy (score/oracle.py).
        check: called after each tensor; it raises to stop the scoring (measure's preflight did).
    """
    spec = scorers()[strategy]
    slots = [s for s in layout.slots if s.quantized]
    results: dict[str, TensorScores] = journal.load() if journal else {}
    todo = [s for s in slots if s.name not in results]
    where = str(source.path.absolute())  # a task may run in another folder, or on another machine
    tasks = (TensorTask(where, s, strategy, max_rows, _imatrix_slice(imatrix, s), _usage(imatrix, s)) for s in todo)
    it = (runner or local_runner(spec, source, kernels, threads)).map(tasks)
    for name, ts in tqdm(it, total=len(slots), initial=len(slots) - len(todo), desc=f"scoring ({strategy})",
                         unit="tensor", disable=not progress, leave=False):
        results[name] = ts
        if journal:
            journal.add(name, ts)
        if check:
            check()
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


def _usage(imatrix: Imatrix | None, slot: Slot) -> np.ndarray | None:
    """Each expert's activation count over the mean count (llama-imatrix counts the tokens routed to each
    expert); None for dense weights, without an imatrix, or when no expert was counted."""
    if imatrix is None or slot.name not in imatrix or imatrix.n_mat(slot.name) < 2:
        return None
    counts = imatrix.counts[slot.name].astype(np.float64)
    return counts / counts.mean() if counts.sum() > 0 else None


def _imatrix_slice(imatrix: Imatrix | None, slot: Slot) -> np.ndarray | None:
    """The slot's per-column activation power, one row per expert (None without an imatrix entry)."""
    if imatrix is None or slot.name not in imatrix:
        return None
    return imatrix.values(slot.name).reshape(-1, slot.shape[0])


def _bounded_map(pool: Executor, fn: Any, items: Iterator[Any], window: int) -> Iterator[Any]:
    """``fn`` over ``items`` on ``pool`` with at most ``window`` items in flight, results as they finish.

    Executor.map consumes its whole input at once, which held every tensor's sampled rows in memory before
    the first was scored. Results come in the order they finish, not the order given: waiting for the oldest
    left the other threads idle behind a long tensor at the head (a model's embedding comes first and can be
    a fifth of its weights)."""
    pending: set[Future] = set()
    for item in items:
        pending.add(pool.submit(fn, item))
        if len(pending) >= window:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from _results_first(done)
    while pending:
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        yield from _results_first(done)


def _results_first(done: set[Future]) -> Iterator[Any]:
    """The finished futures' results, the failed ones last: an interrupt raised in one task must not drop another's
    finished result before it reaches the journal."""
    return (f.result() for f in sorted(done, key=lambda f: f.exception() is not None))


def _job(source: GGUFSource, slot: Slot, kernels: Kernels, imat: np.ndarray | None, max_rows: int,
         needs_rows: bool, usage: np.ndarray | None = None) -> TensorJob:
    ncols = slot.shape[0]
    nrows = slot.n_elements // ncols
    idx = sample_rows(nrows, max(max_rows, n_matrices(slot.shape))) if needs_rows else np.arange(0)
    rows = source.rows(slot.name, idx) if needs_rows else np.zeros((0, ncols), np.float32)
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    if len(bad):
        raise InputError(f"{source.path}: tensor {slot.name!r} has NaN or infinite weights (row {int(idx[bad[0]])}); "
                         "the source is damaged")
    rows_per_group = slot.shape[1] if len(slot.shape) > 1 else 1
    groups = (idx // rows_per_group) if imat is not None and imat.shape[0] > 1 else np.zeros(len(idx), np.int64)
    f16 = source.tensors[slot.name].qtype == QuantType.F16
    return TensorJob(slot.name, slot.role, slot.layer, slot.shape, tuple(slot.candidates), rows,
                     groups, imat, kernels, read=lambda index: source.rows(slot.name, index),
                     usage=usage if imat is not None and imat.shape[0] > 1 else None,
                     read_f16=(lambda start, stop, out: source.read_into(slot.name, start, stop, out)) if f16 else None)
