"""``build --gptq``: a copy of the float source whose weights carry GPTQ-style error feedback for the plan's types.

For each weight the plan quantizes (block weights and the output head; not 3-D expert stacks), llama.cpp's
graph gives the inputs' ``H = sum x x^T`` on the calibration text (engine/covariance.py), and realize/gptq.py
moves each block's rounding error onto the columns after it (for COLUMN_TYPES each column's, on llama.cpp's grid).
llama_model_quantize then quantizes the copy exactly as it would the source, and the column-rounded weights' own
bytes replace what it wrote for them (``write_exact``). With ``block_search`` (``build --search-rounding``) each
Q4_1 / Q5_1 / Q4_K / Q5_K block the feedback rounds is the search's of realize/rounding.py, and the block-fed Q4_1 /
Q5_1 weights' bytes go into the file the same way.

``token_embd`` is compensated only where it is also the output head (tied embeddings, no ``output.weight``):
the feedback is for the head's inputs, and each row's lookup as an embedding takes a larger plain error. On
SmolLM2-135M at Q4_K_M's size (token_embd Q5_1) that lowered held-out KLD from 0.0362 to 0.0270 (docs/results.md);
an untied ``token_embd`` is only looked up, and is left alone.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ggufmix.artifacts import temp_beside
from ggufmix.engine import kernels
from ggufmix.engine.activations import cpu_count
from ggufmix.engine.oracle import from_float32, quant_roundtrip, to_float32
from ggufmix.errors import EngineError, InputError, UsageError
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import TensorInfo, writable_tensors
from ggufmix.layout.slots import tied_embeddings
from ggufmix.plan.plan import Plan, PlanEntry
from ggufmix.realize.gptq import (
    Grid,
    Lattice,
    Roundtrip,
    compensate,
    compensate_columns,
    feedback_steps,
    inverse_factor,
    output_error,
)
from ggufmix.realize.rounding import SEARCHED, quantize_searched
from ggufmix.types import QuantType, block_size

logger = logging.getLogger(__name__)

FLOAT_TYPES = (QuantType.F32, QuantType.F16, QuantType.BF16)
# Input matrices held at once (float32): Qwen2.5-1.5B needs ~0.03 GB a block, or ~0.35 GB with ffn_down's
# (--gptq-all), and then two passes over the text.
PASS_BYTES = 6 << 30
# Rows of each weight whose output error the plan's output_error_ratio sums (evenly spaced).
SAMPLE_ROWS = 256
# Values a block of columns must hold before its quantization is split over threads (a thread pool per call
# costs more than quantizing a few rows of one block).
PARALLEL_VALUES = 1 << 18
# Roles rounded plainly unless GptqOptions.every_role. ffn_down reads the FFN's hidden width (8960 columns on
# Qwen2.5-Coder-1.5B against 1536 for every other weight): compensating it too took 2.9x the time and 3x the memory
# there for no measurable gain; 3-9% lower KLD on SmolLM2-135M for 1.25x (docs/results.md).
WIDE_ROLES = frozenset({"ffn_down"})
# 512-token chunks of calibration text by default. Every weight gains from more text: Qwen2.5-Coder-1.5B at Q4_K_M's
# size, held-out KLD 0.0124 / 0.0100 (wiki / tiny) on 32 chunks against 0.0138 / 0.0105 on 16, for 1.6x the
# feedback's time (614 s against 388 s); SmolLM2-135M 0.0288 on 32 against 0.0336 on 8 (docs/results.md).
GPTQ_CHUNKS = 32
# Types rounded a column at a time on llama.cpp's grid (gptq.compensate_columns), their codes then packed into the
# block's bytes (kernels.pack_codes). Qwen2.5-Coder-1.5B's attn_output at Q6_K / Q4_K / IQ4_XS: held-out output error
# 0.58-0.69 of plain rounding's with the block feedback -> 0.50-0.59 (docs/results.md). Q4_0..Q5_1 (and IQ4_NL,
# their kin) keep the block feedback: by column they turned one held-out token of SmolLM2-135M from a near miss into a
# wrong answer, and a prompt into garbage on 32 chunks of text.
COLUMN_TYPES = frozenset({QuantType.Q8_0, QuantType.Q6_K, QuantType.Q5_K, QuantType.Q4_K, QuantType.Q3_K,
                          QuantType.Q2_K, QuantType.IQ4_XS})


@dataclass(frozen=True)
class GptqOptions:
    """The calibration text and how much of it (512-token chunks) builds the input matrices; ``every_role``
    compensates the WIDE_ROLES too."""

    text: str
    chunks: int = GPTQ_CHUNKS
    ctx: int = 512
    every_role: bool = False
    block_search: bool = False  # Q4_1 / Q5_1 / Q4_K / Q5_K blocks searched (realize/rounding.py), else llama.cpp's

    @property
    def plain_roles(self) -> frozenset[str]:
        """Roles rounded without feedback."""
        return frozenset() if self.every_role else WIDE_ROLES

    def __post_init__(self) -> None:
        if self.chunks < 1 or not 1 <= self.ctx <= 512:
            raise ValueError(f"gptq: chunks ({self.chunks}) must be positive and ctx ({self.ctx}) in 1..512")


@dataclass(frozen=True)
class Exact:
    """A column-rounded weight's bytes in the side file: where they start, how many, and their type."""

    offset: int
    size: int
    qtype: QuantType


@dataclass(frozen=True)
class Compensated:
    """Per weight, the output error on the calibration text (of SAMPLE_ROWS rows) quantized as is and after
    compensation; the column-rounded weights' bytes, in ``side``."""

    plain: dict[str, float]
    compensated: dict[str, float]
    opts: GptqOptions
    text_chunks: int
    seconds: float = 0.0
    exact: dict[str, Exact] = field(default_factory=dict)
    side: Path | None = None

    @property
    def ratio(self) -> float:
        return sum(self.compensated.values()) / max(sum(self.plain.values()), 1e-30)

    def summary(self) -> dict[str, float | int | list[str]]:
        """What the plan records: the chunks asked for and those the text held, the roles left plain and the summed
        output error after / before."""
        return {"chunks": self.opts.chunks, "text_chunks": self.text_chunks, "ctx": self.opts.ctx,
                "weights": len(self.compensated),
                "plain_roles": sorted(self.opts.plain_roles), "output_error_ratio": round(self.ratio, 4)}


@contextmanager
def compensated_source(source: Path, out: Path, plan: Plan, imatrix: Imatrix | None, opts: GptqOptions | None,
                       progress: bool = True) -> Iterator[tuple[Path, Compensated | None]]:
    """The file to quantize: ``source`` itself without ``opts``, else a compensated copy beside ``out``,
    removed on exit whatever happens."""
    if opts is None:
        yield source, None
        return
    check_room_for_copy(source, out, plan, "--gptq", outputs=2)
    copy, side = temp_beside(out), temp_beside(out)
    try:
        t0 = time.perf_counter()
        done = write_compensated(source, copy, side, plan, imatrix, opts, progress)
        done = replace(done, seconds=time.perf_counter() - t0)
        logger.info("gptq: %d weights; their output error on the calibration text is %.3fx plain rounding's",
                    len(done.compensated), done.ratio)
        yield copy, done
    finally:
        copy.unlink(missing_ok=True)
        side.unlink(missing_ok=True)


def check_room_for_copy(source: Path, out: Path, plan: Plan, flag: str, outputs: int = 1) -> None:
    """Raises: UsageError: ``out``'s folder cannot hold a copy of ``source`` and ``outputs`` times the output
    besides (--gptq: the column-rounded weights' bytes too)."""
    free = shutil.disk_usage(out.parent).free
    if free < source.stat().st_size + outputs * plan.total_bytes + (16 << 20):
        raise UsageError(f"{out.parent}: {free / 1e6:.0f} MB free; {flag} needs room for a copy of {source.name} "
                         f"({source.stat().st_size / 1e6:.0f} MB) and {outputs} x the output "
                         f"({plan.total_bytes / 1e6:.0f} MB)")


def compensable(e: PlanEntry, tied: bool, plain_roles: frozenset[str]) -> bool:
    """Quantized 2-D weights a matrix multiplication reads, but for ``plain_roles``: token_embd only when it is the
    output head too."""
    head = tied or e.name != "token_embd.weight"
    return e.quantized and len(e.shape) == 2 and head and e.qtype not in FLOAT_TYPES and e.role not in plain_roles


def write_compensated(source: Path, dest: Path, side: Path, plan: Plan, imatrix: Imatrix | None, opts: GptqOptions,
                      progress: bool = True) -> Compensated:
    """Copy ``source`` to ``dest`` and overwrite each compensable weight with its compensated values; the
    column-rounded weights' bytes go to ``side`` (both temporary files the caller removes).

    Raises:
        InputError: a planned weight is not in the source as F32/F16/BF16, or never multiplied on the text.
    """
    shutil.copyfile(source, dest)
    plain: dict[str, float] = {}
    done: dict[str, float] = {}
    exact: dict[str, Exact] = {}
    text_chunks = 0
    tied = tied_embeddings(e.name for e in plan.entries)
    todo = [e for e in plan.quantized() if compensable(e, tied, opts.plain_roles)]
    with writable_tensors(dest) as tensors, side.open("wb") as side_file:
        infos = {name: info for name, (info, _) in tensors.items()}
        for e, inputs in _with_inputs(source, todo, infos, imatrix, opts, progress):
            info, raw = tensors[e.name]
            stored = info.qtype
            w = to_float32(raw, stored).reshape(info.nrows, info.ncols)

            def store(x: np.ndarray, stored: QuantType = stored) -> np.ndarray:
                return to_float32(from_float32(x, stored), stored).reshape(x.shape)

            wc, packed = inputs.compensate(w, e.qtype, None if stored == QuantType.F32 else store)
            raw[:] = from_float32(wc, stored)
            if packed is not None:
                exact[e.name] = Exact(side_file.tell(), packed.nbytes, e.qtype)
                side_file.write(packed.tobytes())
            # The output error of a sample of rows (rows are independent given H), which spares two more
            # whole-tensor quantizations and products with H per weight.
            sample = evenly_spaced_rows(w.shape[0], SAMPLE_ROWS)
            plain[e.name], done[e.name] = inputs.errors(w[sample], wc[sample], e.qtype,
                                                        None if packed is None else packed[sample])
            text_chunks = inputs.chunks
    return Compensated(plain, done, opts, text_chunks, exact=exact, side=side)


def write_exact(quantized: Path, done: Compensated) -> None:
    """Put the column-rounded weights' own bytes into llama.cpp's file in place of what it wrote for them (its scale
    search finds another grid for a tenth of Q4_K's values, a fifth of Q5_K's).

    Raises:
        EngineError: llama.cpp wrote such a weight in another type or size than the feedback rounded it to.
    """
    if not done.exact or done.side is None:
        return
    side = np.memmap(done.side, dtype=np.uint8, mode="r")
    try:
        with writable_tensors(quantized) as tensors:
            for name, ex in done.exact.items():
                info, raw = tensors[name]
                if info.qtype != ex.qtype or raw.size != ex.size:
                    raise EngineError(f"{name!r}: llama.cpp wrote {info.qtype.name} ({raw.size} bytes) where the "
                                      f"feedback rounded {ex.qtype.name} ({ex.size} bytes)")
                raw[:] = side[ex.offset:ex.offset + ex.size]
    finally:
        del side


def passes(entries: Sequence[PlanEntry], tensors: Mapping[str, TensorInfo]) -> Iterator[list[PlanEntry]]:
    """The weights in block order, a pass at a time, each pass's input matrices within PASS_BYTES."""
    group: list[PlanEntry] = []
    held = 0
    for e in sorted(entries, key=lambda e: (e.layer is None, e.layer or 0, e.name)):
        info = tensors.get(e.name)
        if info is None or info.qtype not in FLOAT_TYPES:
            raise InputError(f"{e.name!r}: --gptq needs the weight in the source as F32, F16 or BF16")
        need = info.ncols ** 2 * 4
        if group and held + need > PASS_BYTES:
            yield group
            group, held = [], 0
        group.append(e)
        held += need
    if group:
        yield group


class _Inputs:
    """One weight's inputs on the calibration text: ``H`` (over ``chunks`` chunks), its feedback factor (shared by
    the weights that read the same node) and what the imatrix says about its columns."""

    def __init__(self, h: np.ndarray, u: np.ndarray, steps: dict[int, list[np.ndarray]], im: np.ndarray | None,
                 chunks: int, block_search: bool = False) -> None:
        self.h, self._u, self._steps, self._im, self.chunks = h, u, steps, im, chunks
        self._search = block_search
        self._threads = cpu_count()

    def steps(self, block: int) -> list[np.ndarray]:
        if block not in self._steps:
            self._steps[block] = feedback_steps(self._u, block)
        return self._steps[block]

    def compensate(self, w: np.ndarray, qtype: QuantType, store: Callable[[np.ndarray], np.ndarray] | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """The weight to hand llama.cpp, and for COLUMN_TYPES, rounded column by column, its bytes (rows, row
        bytes); the other types are compensated a block at a time."""
        block = block_size(qtype)
        blocks: list[np.ndarray] = []
        if qtype not in COLUMN_TYPES:
            exact = self._search and qtype in SEARCHED  # the search's bytes: llama.cpp would round the copy its way
            wc = compensate(w, self.steps(block), block, self.roundtrip(qtype, blocks if exact else None), store)
            return wc, (np.concatenate(blocks, axis=1) if exact else None)
        rounded, codes = compensate_columns(w, self._u, block, self.grid(qtype, blocks), store)
        return rounded, kernels.pack_codes(np.concatenate(blocks, axis=1), qtype, codes)

    def grid(self, qtype: QuantType, blocks: list[np.ndarray]) -> Grid:
        """llama.cpp's rounding of each block, its bytes appended to ``blocks``."""
        codes = kernels.code_bits(qtype).codes

        def g(block: np.ndarray, cols: slice) -> Lattice:
            raw = self._quantized(block, cols, qtype)
            blocks.append(raw)
            step, zero, levels = kernels.block_lattice(raw, qtype, block.shape[1])
            return Lattice(step, zero, codes, levels)
        return g

    def roundtrip(self, qtype: QuantType, blocks: list[np.ndarray] | None) -> Roundtrip:
        """The rounding of each block, its bytes appended to ``blocks`` (None: not kept)."""
        def rt(block: np.ndarray, cols: slice) -> np.ndarray:
            raw = self._quantized(block, cols, qtype)
            if blocks is not None:
                blocks.append(raw)
            return kernels.dequantize_rows(raw, qtype, block.shape[1])
        return rt

    def _quantized(self, block: np.ndarray, cols: slice, qtype: QuantType) -> np.ndarray:
        """The blocks for some columns of the weight, with those columns' imatrix: llama.cpp's, bettered by the
        search of realize/rounding.py for its SEARCHED types."""
        sub = None if self._im is None else self._im[cols]
        threads = self._threads if block.size >= PARALLEL_VALUES else 1
        block = np.ascontiguousarray(block)
        if self._search:
            return quantize_searched(block, qtype, sub, threads)
        return kernels.quantize_rows(block, qtype, sub, threads)

    def errors(self, w: np.ndarray, wc: np.ndarray, qtype: QuantType, packed: np.ndarray | None
               ) -> tuple[float, float]:
        """Output errors of rounding ``w`` as it is and of rounding ``wc`` (whole rows, as llama.cpp will), or of
        the bytes the file will hold (``packed``, the same rows) where they were rounded here."""
        whole = None if self._im is None else self._im[None, :]
        w, wc = np.ascontiguousarray(w), np.ascontiguousarray(wc)
        held = quant_roundtrip(wc, qtype, whole, threads=self._threads) if packed is None else \
            kernels.dequantize_rows(packed, qtype, w.shape[1])
        return output_error(w, quant_roundtrip(w, qtype, whole, threads=self._threads), self.h), \
            output_error(w, held, self.h)


def _with_inputs(source: Path, entries: Sequence[PlanEntry], tensors: Mapping[str, TensorInfo],
                 imatrix: Imatrix | None, opts: GptqOptions, progress: bool) -> Iterator[tuple[PlanEntry, _Inputs]]:
    """Each weight with its inputs, a pass of llama.cpp over the text per PASS_BYTES of input matrices."""
    from tqdm import tqdm

    from ggufmix.engine.covariance import collect_covariances

    bar = tqdm(total=len(entries), desc="gptq", unit="weight", disable=not progress, leave=False)
    for group in passes(entries, tensors):
        cov = collect_covariances(source, opts.text, [e.name for e in group], n_ctx=opts.ctx, n_chunks=opts.chunks)
        factors: dict[str, tuple[np.ndarray, dict[int, list[np.ndarray]]]] = {}
        for e in group:
            h = cov.of(e.name)
            node = cov.input_of[e.name]
            if node not in factors:
                factors[node] = (inverse_factor(h), {})
            u, steps = factors[node]
            im = imatrix.values(e.name) if imatrix is not None and e.name in imatrix.names else None
            yield e, _Inputs(h, u, steps, im, cov.chunks, opts.block_search)
            bar.update()
    bar.close()


def evenly_spaced_rows(n: int, k: int) -> np.ndarray:
    """``k`` evenly spaced row indices out of ``n`` (all ``n`` when ``k >= n``): a sample of a weight's rows."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).astype(int))
