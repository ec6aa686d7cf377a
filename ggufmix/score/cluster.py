"""Score tensors on a Ray cluster: one Ray task per tensor, each reading its own rows from the source.

The driver (``score_model``) hands every tensor to :class:`RayRunner` as a ``TensorTask``: the source's
path, the tensor's slot, the strategy, the rows to sample and its imatrix slice. A worker opens the source
itself (a path every node sees: a shared disk, or the same file copied to every node), reads only that
tensor's sampled rows (or, for ewq/zd, the whole tensor a few MB at a time), scores it with the same
scorer and llama.cpp kernels as a single-machine run, and sends back the scores: a few dozen floats, never
weights. The driver writes each result to the journal as it arrives (a lost driver resumes from there)
and Ray resubmits the task of a lost worker (``max_retries``). Scores are the same to the bit as the
single-machine run: the same rows go through the same deterministic code, only elsewhere.

``--strategy kld`` sends the KLD oracle's (tensor, type) pairs instead: one :class:`OracleWorker` actor per
cluster CPU holds the source loaded in llama.cpp and measures its share (score/oracle.measure_all).

Ray is an optional extra (``pip install 'ggufmix[cluster]'``) imported only here, only when ``--ray``
is given. The driver ships its own ggufmix to the cluster (Ray ``runtime_env`` ``py_modules``), and every
task checks that the worker runs the same ggufmix code and llama-cpp-python as the driver, so a node with
another version cannot mix its scores in.
"""
from __future__ import annotations

import functools
import logging
import os
import resource
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ggufmix.errors import EngineError, GgufmixError, InputError, MissingDependencyError, UsageError
from ggufmix.engine import kernels
from ggufmix.engine.llamalib import version
from ggufmix.io.gguf_source import GGUFSource, open_gguf
from ggufmix.score.base import Kernels
from ggufmix.score.journal import code_digest
from ggufmix.score.quant_error import known_noise, remember_noise
from ggufmix.score.stream import TensorTask, run_task
from ggufmix.scores import TensorScores

logger = logging.getLogger(__name__)

LOCAL = "local"      # --ray without a value: start a cluster on this machine
MAX_RETRIES = 4      # Ray resubmits a task whose worker died this many times before giving up
TASKS_PER_CPU = 2    # tasks in flight per cluster CPU: one running, one queued behind it


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra.

    Raises:
        MissingDependencyError: ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--ray needs Ray: pip install 'ggufmix[cluster]'") from None
    return ray


def check_ray(address: str) -> None:
    """Fail now, before any work, when ``--ray address`` cannot work: Ray missing, or no cluster at the address.

    Raises:
        MissingDependencyError: ray is not installed.
        UsageError: a malformed address, or nothing answers there.
    """
    import_ray()
    if address not in (LOCAL, "auto"):
        _check_reachable(address)


@dataclass
class RayRunner:
    """Runs tensor tasks as Ray tasks on the cluster ``address`` (``local``: start one with ``num_cpus``).

    Attributes:
        peak_rss: worker pid -> its peak resident set size in bytes, as the workers report it.
        cpu_seconds: worker pid -> CPU seconds it had used by its last task (since the process started).
    """

    address: str = LOCAL
    num_cpus: int | None = None
    peak_rss: dict[int, int] = field(default_factory=dict)
    cpu_seconds: dict[int, float] = field(default_factory=dict)

    def map(self, tasks: Iterator[TensorTask]) -> Iterator[tuple[str, TensorScores]]:
        """Submit ``tasks`` (at most ``TASKS_PER_CPU`` per cluster CPU in flight), yield results as they finish."""
        ray = import_ray()
        started = connect(ray, self.address, self.num_cpus)
        try:
            yield from self._run(ray, tasks)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray: Any, tasks: Iterator[TensorTask]) -> Iterator[tuple[str, TensorScores]]:
        remote = ray.remote(max_retries=MAX_RETRIES, num_cpus=1)(score_tensor)
        expect = (code_digest(), version())
        prices = ray.put(known_noise())
        window = max(1, TASKS_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))
        pending: dict[Any, str] = {}  # task -> its tensor's name
        try:
            for task in tasks:
                pending[remote.remote(task, expect, prices)] = task.slot.name
                if len(pending) >= window:
                    yield self._collect(ray, pending, remember_noise)
            while pending:
                yield self._collect(ray, pending, remember_noise)
        except BaseException:
            _settle(ray, list(pending))
            raise

    def measure_pairs(self, job: Any, todo: list[tuple[str, Any]]) -> Iterator[tuple[str, Any, tuple[float, float]]]:
        """The KLD oracle's (tensor, type) pairs on the cluster: one :class:`OracleWorker` actor per cluster CPU,
        each with the source loaded once, at most ``TASKS_PER_CPU`` pairs in flight per actor; a killed actor is
        restarted (it loads the source again) and its pairs run again. Yields (tensor, type, measurement)."""
        ray = import_ray()
        started = connect(ray, self.address, self.num_cpus)
        try:
            yield from self._measure(ray, job, todo)
        finally:
            if started:
                ray.shutdown()

    def _measure(self, ray: Any, job: Any, todo: list[tuple[str, Any]]) -> Iterator[tuple[str, Any, tuple[float, float]]]:
        actor = ray.remote(num_cpus=1, max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)(OracleWorker)
        n = max(1, min(len(todo), int(ray.cluster_resources().get("CPU", 1))))
        expect = (code_digest(), version())
        shared = ray.put(replace(job, settings=replace(job.settings, threads=1)))  # one CPU per actor
        actors = [actor.remote(shared, expect) for _ in range(n)]
        queue = list(todo)
        pending: dict[Any, tuple[int, tuple[str, Any]]] = {}  # task -> (its actor, its pair)
        load = [0] * n
        try:
            while queue or pending:
                for i in range(n):
                    while queue and load[i] < TASKS_PER_CPU:
                        pair = queue.pop(0)
                        pending[actors[i].measure.remote(*pair)] = (i, pair)
                        load[i] += 1
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                i, (name, qtype) = pending.pop(ready)
                load[i] -= 1
                yield name, qtype, self._result(ray, ready, f"oracle task for tensor {name!r} at {qtype.name}")
        except BaseException:
            _settle(ray, list(pending))
            raise
        finally:
            for a in actors:
                ray.kill(a)

    @staticmethod
    def _result(ray: Any, ref: Any, what: str) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, GgufmixError):
                raise e.cause from None
            raise EngineError(f"{what} failed: {e.cause!r}") from None
        except ray.exceptions.RayError as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise EngineError(f"{what} failed: {type(e).__name__}: {msg}") from None

    def _collect(self, ray: Any, pending: dict[Any, str], remember: Any) -> tuple[str, TensorScores]:
        """Wait for any one pending task; take its type prices and its worker's peak RSS; return its scores.

        Raises:
            GgufmixError: the one the task raised (a damaged tensor, another ggufmix on a node).
            EngineError: Ray gave up on the task (its worker died more than ``MAX_RETRIES`` times ...).
        """
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        tensor = pending.pop(ready)
        name, scores, prices, (pid, rss, cpu) = self._result(ray, ready, f"Ray task for tensor {tensor!r}")
        remember(prices)
        self.peak_rss[pid] = max(self.peak_rss.get(pid, 0), rss)
        self.cpu_seconds[pid] = max(self.cpu_seconds.get(pid, 0.0), cpu)
        return name, scores


def _settle(ray: Any, refs: list[Any], timeout: float = 10.0) -> None:
    """Cancel the tasks still in flight and wait for them to stop before the driver leaves: a task that ends after
    ``ray.shutdown`` makes Ray's core worker print its own error line beside ggufmix's one-line error."""
    for ref in refs:
        ray.cancel(ref, force=True)
    ray.wait(refs, num_returns=len(refs), timeout=timeout)


def connect(ray: Any, address: str, num_cpus: int | None) -> bool:
    """Join the cluster (or start a local one); True when this call started Ray and must shut it down.

    Raises:
        UsageError: no cluster at ``address``.
    """
    if ray.is_initialized():
        return False
    env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
    kw: dict[str, Any] = {"runtime_env": env, "include_dashboard": False, "log_to_driver": False,
                          "logging_level": logging.WARNING}
    if address not in (LOCAL, "auto"):
        _check_reachable(address)
    try:
        if address == LOCAL:
            ray.init(num_cpus=num_cpus, **kw)
        else:
            ray.init(address=address, **kw)
    except ConnectionError as e:
        raise UsageError(f"--ray {address}: no Ray cluster there ({e}); start one with `ray start --head`") from None
    logger.info("ray: %s", ray.cluster_resources())
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to the head's GCS port (``ray.init`` would retry an unreachable one for minutes).

    Raises:
        UsageError: not HOST:PORT, or nothing answers there.
    """
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--ray {address}: expected auto, HOST:PORT, or no value (a local cluster)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: no Ray cluster answers there ({e.strerror or e}); "
                         "start one with `ray start --head`") from None


def score_tensor(task: TensorTask, expect: tuple[str, str],
                 prices: dict[Any, float]) -> tuple[str, TensorScores, dict[Any, float], tuple[int, int, float]]:
    """The Ray task: score one tensor on this worker. Returns its scores, the type prices it used, and this
    worker's pid, peak RSS (bytes) and CPU seconds so far.

    Raises:
        UsageError: this worker runs another ggufmix or llama-cpp-python than the driver.
        InputError: the source is not at the task's path on this node, or is damaged.
    """
    _check_same_code(expect)
    remember_noise(prices)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows, kernels.f16_to_f32)
    scores = run_task(task, _open(task.path), k)
    width = task.slot.shape[0]
    used = {k: v for k, v in known_noise().items() if k[1] == width}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return task.slot.name, scores, used, (os.getpid(), usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


class OracleWorker:
    """A Ray actor holding one KLD oracle (score/oracle.Oracle): the source loaded in llama.cpp and its kept
    base rows, built once when the actor starts (and again when Ray restarts a killed one).

    Raises:
        UsageError: this worker runs another ggufmix or llama-cpp-python than the driver.
    """

    def __init__(self, job: Any, expect: tuple[str, str]) -> None:
        _check_same_code(expect)
        self._oracle = job.open()

    def measure(self, name: str, qtype: Any) -> tuple[float, float]:
        return self._oracle.measure(name, qtype)


def _check_same_code(expect: tuple[str, str]) -> None:
    here = (code_digest(), version())
    if here != expect:
        raise UsageError(f"Ray worker pid {os.getpid()} runs ggufmix code {here[0][:12]} / llama-cpp-python "
                         f"{here[1]}, the driver {expect[0][:12]} / {expect[1]}: install the same on every node")


def _open(path: str) -> GGUFSource:
    """The source at ``path``, opened once per worker process (and again if the file changes)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{path}: not readable on this Ray node ({e.strerror}); every node must see the "
                         "source at the same path") from None
    return _open_cached(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFSource:
    return open_gguf(path, check_data=False)
