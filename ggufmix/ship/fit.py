"""``build --fit`` and ``--bundle``: a budget from a device's memory, checked by llama.cpp, and a shareable folder.

``--fit`` assumes llama.cpp runs without mmap (``--no-mmap``; the bundle's Modelfile says ``use_mmap
false``): then its buffers hold each weight once. Arithmetic: usable memory - KV cache (computed,
ship/devices.py) - compute and output buffers (measured by loading the source in llama.cpp at the same
n_ctx / n_ubatch; for a header-only GGUF, sized by llama.cpp's allocator without weights:
engine/buffers.py ``simulate_buffers``) - a reserve = the weight budget. After the build, the output is
loaded in llama.cpp at those settings; if its buffers (model + KV + compute + output, from llama.cpp's log)
exceed the usable memory (repacked weights are the usual reason: llama.cpp copies Q4_0/IQ4_NL/Q4_K tensors
into interleaved CPU layouts), the weight budget shrinks by the overshoot and the plan is rebuilt from the
scores in memory, up to three times.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ggufmix.artifacts import dir_beside
from ggufmix.engine.buffers import measure_buffers, simulate_buffers
from ggufmix.errors import BudgetError, UsageError
from ggufmix.io.gguf_source import open_gguf
from ggufmix.plan.budget import Budget
from ggufmix.realize.build import BuildResult, check_output, plan_and_realize
from ggufmix.score.measure import ScoreOptions, measure
from ggufmix.scores import Scores
from ggufmix.ship.devices import Device, FitReport, ModelShape, kv_cache_bytes, kv_type

logger = logging.getLogger(__name__)

RESERVE_SHARE = 0.02
FIT_TRIES = 3


@dataclass(frozen=True)
class FitSettings:
    device: Device
    n_ctx: int = 2048
    n_ubatch: int = 512
    kv: str = "f16"
    swa_full: bool = False  # llama.cpp --swa-full: sliding-window layers keep the whole context


def fit_report(source: Path, meta: dict[str, Any] | None, fit: FitSettings, reserve: int | None = None) -> FitReport:
    """The arithmetic of ``--fit``: the compute/output buffers measured on ``source`` by llama.cpp, or for a
    header-only GGUF sized by llama.cpp's ``no_alloc`` mode on its header (:func:`simulate_buffers`); ``meta``
    is ``source``'s header (read here when None)."""
    src = open_gguf(source, check_data=False)
    shape = ModelShape.from_metadata(src.metadata if meta is None else meta)
    kv = kv_cache_bytes(shape, fit.n_ctx, kv_type(fit.kv), kv_type(fit.kv), n_ubatch=fit.n_ubatch,
                        swa_full=fit.swa_full)
    how = simulate_buffers if src.header_only else measure_buffers
    measured = how(source, n_ctx=fit.n_ctx, n_ubatch=fit.n_ubatch, kv_type=fit.kv, swa_full=fit.swa_full)
    reserve = int(fit.device.usable_bytes * RESERVE_SHARE) if reserve is None else reserve
    return FitReport(fit.device, fit.n_ctx, fit.n_ubatch, fit.kv, kv, measured.compute, measured.output, reserve,
                     _kv_note(shape, fit), "sized by llama.cpp, no weights" if src.header_only else "measured by llama.cpp")


def _kv_note(shape: ModelShape, fit: FitSettings) -> str:
    if shape.sliding_window is None:
        return ""
    if shape.swa_unknown:
        return f"; sliding window of {shape.arch} counted at full context: layer pattern unknown"
    n = sum(shape.swa_layers)
    if fit.swa_full:
        return f"; --swa-full: {n} sliding-window layers at full context"
    return f"; {n} of {shape.n_layer} layers slide over {shape.sliding_window} tokens"


def build_to_fit(source: Path, out: Path, meta: dict[str, Any], fit: FitSettings, *, opts: ScoreOptions,
                 scores: Scores | None = None, force: bool = False, progress: bool = True,
                 **realize_kw: Any) -> tuple[BuildResult, FitReport, int]:
    """Build ``out`` so that llama.cpp's measured memory at ``fit``'s settings is within the device's.

    The source is measured once (or ``scores`` are taken); a retry re-plans from the ``Scores`` in memory
    and realizes again. ``realize_kw`` goes to :func:`ggufmix.realize.build.plan_and_realize` (types, pins,
    smoke ...).

    Returns:
        (BuildResult, the FitReport used, llama.cpp's measured total bytes).

    Raises:
        BudgetError: the model cannot fit (nothing left for the weights, or retries ran out).
    """
    check_output(out, [source], force)
    report = fit_report(source, meta, fit)
    measured = measure(source, opts, scores=scores, progress=progress)
    for _ in range(FIT_TRIES):
        if report.weights_bytes <= 0:
            raise BudgetError(f"{fit.device.name}: {fit.device.usable_bytes / 2**20:.1f} MiB leave nothing for "
                              f"the weights at n_ctx {fit.n_ctx} (KV {report.kv_bytes / 2**20:.1f} MiB, compute "
                              f"{report.compute_bytes / 2**20:.1f} MiB); lower --ctx or --ubatch")
        res = plan_and_realize(measured, out, Budget(report.weights_bytes, "b", at_most=True), progress=progress, **realize_kw)
        total = measure_buffers(out, n_ctx=fit.n_ctx, n_ubatch=fit.n_ubatch, kv_type=fit.kv,
                                swa_full=fit.swa_full).total
        over = total - fit.device.usable_bytes
        if over <= 0:
            return res, report, total
        logger.warning("llama.cpp measured %.2f MiB, %.2f MiB over %s; shrinking the weights budget",
                       total / 2**20, over / 2**20, fit.device.name)
        report = replace(report, reserve_bytes=report.reserve_bytes + over + (1 << 20))
    out.unlink(missing_ok=True)
    raise BudgetError(f"{out}: still over {fit.device.name}'s memory after {FIT_TRIES} tries")


def staging_dir(final: Path, force: bool) -> Path:
    """A temporary folder beside ``final`` to assemble a bundle in.

    Raises:
        UsageError: ``final`` exists (without force), or its parent is missing.
    """
    if final.exists() and not force:
        raise UsageError(f"{final}: already exists (pass --force to replace it)")
    if not final.parent.is_dir():
        raise UsageError(f"{final}: folder {final.parent} does not exist")
    return dir_beside(final)


def ollama_commands(bundle: Path, name: str) -> list[list[str]]:
    return [["ollama", "create", name, "-f", str(bundle / "Modelfile")],
            ["ollama", "run", name, "Say hello in one short sentence."]]


def run_ollama(bundle: Path, name: str) -> str:
    """``ollama create`` + a one-line ``ollama run`` when the binary is on PATH; else the commands to type."""
    cmds = ollama_commands(bundle, name)
    if shutil.which("ollama") is None:
        return "ollama is not on PATH; run:\n  " + "\n  ".join(" ".join(c) for c in cmds)
    for cmd in cmds:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
        if res.returncode != 0:
            raise UsageError(f"{' '.join(cmd)} failed: {(res.stderr or res.stdout).strip().splitlines()[-1:]}")
    return f"ollama: {res.stdout.strip()[:200]}"
