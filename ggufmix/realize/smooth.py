"""Smoothing the output head's input for llama.cpp's CPU backend: the same logits, less rounding of the input.

The CPU backend rounds a K or IQ weight's input to 8 bits in blocks of 256 values (Q8_K, ggml-cpu.c
``vec_dot_type``) before the dot products. The final norm's output has a few channels tens of times louder than
the rest, and every block that holds one rounds the others coarsely: in Qwen2.5-Coder-1.5B's file at Q5_K_M's size
the rounding of the Q6_K head's input cost 0.001 of mean KLD, a fifth of the file's (docs/results.md). Dividing
channel ``j`` of the head's input by ``s_j`` (folded into output_norm's weight) and multiplying the head's column
``j`` by ``s_j`` gives the same logits in exact arithmetic and moves noise from the input's rounding to the
weights'. ``s_j = max(rms_j / median(rms), 1) ** alpha``, with ``alpha`` in ALPHAS chosen by the head's output
error on calibration rows, input and weights rounded as the CPU backend and the planned type round them
(``alpha`` 0 leaves the source as it is). Only an untied head: a tied one is also the token embedding.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ggufmix.artifacts import temp_beside
from ggufmix.engine import kernels
from ggufmix.engine.activations import cpu_count
from ggufmix.engine.covariance import collect_inputs
from ggufmix.engine.oracle import from_float32, quant_roundtrip, to_float32
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource
from ggufmix.plan.plan import Plan
from ggufmix.realize.compensate import check_room_for_copy
from ggufmix.types import FLOAT_TYPES, QuantType, cpu_input_type

logger = logging.getLogger(__name__)

HEAD, NORM, BIAS = "output.weight", "output_norm.weight", "output_norm.bias"
ALPHAS = (0.0, 0.25, 0.5, 0.75)
HEAD_ROWS = 1024  # head rows (vocabulary entries, evenly spaced) whose output error picks alpha
PATCH_ROWS = 8192  # head rows quantized at once by patch_quantized (an 8192-wide head: 256 MB of float32)

Rounding = Callable[[np.ndarray, QuantType, np.ndarray | None], np.ndarray]  # (rows, type, column weights) -> rows


@dataclass(frozen=True)
class SmoothOptions:
    """The calibration text and its 512-token chunks whose head inputs pick ``alpha``."""

    text: str
    chunks: int = 4
    ctx: int = 512


@dataclass(frozen=True)
class HeadSmoothing:
    """The chosen ``alpha``, its channel scales and the head's output error (over the source's) at each alpha."""

    alpha: float
    scales: np.ndarray
    errors: dict[float, float]
    tokens: int
    seconds: float = 0.0  # choosing and writing the copy

    def summary(self) -> dict[str, object]:
        return {"alpha": self.alpha, "max_scale": round(float(self.scales.max()), 3), "tokens": self.tokens,
                "relative_error": {str(a): round(e, 6) for a, e in self.errors.items()}}


def channel_scales(rms: np.ndarray, alpha: float) -> np.ndarray:
    """``max(rms / median(rms), 1) ** alpha``: only the channels louder than the median shrink."""
    med = float(np.median(rms))
    if med <= 0 or alpha == 0:
        return np.ones_like(rms, dtype=np.float32)
    return (np.maximum(rms / med, 1.0) ** alpha).astype(np.float32)


def head_error(x: np.ndarray, w: np.ndarray, scales: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None,
               round_input: Callable[[np.ndarray, QuantType], np.ndarray], round_weights: Rounding) -> float:
    """Mean squared error of the head's outputs, input and weights rounded as on the CPU, over the source's output
    power: ``x`` (tokens, cols) the head's inputs, ``w`` (rows, cols) some of its rows."""
    xs, ws = x / scales, w * scales
    im = None if imatrix is None else imatrix / scales**2
    y = x @ w.T
    yq = round_input(xs, cpu_input_type(qtype)) @ round_weights(ws, qtype, im).T
    return float(np.mean((yq - y) ** 2) / max(float(np.mean(y**2)), 1e-30))


def choose(x: np.ndarray, w: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None,
           round_input: Callable[[np.ndarray, QuantType], np.ndarray], round_weights: Rounding) -> HeadSmoothing:
    """The alpha of ALPHAS whose scales leave the least head output error."""
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=0))
    errors = {a: head_error(x, w, channel_scales(rms, a), qtype, imatrix, round_input, round_weights) for a in ALPHAS}
    best = min(errors, key=lambda a: (errors[a], a))
    return HeadSmoothing(best, channel_scales(rms, best), errors, len(x))


def choose_smoothing(src: GGUFSource, plan: Plan, imatrix: Imatrix | None, opts: SmoothOptions | None,
                     ) -> HeadSmoothing | None:
    """The head's scales for ``plan``: None without ``opts``, for a tied or float head or a source without a float
    head and final norm; alpha 0 where no scaling lowers the head's error (the source is then used as it is)."""
    head = next((e for e in plan.entries if e.name == HEAD), None)
    if opts is None:
        return None
    if head is None or head.qtype in FLOAT_TYPES:
        logger.info("--smooth-head: no untied quantized %s in the plan; the source is used as it is", HEAD)
        return None
    if any(n not in src.tensors or src.tensors[n].qtype not in FLOAT_TYPES for n in (HEAD, NORM)):
        logger.info("--smooth-head: %s has no float %s and %s to scale (a requantized source, another norm); the "
                    "source is used as it is", src.path.name, HEAD, NORM)
        return None
    t0 = time.perf_counter()
    found = _choose_for(src, head.qtype, imatrix, opts)
    logger.info("--smooth-head: alpha %.2f (head output error %s)", found.alpha,
                ", ".join(f"{a}: {e:.2e}" for a, e in found.errors.items()))
    return replace(found, seconds=time.perf_counter() - t0)


@contextmanager
def smoothed_source(src: GGUFSource, out: Path, plan: Plan, imatrix: Imatrix | None, head: HeadSmoothing | None,
                    ) -> Iterator[tuple[Path, Imatrix | None]]:
    """The file to quantize and its imatrix: the source itself where ``head`` scales nothing, else a smoothed copy
    beside ``out``, removed on exit whatever happens (what ``--gptq`` compensates; without it, patch_quantized
    smooths the quantized file instead, no copy)."""
    if head is None or head.alpha == 0:
        yield src.path, imatrix
        return
    t0 = time.perf_counter()
    check_room_for_copy(src.path, out, plan, "--smooth-head")
    copy = temp_beside(out)
    try:
        write_smoothed(src.path, copy, head.scales)
        logger.info("--smooth-head: smoothed copy written in %.1f s", time.perf_counter() - t0)
        yield copy, scaled_imatrix(imatrix, head.scales)
    finally:
        copy.unlink(missing_ok=True)


def _choose_for(src: GGUFSource, qtype: QuantType, imatrix: Imatrix | None, opts: SmoothOptions) -> HeadSmoothing:
    x = collect_inputs(src.path, opts.text, HEAD, n_ctx=opts.ctx, n_chunks=opts.chunks)
    rows = src.tensors[HEAD].nrows
    w = src.rows(HEAD, np.unique(np.linspace(0, rows - 1, min(rows, HEAD_ROWS)).astype(int)))
    im = imatrix.values(HEAD) if imatrix is not None and HEAD in imatrix else None

    def round_weights(rows: np.ndarray, q: QuantType, col: np.ndarray | None) -> np.ndarray:
        return quant_roundtrip(rows, q, None if col is None else col[None, :], None, cpu_count())
    return choose(x, w, qtype, im, kernels.reference_roundtrip, round_weights)


def write_smoothed(source: Path, dest: Path, scales: np.ndarray) -> None:
    """Copy ``source`` to ``dest`` with output_norm's weight (and bias) divided and the head's columns multiplied
    by ``scales``."""
    from gguf import GGUFReader

    shutil.copyfile(source, dest)
    reader = GGUFReader(dest, "r+")
    for t in reader.tensors:
        if t.name in (HEAD, NORM, BIAS):
            raw = np.asarray(t.data).reshape(-1).view(np.uint8)
            raw[:] = _scaled(t.name, raw, QuantType(int(t.tensor_type)), scales)
    reader.data.flush()


def patch_quantized(quantized: Path, src: GGUFSource, head: HeadSmoothing, imatrix: Imatrix | None,
                    threads: int = 0) -> None:
    """Smooth an already quantized file in place: output_norm (float) scaled as write_smoothed scales it, and the
    head quantized again, at the type it has there, from the source's rows as the smoothed copy would hold them,
    with the imatrix scaled_imatrix gives: the bytes llama.cpp writes from that copy, without the copy."""
    from gguf import GGUFReader

    reader = GGUFReader(quantized, "r+")
    im = scaled_imatrix(imatrix, head.scales)
    col = im.values(HEAD) if im is not None and HEAD in im else None
    stored = src.tensors[HEAD].qtype
    for t in reader.tensors:
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)
        if t.name in (NORM, BIAS):
            raw[:] = _scaled(t.name, raw, QuantType(int(t.tensor_type)), head.scales)
        elif t.name == HEAD:
            qtype, n = QuantType(int(t.tensor_type)), src.tensors[HEAD].nrows
            out = raw.reshape(n, -1)
            for r0 in range(0, n, PATCH_ROWS):
                rows = to_float32(from_float32(src.rows(HEAD, np.arange(r0, min(n, r0 + PATCH_ROWS))) * head.scales,
                                               stored), stored).reshape(-1, head.scales.size)
                out[r0:r0 + len(rows)] = kernels.quantize_rows(rows, qtype, col, threads or cpu_count())
    reader.data.flush()


def _scaled(name: str, raw: np.ndarray, stored: QuantType, scales: np.ndarray) -> np.ndarray:
    """A float tensor's bytes with the head's columns multiplied, or the norm's channels divided, by ``scales``."""
    values = to_float32(raw, stored).reshape(-1, scales.size)
    return from_float32((values * scales if name == HEAD else values / scales).reshape(-1), stored)


def scaled_imatrix(imatrix: Imatrix | None, scales: np.ndarray) -> Imatrix | None:
    """The imatrix for the smoothed copy: the head's columns' mean squares divided by ``scales ** 2``."""
    if imatrix is None or HEAD not in imatrix:
        return imatrix
    sums = dict(imatrix.sums)
    sums[HEAD] = (np.asarray(sums[HEAD]).reshape(-1, scales.size) / scales**2).reshape(-1)
    return replace(imatrix, sums=sums)
