"""``ggufmix build``: measure (``score/measure.py``) -> plan (``plan/``) -> realize: quantize with llama.cpp into a
temporary file, read it back against the plan, smoke-test it, rename it into place, write the sidecars."""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

from ggufmix import __version__
from ggufmix.artifacts import temp_beside, write_artifact, write_text_atomic
from ggufmix.engine.isolated import smoke_test_isolated
from ggufmix.engine.llamalib import version
from ggufmix.errors import UsageError
from ggufmix.imatrix import Imatrix
from ggufmix.plan.budget import Budget
from ggufmix.plan.plan import Plan
from ggufmix.plan.planner import Pin, make_plan
from ggufmix.plan.speed import DEFAULT_SPEED_TRADEOFF
from ggufmix.realize.guard import guard_imatrix
from ggufmix.realize.compensate import GptqOptions, compensated_source, write_exact
from ggufmix.realize.smooth import SmoothOptions, choose_smoothing, patch_quantized, smoothed_source
from ggufmix.realize.overrides import base_ftype, overrides, recipe
from ggufmix.realize.rounding import write_searched
from ggufmix.realize.verify import Verified, verify
from ggufmix.score.measure import Measured, ScoreOptions, measure
from ggufmix.scores import Scores
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildResult:
    output: Path
    plan: Plan
    verified: Verified
    smoke: str | None
    seconds: dict[str, float] = field(default_factory=dict)


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
          types: Sequence[QuantType] | None = None, pins: Sequence[Pin] = (), scores: Scores | None = None,
          force: bool = False, smoke: bool = True, nthread: int = 0, progress: bool = True,
          search_minutes: float = 0.0, gptq: GptqOptions | None = None, smooth: SmoothOptions | None = None,
          speed_tradeoff: float = DEFAULT_SPEED_TRADEOFF, block_search: bool = False) -> BuildResult:
    """The three stages in memory: measure (or take ``scores``), plan ``budget`` (for ``kld`` scores with
    ``search_minutes``, refined end to end by the oracle: search/refine.py), realize the file.

    Nothing appears at ``out`` unless every check passed.
    """
    check_output(out, [source], force)
    t0 = time.perf_counter()
    if scores is None and not budget.is_rule:
        width = budget_width(source, budget)
        opts = type_floor(with_budget_width(opts, width), width, (*(types or ()), *(p.qtype for p in pins)))
    measured = measure(source, opts, scores=scores, progress=progress)
    seconds = {"score": time.perf_counter() - t0}
    return plan_and_realize(measured, out, budget, types=types, pins=pins, smoke=smoke, nthread=nthread,
                            progress=progress, seconds=seconds, search_minutes=search_minutes, gptq=gptq,
                            smooth=smooth, speed_tradeoff=speed_tradeoff, block_search=block_search)


def budget_width(source: Path, budget: Budget) -> float:
    """The budget in bits per weight of ``source`` (a size or bits-per-weight budget, not a rule)."""
    from ggufmix.io.gguf_source import open_gguf

    n = open_gguf(source, check_data=False).total_elements
    return budget.to_bytes(n) * 8 / n


def with_budget_width(opts: ScoreOptions, width: float) -> ScoreOptions:
    """``kld`` measures the types nearest the budget's width: give the oracle that width (bits per weight)."""
    from ggufmix.score.base import scorers

    if opts.widths or scorers()[opts.strategy].activations != "oracle":
        return opts
    return replace(opts, widths=(round(width, 3),))


# How far under the budget's width (bits per weight) a tensor's type can fall in a measured plan. The plans
# measured here go at most 1.44 under it: Qwen2.5-Coder-1.5B at 3 and 4 bpw puts the embedding at IQ2_S
# (2.56); SmolLM2-135M at 4.5 bpw, Q2_K's and Q4_K_M's sizes stays within 0.7.
BUDGET_REACH_BPW = 2.5


def type_floor(opts: ScoreOptions, width: float, keep: Sequence[QuantType]) -> ScoreOptions:
    """A build measures no type narrower than the budget's ``width`` - BUDGET_REACH_BPW (the plan would not take
    it; on SmolLM2 at Q4_K_M's size that is Q2_0, Q2_K, Q3_K and IQ3_S, a third of the measuring), except the
    types ``keep`` names (``--types``, ``--pin``). ``score`` without a budget measures them all."""
    floor = width - BUDGET_REACH_BPW
    if opts.min_bpw or floor <= 0:
        return opts
    return replace(opts, min_bpw=round(floor, 3), keep_types=tuple(dict.fromkeys(keep)))


def plan_and_realize(measured: Measured, out: Path, budget: Budget, *, types: Sequence[QuantType] | None = None,
                     pins: Sequence[Pin] = (), smoke: bool = True, nthread: int = 0, progress: bool = True,
                     seconds: dict[str, float] | None = None, search_minutes: float = 0.0,
                     gptq: GptqOptions | None = None, smooth: SmoothOptions | None = None,
                     speed_tradeoff: float = DEFAULT_SPEED_TRADEOFF, block_search: bool = False) -> BuildResult:
    """Plan ``budget`` from the measured scores and realize it at ``out`` (quantize, read back, smoke test,
    sidecars). ``--fit`` calls this again with a smaller budget: the scores stay in memory. ``smooth`` scales the
    head's and the blocks' inputs (with ``smooth.ffn`` ffn_down's too; realize/smooth.py): in the quantized file, or
    with ``gptq`` in a copy of the source that is then compensated (realize/compensate.py), each copy removed
    afterwards. With an imatrix, the columns the plan's rounding would erase are guarded first (realize/guard.py).
    With ``block_search`` the Q4_1 / Q5_1 / Q4_K / Q5_K blocks are searched for a closer rounding than llama.cpp's
    (realize/rounding.py).
    """
    t = dict(seconds or {})
    t0 = time.perf_counter()
    plan = make_plan(measured.scores, budget, types=types, pins=pins,
                     speed_tradeoff=speed_tradeoff).with_versions(versions())
    t["plan"] = time.perf_counter() - t0
    if search_minutes > 0:
        from ggufmix.search.refine import refine

        t0 = time.perf_counter()
        plan = refine(plan, measured.scores, measured.source.path, measured.imatrix, minutes=search_minutes,
                      progress=progress).plan
        t["refine"] = time.perf_counter() - t0
    if measured.imatrix is not None:
        guarded = guard_imatrix(measured.source, plan, measured.imatrix, threads=nthread or os.cpu_count() or 1,
                                progress=progress)
        measured, t["guard"] = replace(measured, imatrix=guarded.imatrix), guarded.seconds
        plan = replace(plan, settings={**plan.settings, "guard": guarded.summary()})
    plan = replace(plan, settings={**plan.settings, "rounding": "searched" if block_search else "llama.cpp"})
    smoothing = choose_smoothing(measured.source, plan, measured.imatrix, smooth)
    if smoothing is not None:
        t["smooth"] = smoothing.seconds
        plan = replace(plan, settings={**plan.settings, "smooth": smoothing.summary()})
    patch = None  # --smooth without --gptq: the quantized file is smoothed in place, the source not copied
    if smoothing is not None and smoothing.active and gptq is None:
        patch = partial(patch_quantized, src=measured.source, smoothing=smoothing, imatrix=measured.imatrix,
                        threads=nthread, block_search=block_search)
    if gptq is not None:
        gptq = replace(gptq, block_search=block_search)
    with (smoothed_source(measured.source, out, plan, measured.imatrix, None if patch else smoothing)
          as (smoothed, imatrix),
          compensated_source(smoothed, out, plan, imatrix, gptq, progress) as (source, done)):
        if done is not None:
            t["gptq"] = done.seconds
            plan = replace(plan, settings={**plan.settings, "gptq": done.summary()})
            patch = partial(write_exact, done=done)
        skip = set(done.exact) if done is not None else set()
        if patch is not None and done is None:  # the smoothed weights were rounded by patch_quantized
            skip |= {e.name for e in plan.quantized() if smoothing is not None and smoothing.scaling(e.name)}
        if block_search:
            patch = partial(_then_search, patch, values=source, plan=plan, imatrix=imatrix, skip=skip,
                            threads=nthread or os.cpu_count() or 1, seconds=t)
        verified, text = quantize_plan(source, out, plan, imatrix, smoke=smoke, nthread=nthread,
                                       progress=progress, seconds=t, patch=patch)
    sidecars(out, plan, verified, t, text)
    return BuildResult(out, plan, verified, text, t)


def _then_search(patch: Callable[[Path], None] | None, quantized: Path, *, values: Path, plan: Plan,
                 imatrix: Imatrix | None, skip: set[str], threads: int, seconds: dict[str, float]) -> None:
    """``patch``, then the search for better blocks (realize/rounding.py) over the weights no patch rounded."""
    if patch is not None:
        patch(quantized)
    t0 = time.perf_counter()
    write_searched(quantized, values, plan, imatrix, skip, threads)
    seconds["rounding"] = time.perf_counter() - t0


def quantize_plan(source: Path, out: Path, plan: Plan, imatrix: Imatrix | None, *, smoke: bool = False,
                  nthread: int = 0, progress: bool = True,
                  seconds: dict[str, float] | None = None,
                  patch: Callable[[Path], None] | None = None) -> tuple[Verified, str | None]:
    """llama_model_quantize into a temporary file beside ``out``, ``patch`` it in place (--smooth), verify it,
    with ``smoke`` load it in llama.cpp and generate a few tokens, then rename it into place: a file that fails any
    check never appears at ``out``.

    Returns:
        What was verified, and the smoke test's text (None without ``smoke``).
    """
    from ggufmix.engine.quantize import quantize_file

    check_imatrix(plan, imatrix)
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
        if patch is not None:
            patch(tmp)
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


def check_imatrix(plan: Plan, imatrix: Imatrix | None) -> None:
    """Refuse a plan with types llama.cpp writes only with an imatrix (planned from ``--assume-imatrix`` scores)
    when the build has none for those tensors: llama.cpp would refuse them, or ggml abort.

    Raises:
        UsageError: names the first such tensor and the count.
    """
    missing = plan.needing_imatrix(imatrix.names if imatrix is not None else ())
    if missing:
        e = missing[0]
        raise UsageError(f"{e.name!r} (and {len(missing) - 1} more) planned as {e.qtype.name}, which llama.cpp writes "
                         "only with an importance matrix (the scores assumed one: --assume-imatrix); give --imatrix "
                         "FILE (ggufmix imatrix MODEL --text CALIB -o FILE)")


def sidecars(out: Path, plan: Plan, verified: Verified, seconds: dict[str, float], smoke: str | None) -> None:
    """``out.plan.json``, ``out.recipe.txt`` (llama-quantize --tensor-type-file) and ``out.build.json``."""
    stem = out.with_suffix("")
    plan.save(f"{stem}.plan.json")
    write_text_atomic(f"{stem}.recipe.txt", recipe(plan))
    write_artifact(f"{stem}.build.json", "build", {
        "output": out.name, "plan": f"{stem.name}.plan.json", "verified": verified.__dict__,
        "seconds": {k: round(v, 3) for k, v in seconds.items()}, "smoke_test": smoke, "versions": plan.versions})


def versions() -> dict[str, str]:
    """ggufmix's and llama-cpp-python's versions, recorded in every plan."""
    return {"ggufmix": __version__, "llama-cpp-python": version()}
