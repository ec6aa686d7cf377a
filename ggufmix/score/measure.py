"""Measure: a source model -> ``Scores``, the first of the three stages (measure, plan, realize).

Opens the float source, checks the imatrix against it, measures every quantizable tensor with the chosen
strategy (llama.cpp's kernels handed to the pure scorers), and for the strategies that rank blocks by
their activations, runs llama.cpp on the calibration text first. Nothing here writes a model file.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ggufmix.engine import ablation, kernels
from ggufmix.engine.activations import collect_activations
from ggufmix.engine.isolated import check_loads
from ggufmix.engine.llamalib import version
from ggufmix.errors import InputError, UsageError
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_source import GGUFSource, open_gguf
from ggufmix.io.imatrix import check_against, read_imatrix
from ggufmix.io.text import read_text, text_sha256
from ggufmix.layout.rules import collected_by_imatrix
from ggufmix.layout.slots import build_layout
from ggufmix.score import quant_error
from ggufmix.score.base import BlockStats, Kernels, scorers
from ggufmix.score.journal import BlockStatsCache, Journal, PriceCache, fingerprint
from ggufmix.score.quant_error import known_noise, remember_noise
from ggufmix.score.stream import DEFAULT_ROWS, score_model
from ggufmix.scores import Scores
from ggufmix.types import DEFAULT_TYPES, FLOAT_TYPES, ONE_BIT_TYPES, QuantType, bits_per_weight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreOptions:
    strategy: str = "measured"
    imatrix: Path | None = None
    max_rows: int = DEFAULT_ROWS
    threads: int = 2
    allow_requantize: bool = False
    calib: Path | None = None   # calibration text for strategies that rank blocks by activations (lim, lieq)
    calib_chunks: int = 8       # chunks of 512 tokens for those activations (block removal uses at most 2)
    ray: str | None = None      # score on a Ray cluster: "local" (start one), "auto" or an address; None: here
    widths: tuple[float, ...] = ()  # kld: bits per weight whose nearest types the oracle measures (() = default)
    oracle: Any = None              # kld: score.oracle.OracleSettings; None: calib_chunks x 512 tokens
    assume_imatrix: bool = False    # price the imatrix-only types too, on the promise the build gets an imatrix
    min_bpw: float = 0.0            # the measured strategies skip types narrower than this (build: see type_floor)
    keep_types: tuple[QuantType, ...] = ()  # measured whatever min_bpw says (the build's --types and --pin types)

    def __post_init__(self) -> None:
        """Raises: UsageError: ``assume_imatrix`` with an imatrix, or with a strategy that quantizes the weights
        (it needs the imatrix itself to price those types)."""
        if not self.assume_imatrix:
            return
        if self.imatrix is not None:
            raise UsageError("--assume-imatrix stands in for an imatrix you do not have yet; with --imatrix, leave it out")
        if scorers()[self.strategy].reads_weights:
            header_only = ", ".join(n for n, s in sorted(scorers().items()) if not s.reads_weights)
            raise UsageError(f"--assume-imatrix: --strategy {self.strategy} quantizes the weights and needs the imatrix "
                             "itself (ggufmix imatrix MODEL --text CALIB -o FILE, then --imatrix FILE); it works with "
                             f"{header_only}")


@dataclass(frozen=True)
class Measured:
    """What the measure stage hands on: the opened source, its imatrix (checked against it) and the scores."""
    source: GGUFSource
    imatrix: Imatrix | None
    scores: Scores


def measure(source: Path, opts: ScoreOptions, *, scores: Scores | None = None, progress: bool = True) -> Measured:
    """Open ``source``, have llama.cpp read its metadata (fail now, not after hours of scoring), load the imatrix,
    and measure every tensor (or take the ``scores`` measured before).

    Raises:
        InputError: a damaged or quantized source, or an imatrix that does not match it.
    """
    src = open_source(source, opts.allow_requantize)
    with ThreadPoolExecutor(1, thread_name_prefix="preflight") as pool:
        # llama.cpp reads the metadata in a child process while the tensors are measured; a refusal stops them
        preflight = pool.submit(check_loads, src.path, label=str(source))
        imatrix = load_imatrix(opts.imatrix, src)
        if scores is None:
            scores = score_source(src, opts, imatrix, progress, check=lambda: preflight.done() and preflight.result())
        preflight.result()
    return Measured(src, imatrix, scores)


# Why a converted Hugging Face folder can hold quantized tensors, by type (said in the refusal).
_ALREADY_QUANTIZED_WHY = {
    # openai/gpt-oss-*: llama.cpp's converter copies the MXFP4 experts as they are (GptOssModel.repack_mxfp4);
    # ggufmix cannot keep a source tensor's type as it is, so they would be dequantized and quantized again
    QuantType.MXFP4: " (llama.cpp's converter copies MXFP4 experts, gpt-oss's, as they are; ggufmix cannot keep "
                     "them as MXFP4)",
}


def open_source(path: Path, allow_requantize: bool, check_data: bool = True) -> GGUFSource:
    """Open a float source; a quantized one is refused unless the user accepts the quality loss.

    Raises:
        InputError: missing/damaged file, or quantized weights without ``allow_requantize``.
    """
    src = open_gguf(path, check_data=check_data)
    quantized = [t for t in src.tensors.values() if t.qtype not in FLOAT_TYPES]
    if quantized and not allow_requantize:
        t = quantized[0]
        raise InputError(f"{path}: {src.arch} tensor {t.name!r} is already {t.qtype.name}"
                         f"{_ALREADY_QUANTIZED_WHY.get(t.qtype, '')}; requantizing can severely reduce "
                         "quality compared to quantizing from F16/BF16/F32 (pass --allow-requantize to go on)")
    return src


def load_imatrix(path: Path | None, src: GGUFSource) -> Imatrix | None:
    """The imatrix at ``path``, checked against the model."""
    if path is None:
        return None

    im = read_imatrix(path)
    check_against(im, {n: t.ncols for n, t in src.tensors.items()})
    return im


def score_source(src: GGUFSource, opts: ScoreOptions, imatrix: Imatrix | None,
                 progress: bool = True, check: Callable[[], Any] | None = None) -> Scores:
    """Measure every quantizable tensor once (all default types: any palette can be planned later).

    Finished tensors go to a journal as they come, so an interrupted run resumes (score/journal.py).
    """
    types, may_need_imatrix = candidate_types(src, opts, imatrix)
    layout = build_layout(src.arch, src.tensors.values(), types, imatrix_names=may_need_imatrix)
    spec = scorers()[opts.strategy]
    blocks = block_stats(src.path, spec.activations, layout.n_layers, opts, progress)
    oracle, oracle_settings = oracle_measurements(src, layout, opts, imatrix, progress)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows, kernels.f16_to_f32)
    journal = Journal({"source": fingerprint(src.path), "strategy": opts.strategy, "rows": opts.max_rows,
                       "window": quant_error.WINDOW_VALUES, "slow_stride": quant_error.SLOW_STRIDE,
                       **({"min_bpw": opts.min_bpw, "keep": sorted(t.name for t in opts.keep_types)}
                          if opts.min_bpw else {}),
                       "imatrix": fingerprint(opts.imatrix) if opts.imatrix else None, "llama-cpp-python": version(),
                       **({"assume_imatrix": True} if opts.assume_imatrix else {})})
    prices = PriceCache(version())
    remember_noise(prices.load())
    scores = score_model(src, layout, opts.strategy, k, imatrix=imatrix, max_rows=opts.max_rows,
                         threads=opts.threads, progress=progress, journal=journal, blocks=blocks,
                         runner=_runner(opts), oracle=oracle, check=check)
    journal.finish()
    prices.save(known_noise())
    if opts.imatrix is not None:
        scores.settings["imatrix"] = str(opts.imatrix)
    if opts.min_bpw:
        scores.settings["min_bpw"] = opts.min_bpw
    if opts.assume_imatrix:
        scores.settings["assume_imatrix"] = True  # plan/build read it: the imatrix-only types need one at build
    if blocks is not None or oracle is not None:
        scores.settings["calib"] = {"text": str(opts.calib), "chunks": opts.calib_chunks}
    if oracle is not None:
        scores.settings.update(oracle_settings)
    return scores


def candidate_types(src: GGUFSource, opts: ScoreOptions, imatrix: Imatrix | None) -> tuple[tuple[QuantType, ...], set[str]]:
    """The types to score, and the tensors that may take those llama.cpp writes only with an imatrix: the ones the
    imatrix has; with ``assume_imatrix``, the ones llama-imatrix will record (``blk.*``), and the 1-bit types join."""
    if not opts.assume_imatrix:
        return _above_floor(DEFAULT_TYPES, opts), set(imatrix.names if imatrix else ())
    types = tuple(sorted(DEFAULT_TYPES + ONE_BIT_TYPES, key=lambda t: (bits_per_weight(t), int(t))))
    return _above_floor(types, opts), {n for n in src.tensors if collected_by_imatrix(n)}


def _above_floor(types: tuple[QuantType, ...], opts: ScoreOptions) -> tuple[QuantType, ...]:
    """``types`` without those under ``opts.min_bpw`` (kept: ``opts.keep_types``), for the measured strategies."""
    spec = scorers()[opts.strategy]
    if not opts.min_bpw or not (spec.needs_rows and spec.calibrated):
        return types
    return tuple(t for t in types if bits_per_weight(t) >= opts.min_bpw or t in opts.keep_types)


def _runner(opts: ScoreOptions) -> Any:
    """Where the tensors are scored: None (threads here) or a Ray cluster (``--threads`` CPUs when local)."""
    if opts.ray is None:
        return None
    from ggufmix.score.cluster import LOCAL, RayRunner

    return RayRunner(opts.ray, opts.threads if opts.ray == LOCAL else None)


def oracle_measurements(src: GGUFSource, layout: Any, opts: ScoreOptions, imatrix: Imatrix | None,
                        progress: bool) -> tuple[Any, dict[str, Any]]:
    """The KLD oracle's measurements when the strategy asks for them (``kld``), and what to record of them."""
    if scorers()[opts.strategy].activations != "oracle":
        return None, {}
    if opts.calib is None:
        raise UsageError(f"--strategy {opts.strategy} measures KLD on calibration text: give --calib TEXT")
    from ggufmix.score.oracle import OracleSettings, journal_for, measure_all

    text = read_text(opts.calib)
    settings = opts.oracle or OracleSettings(chunks=opts.calib_chunks)
    settings = replace(settings, widths=opts.widths or settings.widths)
    got = measure_all(src.path, layout, text, settings, imatrix, journal_for(src.path, text, settings, opts.imatrix),
                      progress, runner=_runner(opts))
    n = sum(len(v) for v in got.values())
    total = sum(len(s.candidates) for s in layout.slots if s.quantized)
    note = "" if opts.widths else f"no budget given: measured the types around {', '.join(map(str, settings.widths))} bpw"
    return got, {"units": "kld", "calib": {"text": str(opts.calib), "chunks": settings.chunks}, "oracle": {"widths": list(settings.widths), "chunks": settings.chunks,
                                            "ctx": settings.ctx, "start": settings.start,
                                            "max_types": settings.max_types,
                                            "measured": n, "interpolated": total - n,
                                            "note": note}}


def block_stats(model: Path, activations: str, n_layers: int, opts: ScoreOptions, progress: bool) -> Any:
    """The activation diagnostics a strategy asked for, measured by llama.cpp on ``opts.calib``."""
    if not activations:
        return None

    if opts.calib is None:
        raise UsageError(f"--strategy {opts.strategy} ranks blocks by their activations: give --calib TEXT")
    text = read_text(opts.calib)
    cache = BlockStatsCache({"model": fingerprint(model), "calib": text_sha256(text), "chunks": opts.calib_chunks,
                             "kind": activations, "llama-cpp-python": version()})
    kept = cache.load()
    if kept is not None:
        logger.info("block statistics kept from an earlier run: %s", cache.path)
        return BlockStats(**kept)
    acts = collect_activations(model, text, n_chunks=opts.calib_chunks, progress=progress, imatrix=False)
    drop = {}
    if activations == "ablation":
        drop = ablation.block_removal_cost(model, text, n_layers, n_chunks=min(2, opts.calib_chunks),
                                           progress=progress)
    parts = {"distance": acts.block_distance, "erank": acts.block_erank, "ppl_drop": drop}
    cache.save(parts)
    return BlockStats(**parts)
