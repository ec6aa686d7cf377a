"""The KLD oracle's measurements: end-to-end mean KLD of the model with one tensor quantized, per (tensor, type).

The source is loaded once in llama.cpp (engine/oracle.SwapModel); its log-probabilities on the calibration
chunks are kept as top-k rows (evaluate/basecache.compress_topk, the same estimate ``ggufmix eval`` reports);
then for every tensor and type the tensor is swapped for ``dequantize(quantize(w))`` by llama.cpp's kernels
(with the imatrix), the chunks run, KLD and top-1 agreement are taken against the kept rows, and the tensor
is restored. Every measurement is written to a keyed journal as it comes (``${GGUFMIX_CACHE}/oracle/``):
an interrupted run resumes, and another budget that wants some of the same (tensor, type) pairs reuses them.

Cost: tensors x types x chunks forward passes of ``ctx`` tokens (plus one quantize of the tensor per type).
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ggufmix.engine.llamalib import version
from ggufmix.engine.logits import ChunkPlan, plan_chunks
from ggufmix.engine.oracle import SwapModel, check_memory
from ggufmix.errors import UsageError
from ggufmix.evaluate.basecache import compress_topk, token_stats_topk
from ggufmix.imatrix import Imatrix
from ggufmix.io.text import text_sha256
from ggufmix.layout.slots import Layout, Slot
from ggufmix.score.journal import Journal, fingerprint
from ggufmix.scores import TensorScores
from ggufmix.types import QuantType, bits_per_weight, block_size

logger = logging.getLogger(__name__)

# Without a budget the oracle measures the types around these widths (bits per weight): the middle of
# the range people build GGUFs for. `build --budget` and `bench` pass their own widths instead.
DEFAULT_WIDTHS = (3.5, 4.5)
MAX_TYPES = 4  # measured types per tensor; the rest are interpolated along the tensor's noise curve


@dataclass(frozen=True)
class OracleSettings:
    """Calibration chunks and the widths whose nearest types are measured."""

    chunks: int = 4
    ctx: int = 512
    start: int = 64  # first scored position of a chunk: more tokens per pass than perplexity's ctx/2
    widths: tuple[float, ...] = DEFAULT_WIDTHS
    threads: int | None = None
    max_types: int = MAX_TYPES  # measured types per tensor at most (2..4)

    def __post_init__(self) -> None:
        if self.chunks < 1 or not self.widths or any(w <= 0 for w in self.widths):
            raise UsageError(f"oracle: chunks {self.chunks} and widths {self.widths} must be positive")
        if not 1 <= self.max_types <= 8:
            raise UsageError(f"oracle: {self.max_types} measured types per tensor; give 1..8")
        if not 1 <= self.start < self.ctx - 1:
            raise UsageError(f"oracle: the first scored position {self.start} must lie inside the {self.ctx}-token chunk")


@dataclass(frozen=True)
class ScoredFrom(ChunkPlan):
    """Chunks scored from position ``start`` on (perplexity.cpp scores the second half only): the oracle
    compares the model with itself, so early positions count too, at almost no extra cost per pass. The
    chunks are spread over the whole text, ``stride`` chunks apart: a calibration text is often several
    texts put together (web, technical, code), and its first chunks would all come from the first one."""

    start: int = 64
    stride: int = 1

    @property
    def first(self) -> int:
        return self.start

    def chunk_tokens(self, tokens: np.ndarray, index: int) -> np.ndarray:
        return super().chunk_tokens(tokens, index * self.stride)

    def targets(self, tokens: np.ndarray, index: int) -> np.ndarray:
        return super().targets(tokens, index * self.stride)


def parse_oracle(text: str) -> OracleSettings:
    """``chunks=2,ctx=128,start=16,types=2,threads=1`` (any subset) -> OracleSettings.

    Raises:
        UsageError: an unknown key or a value that is not a positive integer.
    """
    fields = {"chunks": "chunks", "ctx": "ctx", "start": "start", "types": "max_types", "threads": "threads"}
    kw: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in fields or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--oracle {text!r}: expected KEY=N with KEY one of {', '.join(fields)}, got {part!r}")
        kw[fields[key]] = int(value)
    return OracleSettings(**kw)


Measurement = tuple[float, float]  # (mean KLD, share of tokens whose top-1 token is unchanged)


def types_to_measure(slot: Slot, widths: Sequence[float], has_imatrix: bool,
                     max_types: int = MAX_TYPES) -> list[QuantType]:
    """Per width, the candidate just at/below it and the one just above (by bits per weight), at most
    ``max_types`` in all (those nearest the widths' mean kept). Types that need an imatrix are left out without one."""
    from ggufmix.engine.kernels import ggml

    cands = sorted((t for t in slot.candidates
                    if has_imatrix or not ggml().ggml_quantize_requires_imatrix(int(t))),
                   key=lambda t: (bits_per_weight(t), int(t)))
    picked: set[QuantType] = set()
    for w in widths:  # of types as wide, the one with the bigger block (Q5_K over Q5_0): it quantizes better
        below = [t for t in cands if bits_per_weight(t) <= w]
        above = [t for t in cands if bits_per_weight(t) > w]
        if below:
            picked.add(max(below, key=lambda t: (bits_per_weight(t), block_size(t), -int(t))))
        if above:
            picked.add(min(above, key=lambda t: (bits_per_weight(t), -block_size(t), int(t))))
    mean = sum(widths) / len(widths)
    keep = sorted(picked, key=lambda t: (abs(bits_per_weight(t) - mean), int(t)))[:max_types]
    return sorted(keep, key=lambda t: (bits_per_weight(t), int(t)))


class Oracle:
    """A loaded source and its kept base rows: ``divergence()`` of whatever is swapped in right now."""

    def __init__(self, source: Path, layout: Layout, text: str, settings: OracleSettings,
                 imatrix: Imatrix | None = None) -> None:
        self.layout, self.imatrix, self.settings = layout, imatrix, settings
        self._slots = layout.by_name()
        names = [s.name for s in layout.slots if s.quantized]
        check_memory(source, [s.n_elements for s in layout.slots if s.quantized])
        self.model = SwapModel(source, names, ctx=settings.ctx, n_threads=settings.threads)
        try:
            self.tokens = self.model.tokenize(text)
            full = plan_chunks(len(self.tokens), settings.ctx, settings.chunks)
            stride = len(self.tokens) // full.ctx // full.n_chunks
            self.plan: ChunkPlan = ScoredFrom(full.ctx, full.n_chunks, settings.start, stride)
            self.model.find_weights(self.tokens, self.plan)
            t0 = time.perf_counter()
            self.base = [compress_topk(lp, self._targets(i)) for i, lp in
                         enumerate(self.model.iter_chunks(self.tokens, self.plan))]
            self.seconds_per_pass = time.perf_counter() - t0
        except BaseException:
            self.model.close()
            raise

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Oracle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _targets(self, i: int) -> np.ndarray:
        return self.plan.targets(self.tokens, i).astype(np.int32)

    def divergence(self) -> Measurement:
        """Mean KLD and top-1 agreement of the model as it is now against the source's kept rows."""
        kld, same, n = 0.0, 0.0, 0
        for i, lp in enumerate(self.model.iter_chunks(self.tokens, self.plan)):
            st = token_stats_topk(self.base[i], lp, self._targets(i))
            kld += float(st.kld.sum())
            same += float(st.same_top.sum())
            n += st.kld.size
        return max(kld / n, 0.0), same / n

    def swap(self, name: str, qtype: QuantType) -> None:
        """Put ``name`` at ``qtype`` (quantized and dequantized by llama.cpp's kernels, with the imatrix)."""
        slot = self._slots[name]
        imat = None
        if self.imatrix is not None and name in self.imatrix:
            imat = self.imatrix.values(name).reshape(-1, slot.shape[0])
        rows_per_group = slot.shape[1] if len(slot.shape) > 1 else 1
        self.model.swap_quantized(name, qtype, imat, rows_per_group)

    def restore(self, name: str | None = None) -> None:
        self.model.restore(name)

    def measure(self, name: str, qtype: QuantType) -> Measurement:
        """KLD and top-1 agreement with only ``name`` at ``qtype``; the tensor is restored afterwards."""
        self.swap(name, qtype)
        try:
            return self.divergence()
        finally:
            self.restore(name)


# The modules whose arithmetic a measurement's value depends on: their digest keys the journal (not all of
# ggufmix's code, so that a planner change does not throw away hours of measurements). MEASUREMENT_VERSION
# stands for this module's own part (what is swapped, which tokens are scored): bump it when that changes.
MEASURING_CODE = ("engine/oracle.py", "engine/kernels.py", "evaluate/basecache.py", "numerics.py")
MEASUREMENT_VERSION = 2  # 2: the chunks are spread over the text


def journal_for(source: Path, text: str, settings: OracleSettings, imatrix_path: Path | None,
                root: Path | None = None) -> Journal:
    """The measurements' journal, kept across runs (``${GGUFMIX_CACHE}/oracle/``), keyed by everything a
    measurement depends on but not by the widths: another budget reuses the pairs it shares."""
    pkg = Path(__file__).resolve().parent.parent
    code = hashlib.sha256(b"".join((pkg / m).read_bytes() for m in MEASURING_CODE)).hexdigest()
    return Journal({"oracle": MEASUREMENT_VERSION, "source": fingerprint(source), "text": text_sha256(text), "chunks": settings.chunks,
                    "ctx": settings.ctx, "start": settings.start,
                    "imatrix": fingerprint(imatrix_path) if imatrix_path else None,
                    "llama-cpp-python": version(), "code": code}, root=root, folder="oracle", code=False)


@dataclass(frozen=True)
class OracleJob:
    """What every oracle needs to load: the source, its layout, the calibration text, the settings, the imatrix
    (picklable: a Ray actor builds its own :class:`Oracle` from it)."""

    source: Path
    layout: Layout
    text: str
    settings: OracleSettings
    imatrix: Imatrix | None

    def open(self) -> Oracle:
        return Oracle(self.source, self.layout, self.text, self.settings, self.imatrix)


Pair = tuple[str, QuantType]


def measure_all(source: Path, layout: Layout, text: str, settings: OracleSettings, imatrix: Imatrix | None,
                journal: Journal, progress: bool = True,
                runner: Any = None) -> dict[str, dict[QuantType, Measurement]]:
    """Every quantizable tensor at its ``types_to_measure``; journaled pairs are not measured again.

    Args:
        runner: where the measurements run: None (one oracle here) or score/cluster.RayRunner (one oracle per
            cluster CPU, each measuring its share of the pairs).
    """
    slots = [s for s in layout.slots if s.quantized]
    done = _load(journal)
    wanted = {s.name: types_to_measure(s, settings.widths, imatrix is not None, settings.max_types) for s in slots}
    todo = [(n, t) for n, ts in wanted.items() for t in ts if t not in done.get(n, {})]
    if todo:
        job = OracleJob(source, layout, text, settings, imatrix)
        pairs = measure_here(job, todo) if runner is None else runner.measure_pairs(job, todo)
        bar = tqdm(total=len(todo), desc="oracle (tensor x type)", unit="pass", disable=not progress, smoothing=0.1)
        for name, qtype, m in pairs:
            done.setdefault(name, {})[qtype] = m
            journal.add(f"{name}#{qtype.name}", TensorScores({qtype: m[0]}, 1.0, {"top1": m[1]}))
            bar.update()
        bar.close()
    return {n: {t: done[n][t] for t in ts} for n, ts in wanted.items()}


def measure_here(job: OracleJob, todo: Sequence[Pair]) -> Iterator[tuple[str, QuantType, Measurement]]:
    """The pairs measured one after another by one oracle in this process."""
    with job.open() as oracle:
        logger.info("oracle: %d measurements to make; %.1f s per pass of %d x %d tokens", len(todo),
                    oracle.seconds_per_pass, job.settings.chunks, job.settings.ctx)
        for name, qtype in todo:
            yield name, qtype, oracle.measure(name, qtype)


def _load(journal: Journal) -> dict[str, dict[QuantType, Measurement]]:
    out: dict[str, dict[QuantType, Measurement]] = {}
    for key, ts in journal.load().items():
        name = key.rpartition("#")[0]
        for t, kld in ts.errors.items():
            out.setdefault(name, {})[t] = (kld, float(ts.stats.get("top1", 0.0)))
    return out


def interpolate(nsr: Mapping[QuantType, float], measured: Mapping[QuantType, Measurement]) -> dict[QuantType, float]:
    """Every type's KLD from the measured ones along the tensor's noise curve.

    KLD grows about linearly with the output noise while the noise is small, so the oracle's KLD per unit
    of noise-to-signal ratio (the gain) is interpolated in log-NSR between the measured types and held
    constant beyond them; a measured type keeps its measurement. A measurement below a less noisy type's (the KLD
    of a few chunks is noisy: SmolLM2-135M's blk.2.attn_q measured 0 at Q5_1 and 1.7e-5 at Q8_0) anchors nothing:
    its gain, held beyond it, made Q2_0 cost 8e-10 and the plan took it.
    """
    pts = sorted((max(nsr[t], 1e-12), max(m[0], 1e-12)) for t, m in measured.items())
    if not pts:
        raise ValueError("interpolate: no measured type")
    pts = [p for i, p in enumerate(pts) if p[1] >= max(k for _, k in pts[:i + 1])]
    xs = np.log([p[0] for p in pts])
    gains = np.log([k / n for n, k in pts])
    out = {}
    for t, n in nsr.items():
        if t in measured:
            out[t] = max(measured[t][0], 0.0)
        else:
            g = float(np.interp(np.log(max(n, 1e-12)), xs, gains))
            out[t] = float(np.exp(g) * max(n, 0.0))
    return out
