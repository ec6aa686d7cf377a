"""``ggufmix build``: score, plan, quantize with llama.cpp, verify, smoke-test. Stage by stage."""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufmix import __version__
from ggufmix.artifacts import temp_beside, write_artifact, write_text_atomic
from ggufmix.engine.isolated import check_loads, smoke_test_isolated
from ggufmix.errors import InputError, UsageError
from ggufmix.io.gguf_source import GGUFSource, open_gguf
from ggufmix.plan.budget import Budget
from ggufmix.plan.layout import build_layout
from ggufmix.plan.plan import Plan
from ggufmix.plan.planner import Pin, make_plan
from ggufmix.quantize.overrides import base_ftype, overrides, recipe
from ggufmix.quantize.verify import Verified, verify
from ggufmix.score.runner import DEFAULT_ROWS
from ggufmix.score.scores import Scores
from ggufmix.types import DEFAULT_TYPES, FLOAT_TYPES, QuantType

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


@dataclass(frozen=True)
class BuildResult:
    output: Path
    plan: Plan
    verified: Verified
    smoke: str | None
    seconds: dict[str, float] = field(default_factory=dict)


def open_source(path: Path, allow_requantize: bool, check_data: bool = True) -> GGUFSource:
    """Open a float source; a quantized one is refused unless the user accepts the quality loss.

    Raises:
        InputError: missing/damaged file, or quantized weights without ``allow_requantize``.
    """
    src = open_gguf(path, check_data=check_data)
    quantized = [t for t in src.tensors.values() if t.qtype not in FLOAT_TYPES]
    if quantized and not allow_requantize:
        t = quantized[0]
        raise InputError(f"{path}: tensor {t.name!r} is already {t.qtype.name}; requantizing can severely reduce "
                         "quality compared to quantizing from F16/BF16/F32 (pass --allow-requantize to go on)")
    return src


def load_imatrix(path: Path | None, src: GGUFSource) -> dict[str, Any] | None:
    """The imatrix as name -> per-column values, checked against the model."""
    if path is None:
        return None
    from ggufmix.io.imatrix import check_against, read_imatrix

    im = read_imatrix(path)
    check_against(im, {n: t.ncols for n, t in src.tensors.items()})
    return {name: im.values(name) for name in im.names}


def score_source(src: GGUFSource, opts: ScoreOptions, imatrix: dict[str, Any] | None,
                 progress: bool = True) -> Scores:
    """Measure every quantizable tensor once (all default types: any palette can be planned later).

    Finished tensors go to a journal as they come, so an interrupted run resumes (score/journal.py).
    """
    from ggufmix.engine import kernels
    from ggufmix.score.base import Kernels
    from ggufmix.score.runner import score_model

    from ggufmix.engine.llamalib import version
    from ggufmix.score.base import scorers
    from ggufmix.score.journal import Journal, PriceCache, fingerprint
    from ggufmix.score.quant_error import known_noise, remember_noise

    layout = build_layout(src.arch, src.tensors.values(), DEFAULT_TYPES, imatrix_names=set(imatrix or ()))
    spec = scorers()[opts.strategy]
    blocks = block_stats(src.path, spec.activations, layout.n_layers, opts, progress)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows)
    journal = Journal({"source": fingerprint(src.path), "strategy": opts.strategy, "rows": opts.max_rows,
                       "imatrix": fingerprint(opts.imatrix) if opts.imatrix else None, "llama-cpp-python": version()})
    prices = PriceCache(version())
    remember_noise(prices.load())
    scores = score_model(src, layout, opts.strategy, k, imatrix=imatrix, max_rows=opts.max_rows,
                         threads=opts.threads, progress=progress, journal=journal, blocks=blocks)
    journal.finish()
    prices.save(known_noise())
    if opts.imatrix is not None:
        scores.settings["imatrix"] = str(opts.imatrix)
    if blocks is not None:
        scores.settings["calib"] = {"text": str(opts.calib), "chunks": opts.calib_chunks}
    return scores


def block_stats(model: Path, activations: str, n_layers: int, opts: ScoreOptions, progress: bool) -> Any:
    """The activation diagnostics a strategy asked for, measured by llama.cpp on ``opts.calib``."""
    if not activations:
        return None
    from ggufmix.engine.ablation import block_removal_cost
    from ggufmix.engine.activations import collect_activations
    from ggufmix.engine.llamalib import version
    from ggufmix.evaluate.basecache import text_sha256
    from ggufmix.evaluate.runner import read_eval_text
    from ggufmix.score.base import BlockStats
    from ggufmix.score.journal import BlockStatsCache, fingerprint

    if opts.calib is None:
        raise UsageError(f"--strategy {opts.strategy} ranks blocks by their activations: give --calib TEXT")
    text = read_eval_text(opts.calib)
    cache = BlockStatsCache({"model": fingerprint(model), "calib": text_sha256(text), "chunks": opts.calib_chunks,
                             "kind": activations, "llama-cpp-python": version()})
    kept = cache.load()
    if kept is not None:
        logger.info("block statistics kept from an earlier run: %s", cache.path)
        return BlockStats(**kept)
    acts = collect_activations(model, text, n_chunks=opts.calib_chunks, progress=progress, imatrix=False)
    drop = {}
    if activations == "ablation":
        drop = block_removal_cost(model, text, n_layers, n_chunks=min(2, opts.calib_chunks), progress=progress)
    parts = {"distance": acts.block_distance, "erank": acts.block_erank, "ppl_drop": drop}
    cache.save(parts)
    return BlockStats(**parts)


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse outputs that would clobber an input, an existing file, or land in a missing folder."""
    if any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        raise UsageError(f"{out}: the output would overwrite the input")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise UsageError(f"{out}: folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UsageError(f"{out}: folder {out.parent} is not writable")


def build(source: Path, out: Path, budget: Budget, *, opts: ScoreOptions = ScoreOptions(),
          types: Sequence[QuantType] | None = None, pins: Sequence[Pin] = (), scores_path: Path | None = None,
          force: bool = False, smoke: bool = True, nthread: int = 0, progress: bool = True) -> BuildResult:
    """The whole build; nothing appears at ``out`` unless every check passed."""
    check_output(out, [source], force)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    src = open_source(source, opts.allow_requantize)
    check_loads(src.path, label=str(source))  # llama.cpp reads its metadata: fail now, not after hours of scoring
    imatrix = load_imatrix(opts.imatrix, src)
    scores = Scores.load(scores_path) if scores_path else score_source(src, opts, imatrix, progress)
    t["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = make_plan(scores, budget, types=types, pins=pins).with_versions(versions())
    t["plan"] = time.perf_counter() - t0
    verified, text = quantize_plan(src.path, out, plan, imatrix, smoke=smoke, nthread=nthread, progress=progress,
                                   seconds=t)
    sidecars(out, plan, verified, t, text)
    return BuildResult(out, plan, verified, text, t)


def quantize_plan(source: Path, out: Path, plan: Plan, imatrix: dict[str, Any] | None, *, smoke: bool = False,
                  nthread: int = 0, progress: bool = True,
                  seconds: dict[str, float] | None = None) -> tuple[Verified, str | None]:
    """llama_model_quantize into a temporary file beside ``out``, verify it, with ``smoke`` load it in llama.cpp
    and generate a few tokens, then rename it into place: a file that fails any check never appears at ``out``.

    Returns:
        What was verified, and the smoke test's text (None without ``smoke``).
    """
    from ggufmix.engine.quantize import quantize_file

    t = seconds if seconds is not None else {}
    free = shutil.disk_usage(out.parent).free
    if free < plan.total_bytes + (16 << 20):
        raise UsageError(f"{out.parent}: {free / 1e6:.0f} MB free, the output needs {plan.total_bytes / 1e6:.0f} MB")
    tmp = temp_beside(out)
    text = None
    try:
        t0 = time.perf_counter()
        quantize_file(source, tmp, ftype=base_ftype(plan), overrides=overrides(plan), imatrix=imatrix,
                      nthread=nthread, progress=progress, allow_requantize=True)
        verified = verify(tmp, plan)
        t["quantize"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if smoke:
            text = smoke_test_isolated(tmp, label=f"{source}: the quantized model (not written to {out})")
        t["smoke"] = time.perf_counter() - t0
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return verified, text


def sidecars(out: Path, plan: Plan, verified: Verified, seconds: dict[str, float], smoke: str | None) -> None:
    """``out.plan.json``, ``out.recipe.txt`` (llama-quantize --tensor-type-file) and ``out.build.json``."""
    stem = out.with_suffix("")
    plan.save(f"{stem}.plan.json")
    write_text_atomic(f"{stem}.recipe.txt", recipe(plan))
    write_artifact(f"{stem}.build.json", "build", {
        "output": out.name, "plan": f"{stem.name}.plan.json", "verified": verified.__dict__,
        "seconds": {k: round(v, 3) for k, v in seconds.items()}, "smoke_test": smoke, "versions": plan.versions})


def versions() -> dict[str, str]:
    from ggufmix.engine.llamalib import version

    return {"ggufmix": __version__, "llama-cpp-python": version()}
