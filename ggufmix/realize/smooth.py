"""Smoothing weights' inputs for llama.cpp's CPU backend: the same function, less rounding of the inputs.

The CPU backend rounds a K or IQ weight's input to 8 bits in blocks of 256 values (Q8_K, ggml-cpu.c
``vec_dot_type``) before the dot products, and every block that holds a loud channel rounds the others coarsely.
Some inputs can be turned down exactly: the output head's (the final norm's output: a few channels tens of times
louder than the rest; folded into output_norm's weight), each block's attention and FFN inputs (the outputs of
attn_norm and ffn_norm, read by q/k/v and by gate/up alone: folded into the norm's weight) and each gated FFN's
ffn_down's (``act(gate(x)) * up(x)``: folded into ffn_up's rows). Channel ``j`` of the input is divided by ``s_j``
there and the columns ``j`` of the weights that read it multiplied by ``s_j``: the same output in exact arithmetic,
and the loud columns now set the weight blocks' scales. ``s_j = max(rms_j / median(rms), 1) ** alpha``, ``alpha``
chosen by the weights' output error on calibration rows, input and weights rounded as the CPU backend and the
planned type round them (0 leaves it as it is): for the head on its own, for every block at once for each kind of
block weight (attention inputs, FFN inputs, ffn_down's: KIND_GAIN, on calibration rows the scales were not made
from). A tied head is also the token embedding: left alone.

What the rounding costs: in Qwen2.5-Coder-1.5B's file at Q5_K_M's size the head's input 0.001 of mean KLD, a fifth
of the file's; in SmolLM2-135M's ffn_down's 0.0027, an eighth. The blocks' inputs and ffn_down's, smoothed:
SmolLM2-135M's file at Q4_K_M's size 0.0416 -> 0.0366; Qwen2.5-Coder-1.5B's are left alone (their output error
drops too little on held-out rows; docs/results.md).
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ggufmix.artifacts import temp_beside
from ggufmix.engine import kernels
from ggufmix.engine.activations import cpu_count
from ggufmix.engine.covariance import collect_inputs
from ggufmix.engine.oracle import from_float32, quant_roundtrip, to_float32
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource, writable_tensors
from ggufmix.plan.plan import Plan
from ggufmix.realize.compensate import check_room_for_copy, evenly_spaced_rows
from ggufmix.realize.rounding import quantize_searched
from ggufmix.types import FLOAT_TYPES, QuantType, cpu_input_type

logger = logging.getLogger(__name__)

HEAD, NORM, BIAS = "output.weight", "output_norm.weight", "output_norm.bias"
# Architectures whose dense FFN is llama.cpp's build_ffn(..., LLM_FFN_PAR) with SILU or GELU and no clamp
# (llama-graph.cpp; src/models/<arch>.cpp): act(ffn_gate(x)) * ffn_up(x), so dividing ffn_up's row j (and its bias)
# divides ffn_down's input channel j and nothing else. Their blocks are pre-norm: attn_norm's output is read by
# q/k/v alone and ffn_norm's by gate/up alone (and a MoE router: such blocks are skipped).
GATED_FFN_ARCHS = frozenset({
    "llama",     # Llama 2/3, SmolLM2, Mistral
    "qwen2", "qwen3",
    "gemma", "gemma2", "gemma3",
    "granite", "mistral3", "olmo2", "smollm3", "exaone",
})
# A block's input read by these weights (in the block), made by this norm: (kind, weights, norm).
BLOCK_INPUTS = (
    ("attn_in", ("attn_q", "attn_k", "attn_v"), "attn_norm"),
    ("attn_in", ("attn_qkv",), "attn_norm"),
    ("ffn_in", ("ffn_gate", "ffn_up"), "ffn_norm"),
)
ALPHAS = (0.0, 0.25, 0.5, 0.75)
# ffn_down's: its output error chose 0.5 in 29 of SmolLM2-135M's 30 blocks at Q5_K_M's size, where
# 0.5 everywhere lowered the file's KLD less than 0.25 everywhere (-0.00102 against -0.00187 on wiki; docs/results.md).
FFN_ALPHAS = (0.0, 0.25)
# The blocks' weights: alpha 0.25 in every block for a kind (attention, FFN, ffn_down) whose blocks' output error it
# lowers by KIND_GAIN on average, measured on rows the scales were not made from, else none. The plans of
# SmolLM2-135M's bench at Q5_K_M's size: attention 0.37, FFN 0.063 (the file's KLD -0.0031 +- 0.0009 with both,
# -0.0008 with attention's alone); Qwen2.5-Coder-1.5B at Q5_K: attention -0.008, FFN 0.02, and both at 0.25 raised
# stock Q5_K_M's KLD (+0.0007 +- 0.0004). The per-block choice took 0.5 where 0.25 did better end to end (as for
# ffn_down): hence one alpha. ffn_down's gain shrinks on held-out rows where its loud channels move from token to token.
# As build measures it (4 chunks, 2 held out): Qwen 0.098 at Q5_K_M's size (its file +0.0002 +- 0.0002 on tiny
# smoothed), 0.046 at Q4_K_M's; SmolLM2 0.116 / 0.157 / 0.250 / 0.178 at the four sizes (the file -0.0015 +- 0.0016,
# -0.0022 +- 0.0004, -0.0014 +- 0.0005 on wiki at Q2_K's, Q4_K_M's, Q5_K_M's): hence 15% there.
NORM_ALPHAS = (0.0, 0.25)
KIND_GAIN = {"attn_in": 0.05, "ffn_in": 0.05, "ffn_down": 0.15}
KIND_ALPHAS = {"head": ALPHAS, "ffn_down": FFN_ALPHAS, "attn_in": NORM_ALPHAS, "ffn_in": NORM_ALPHAS}
WEIGHT_ROWS = 1024  # the head's rows (evenly spaced) whose output error picks its alpha
# A block weight's: its kind is on or off by the mean over every block, which 256 rows give as 1024 did (SmolLM2-135M
# at Q4_K_M's size: attention 0.361 / 0.362, FFN 0.084 / 0.082, ffn_down 0.308 / 0.310) in half the time.
BLOCK_WEIGHT_ROWS = 256
FFN_INPUT_ROWS = 512  # a block input's rows kept for that (every n-th token: 28 of Qwen's 8960-wide ones = 0.5 GB)
FFN_INPUT_BYTES = 1 << 30  # at most this much of them in all (a 70B model's 80 x 28672-wide inputs: 112 rows each)
PATCH_ROWS = 8192  # rows quantized at once by patch_quantized (an 8192-wide weight: 256 MB of float32)

Rounding = Callable[[np.ndarray, QuantType, np.ndarray | None], np.ndarray]  # (rows, type, column weights) -> rows


@dataclass(frozen=True)
class SmoothOptions:
    """The calibration text and its 512-token chunks whose weight inputs pick each ``alpha``."""

    text: str
    chunks: int = 4
    ctx: int = 512
    ffn: bool = True  # ffn_down's inputs too (--no-smooth-ffn: not)


@dataclass(frozen=True)
class SmoothGroup:
    """Weights that read one input (their columns multiplied) and the tensors that make it (divided): the final norm
    and its bias for the head, a block's norm for its attention or FFN input, ffn_up and its bias for ffn_down."""

    kind: str  # a key of KIND_ALPHAS
    weights: tuple[str, ...]
    partners: tuple[str, ...]


@dataclass(frozen=True)
class ChannelScales:
    """One weight's chosen ``alpha``, its input channels' scales and its output error (over the source's) at each
    alpha."""

    alpha: float
    scales: np.ndarray
    errors: dict[float, float]
    tokens: int

    def summary(self) -> dict[str, object]:
        return {"alpha": self.alpha, "max_scale": round(float(self.scales.max()), 3), "tokens": self.tokens,
                "relative_error": {str(a): round(e, 6) for a, e in self.errors.items()}}


@dataclass(frozen=True)
class Smoothing:
    """What a build scales: each group's choice (keyed by its first weight) and the groups."""

    chosen: Mapping[str, ChannelScales]
    groups: Mapping[str, SmoothGroup]
    seconds: float = 0.0
    ffn: bool = False  # whether ffn_down's inputs were candidates (not with --no-smooth-ffn)

    @property
    def active(self) -> bool:
        return any(c.alpha > 0 for c in self.chosen.values())

    def scaling(self, name: str) -> list[tuple[bool, np.ndarray]]:
        """(True: columns multiplied, False: rows divided; the scales) for each scaling of a tensor (ffn_up: its
        columns for its input, its rows for ffn_down's), empty where nothing changes it."""
        return [(name in g.weights, self.chosen[k].scales) for k, g in self.groups.items()
                if self.chosen[k].alpha > 0 and (name in g.weights or name in g.partners)]

    def summary(self) -> dict[str, object]:
        def alphas(*kinds: str) -> dict[str, float]:
            return {k: c.alpha for k, c in self.chosen.items() if self.groups[k].kind in kinds}
        return {"head": self.chosen[HEAD].summary() if HEAD in self.chosen else None,
                "ffn_down_alpha": alphas("ffn_down"), "block_input_alpha": alphas("attn_in", "ffn_in"),
                "alphas": alphas_offered(self.ffn), "kind_gain": KIND_GAIN, "seconds": round(self.seconds, 1)}


def alphas_offered(ffn: bool) -> dict[str, list[float]]:
    """The alphas each kind of weight chose from (a plan records them: bench rebuilds files smoothed otherwise)."""
    return {"head": list(ALPHAS), "ffn_down": list(FFN_ALPHAS) if ffn else [], "block_inputs": list(NORM_ALPHAS)}


def channel_scales(rms: np.ndarray, alpha: float) -> np.ndarray:
    """``max(rms / median(rms), 1) ** alpha``: only the channels louder than the median shrink."""
    med = float(np.median(rms))
    if med <= 0 or alpha == 0:
        return np.ones_like(rms, dtype=np.float32)
    return (np.maximum(rms / med, 1.0) ** alpha).astype(np.float32)


def output_error(x: np.ndarray, w: np.ndarray, scales: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None,
                 round_input: Callable[[np.ndarray, QuantType], np.ndarray], round_weights: Rounding) -> float:
    """Mean squared error of a weight's outputs, input and weights rounded as on the CPU, over the source's output
    power: ``x`` (tokens, cols) its inputs, ``w`` (rows, cols) some of its rows."""
    xs, ws = x / scales, w * scales
    im = None if imatrix is None else imatrix / scales**2
    y = x @ w.T
    yq = round_input(xs, cpu_input_type(qtype)) @ round_weights(ws, qtype, im).T
    return float(np.mean((yq - y) ** 2) / max(float(np.mean(y**2)), 1e-30))


Member = tuple[np.ndarray, QuantType, np.ndarray | None]  # a weight's sampled rows, planned type, imatrix column


def choose(x: np.ndarray, w: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None,
           round_input: Callable[[np.ndarray, QuantType], np.ndarray], round_weights: Rounding,
           alphas: tuple[float, ...] = ALPHAS) -> ChannelScales:
    """The alpha of ``alphas`` whose scales leave the least output error."""
    errors = group_errors(x, [(w, qtype, imatrix)], round_input, round_weights, alphas)
    return at_alpha(x, min(errors, key=lambda a: (errors[a], a)), errors)


def group_errors(x: np.ndarray, members: Sequence[Member], round_input: Callable[[np.ndarray, QuantType], np.ndarray],
                 round_weights: Rounding, alphas: tuple[float, ...], fit: np.ndarray | None = None,
                 ) -> dict[float, float]:
    """Alpha -> the mean over the weights reading ``x`` of their output errors at that alpha's scales (made from
    ``fit``'s rows where given: errors on rows the scales did not see)."""
    rms = input_rms(x if fit is None else fit)
    return {a: float(np.mean([output_error(x, w, channel_scales(rms, a), q, im, round_input, round_weights)
                              for w, q, im in members])) for a in alphas}


def input_rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=0))


def at_alpha(x: np.ndarray, alpha: float, errors: dict[float, float]) -> ChannelScales:
    return ChannelScales(alpha, channel_scales(input_rms(x), alpha), errors, len(x))


def gain(errors: dict[float, float], alpha: float) -> float:
    """The share of the output error at alpha 0 that ``alpha`` removes."""
    return 1 - errors[alpha] / errors[0.0] if errors[0.0] > 0 else 0.0


def smoothable(src: GGUFSource, plan: Plan, ffn: bool = False) -> dict[str, SmoothGroup]:
    """The groups of weights whose input can be scaled exactly, keyed by their first weight: an untied quantized head
    over a float final norm; in GATED_FFN_ARCHS each block's attention and FFN inputs over a float norm, and with
    ``ffn`` each quantized ffn_down over a float ffn_up. Float tensors only, at least one weight of a group planned
    quantized: a requantized source is left as it is."""
    planned = {e.name: e.qtype for e in plan.entries}

    def floats(*names: str) -> bool:
        return all(n in src.tensors and src.tensors[n].qtype in FLOAT_TYPES for n in names)

    def group(kind: str, weights: tuple[str, ...], partner: str, bias: str) -> SmoothGroup | None:
        partners = (partner, bias) if bias in src.tensors else (partner,)
        quantized = any(planned.get(w, QuantType.F16) not in FLOAT_TYPES for w in weights)
        return SmoothGroup(kind, weights, partners) if quantized and floats(*weights, *partners) else None
    found = {HEAD: group("head", (HEAD,), NORM, BIAS)}
    for blk in _blocks(src) if src.arch in GATED_FFN_ARCHS else ():
        for kind, roles, norm in BLOCK_INPUTS:
            moe = kind == "ffn_in" and f"{blk}.ffn_gate_inp.weight" in src.tensors  # the router reads it too
            weights = tuple(f"{blk}.{r}.weight" for r in roles)
            if not moe and weights[0] in src.tensors:
                found[weights[0]] = group(kind, weights, f"{blk}.{norm}.weight", f"{blk}.{norm}.bias")
        if ffn and f"{blk}.ffn_gate.weight" in src.tensors:
            down = f"{blk}.ffn_down.weight"
            found[down] = group("ffn_down", (down,), f"{blk}.ffn_up.weight", f"{blk}.ffn_up.bias")
    return {k: g for k, g in found.items() if g is not None}


def _blocks(src: GGUFSource) -> list[str]:
    """``blk.N`` of every block, in order."""
    return [f"blk.{i}" for i in sorted({int(n.split(".")[1]) for n in src.tensors if n.startswith("blk.")})]


def choose_smoothing(src: GGUFSource, plan: Plan, imatrix: Imatrix | None, opts: SmoothOptions | None,
                     ) -> Smoothing | None:
    """Each smoothable group's scales for ``plan`` (alpha 0 where no scaling lowers its error); None without
    ``opts`` or where nothing can be smoothed."""
    if opts is None:
        return None
    groups = smoothable(src, plan, opts.ffn)
    if not groups:
        logger.info("--smooth: %s has no untied quantized head or pre-norm block with float weights to scale; the "
                    "source is used as it is", src.path.name)
        return None
    t0 = time.perf_counter()
    every = _token_strides(src, [k for k in groups if k != HEAD], opts.chunks * opts.ctx)
    inputs = collect_inputs(src.path, opts.text, list(groups), n_ctx=opts.ctx, n_chunks=opts.chunks, every=every)
    planned = {e.name: e.qtype for e in plan.entries}
    errors = {k: _errors_for(src, g, planned, imatrix, inputs[k]) for k, g in groups.items()}
    on = _kinds_on(groups, errors)
    chosen = {k: at_alpha(inputs[k], _chosen_alpha(groups[k].kind, errors[k], on), errors[k]) for k in groups}
    found = Smoothing(chosen, groups, time.perf_counter() - t0, opts.ffn)
    logger.info("--smooth: %s in %.0f s", ", ".join(f"{k} alpha {c.alpha:g}" for k, c in chosen.items()
                                                    if c.alpha > 0) or "nothing scaled", found.seconds)
    return found


def _kinds_on(groups: Mapping[str, SmoothGroup], errors: Mapping[str, dict[float, float]]) -> set[str]:
    """The kinds of block weight (their inputs, ffn_down's) whose blocks lose KIND_GAIN of their output error at
    their kind's second alpha on average."""
    kinds = {g.kind for g in groups.values()} - {"head"}
    return {kind for kind in kinds if np.mean([gain(errors[k], KIND_ALPHAS[kind][1]) for k, g in groups.items()
                                               if g.kind == kind]) >= KIND_GAIN[kind]}


def _chosen_alpha(kind: str, errors: dict[float, float], kinds_on: set[str]) -> float:
    """The head: the alpha of least output error. A block weight: its kind's second alpha where the kind is on."""
    if kind == "head":
        return min(errors, key=lambda a: (errors[a], a))
    return KIND_ALPHAS[kind][1] if kind in kinds_on else 0.0


@contextmanager
def smoothed_source(src: GGUFSource, out: Path, plan: Plan, imatrix: Imatrix | None, smoothing: Smoothing | None,
                    ) -> Iterator[tuple[Path, Imatrix | None]]:
    """The file to quantize and its imatrix: the source itself where ``smoothing`` scales nothing, else a smoothed
    copy beside ``out``, removed on exit whatever happens (what ``--gptq`` compensates; without it, patch_quantized
    smooths the quantized file instead, no copy)."""
    if smoothing is None or not smoothing.active:
        yield src.path, imatrix
        return
    t0 = time.perf_counter()
    check_room_for_copy(src.path, out, plan, "--smooth")
    copy = temp_beside(out)
    try:
        write_smoothed(src.path, copy, smoothing)
        logger.info("--smooth: smoothed copy written in %.1f s", time.perf_counter() - t0)
        yield copy, scaled_imatrix(imatrix, smoothing)
    finally:
        copy.unlink(missing_ok=True)


def _token_strides(src: GGUFSource, keys: list[str], tokens: int) -> dict[str, int]:
    """Every how many tokens each block input keeps a row: FFN_INPUT_ROWS each, FFN_INPUT_BYTES in all."""
    width = sum(src.tensors[k].ncols for k in keys)
    rows = min(FFN_INPUT_ROWS, FFN_INPUT_BYTES // max(4 * width, 1))
    return {k: max(1, -(-tokens // max(rows, 1))) for k in keys}


def _errors_for(src: GGUFSource, group: SmoothGroup, planned: Mapping[str, QuantType], imatrix: Imatrix | None,
                x: np.ndarray) -> dict[float, float]:
    """The group's output errors at its kind's alphas, over its weights planned quantized."""
    members, sample = [], WEIGHT_ROWS if group.kind == "head" else BLOCK_WEIGHT_ROWS
    for weight in (w for w in group.weights if planned.get(w, QuantType.F16) not in FLOAT_TYPES):
        w = src.rows(weight, evenly_spaced_rows(src.tensors[weight].nrows, sample))
        members.append((w, planned[weight], imatrix.values(weight) if imatrix is not None and weight in imatrix
                        else None))

    def round_weights(rows: np.ndarray, q: QuantType, col: np.ndarray | None) -> np.ndarray:
        return quant_roundtrip(rows, q, None if col is None else col[None, :], None, cpu_count())
    fit, half = None, len(x) // 2
    if group.kind != "head" and half:  # a block weight's kind: scales from the first chunks, errors on the others
        x, fit = x[half:], x[:half]
    return group_errors(x, members, kernels.reference_roundtrip, round_weights, KIND_ALPHAS[group.kind], fit=fit)


def write_smoothed(source: Path, dest: Path, smoothing: Smoothing) -> None:
    """Copy ``source`` to ``dest`` with each smoothed weight's columns multiplied, and its partners divided, by the
    scales."""
    shutil.copyfile(source, dest)
    with writable_tensors(dest) as tensors:
        for name, (info, raw) in tensors.items():
            how = smoothing.scaling(name)
            if how:
                raw[:] = _scaled_float(raw, info.qtype, how)


def patch_quantized(quantized: Path, src: GGUFSource, smoothing: Smoothing, imatrix: Imatrix | None,
                    threads: int = 0, block_search: bool = False) -> None:
    """Smooth an already quantized file in place: float tensors scaled as write_smoothed scales them, quantized ones
    quantized again, at the type they have there, from the source's rows as the smoothed copy would hold them, with
    the imatrix scaled_imatrix gives: the bytes llama.cpp writes from that copy, without the copy (with
    ``block_search``, bettered as realize/rounding.py betters them)."""
    quantize = quantize_searched if block_search else kernels.quantize_rows
    im = scaled_imatrix(imatrix, smoothing)
    with writable_tensors(quantized) as tensors:
        for name, (info, raw) in tensors.items():
            how = smoothing.scaling(name)
            if not how:
                continue
            qtype = info.qtype
            if qtype in FLOAT_TYPES:
                raw[:] = _scaled_float(raw, qtype, how)
                continue
            stored, n = src.tensors[name].qtype, src.tensors[name].nrows
            col = im.values(name) if im is not None and name in im else None
            out = raw.reshape(n, -1)
            for r0 in range(0, n, PATCH_ROWS):
                rows = _apply(src.rows(name, np.arange(r0, min(n, r0 + PATCH_ROWS))), how, r0)
                rows = to_float32(from_float32(rows, stored), stored).reshape(len(rows), -1)
                out[r0:r0 + len(rows)] = quantize(rows, qtype, col, threads or cpu_count())


def _scaled_float(raw: np.ndarray, stored: QuantType, how: Sequence[tuple[bool, np.ndarray]]) -> np.ndarray:
    """A float tensor's bytes, scaled: as (rows, cols), a smoothed weight's columns or a partner's rows (a 1-D one:
    one value a row) match the scales."""
    values = to_float32(raw, stored)
    cols = next((s.size for columns, s in how if columns), None)  # ffn_up can have both: shaped by its columns
    rows = values.reshape(-1, cols) if cols else values.reshape(how[0][1].size, -1)
    return from_float32(_apply(rows, how, 0), stored)


def _apply(rows: np.ndarray, how: Sequence[tuple[bool, np.ndarray]], first_row: int) -> np.ndarray:
    """Rows ``first_row:`` of a tensor, scaled: a smoothed weight's columns multiplied, a partner's rows divided."""
    for columns, scales in how:
        rows = rows * scales if columns else rows / scales[first_row:first_row + len(rows), None]
    return rows


def scaled_imatrix(imatrix: Imatrix | None, smoothing: Smoothing) -> Imatrix | None:
    """The imatrix for the smoothed copy: each smoothed weight's columns' mean squares divided by ``scales ** 2``
    (its partners' inputs are unchanged)."""
    if imatrix is None:
        return None
    sums = dict(imatrix.sums)
    for key, c in smoothing.chosen.items():
        for w in (w for w in smoothing.groups[key].weights if c.alpha > 0 and w in imatrix):
            sums[w] = (np.asarray(sums[w]).reshape(-1, c.scales.size) / c.scales**2).reshape(-1)
    return replace(imatrix, sums=sums)
