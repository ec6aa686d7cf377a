"""``ggufmix build`` from start to finish: build to a budget or a device, then evaluate, bundle, hand the bundle to
Ollama and push it, as asked. The CLI parses flags into a :class:`Delivery` and prints the :class:`Delivered`."""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufmix.errors import HubError, UsageError
from ggufmix.evaluate.evaluation import evaluate
from ggufmix.io.text import read_text
from ggufmix.plan.budget import Budget
from ggufmix.plan.planner import Pin
from ggufmix.plan.speed import DEFAULT_SPEED_TRADEOFF
from ggufmix.realize.build import BuildResult, build
from ggufmix.realize.compensate import GptqOptions
from ggufmix.realize.smooth import SmoothOptions
from ggufmix.score.measure import ScoreOptions
from ggufmix.scores import Scores
from ggufmix.ship.bundle import write_bundle
from ggufmix.ship.fit import FitSettings, build_to_fit, run_ollama, staging_dir
from ggufmix.ship.palettes import ollama_engine_misfits
from ggufmix.ship.push import check_repo_id, push_bundle
from ggufmix.ship.validate import ValidateReport, card_section, validate_file
from ggufmix.types import QuantType

QUALITY_CHUNKS = 8


@dataclass(frozen=True)
class Delivery:
    """Where the built file goes and what happens to it afterwards; checked before any work is done."""

    output: Path | None = None
    bundle: Path | None = None
    ollama_name: str | None = None
    push_repo: str | None = None
    private: bool = False
    eval_text: Path | None = None
    force: bool = False
    validate_ctx: int | None = None  # build --validate: run ggufmix validate at this context (None: do not)

    def __post_init__(self) -> None:
        if (self.output is None) == (self.bundle is None):
            raise UsageError("give one of -o FILE or --bundle DIR")
        if self.ollama_name and not self.bundle:
            raise UsageError("--ollama needs --bundle (Ollama builds from the bundle's Modelfile)")
        if self.push_repo and not self.bundle:
            raise UsageError("--push needs --bundle (the folder that is uploaded)")
        if self.push_repo:
            check_repo_id(self.push_repo)  # before hours of work, not after


@dataclass(frozen=True)
class Recipe:
    """What the planner is given besides the budget: palette, pins, saved scores, and whether to smoke-test."""

    types: Sequence[QuantType] | None = None
    pins: Sequence[Pin] = ()
    scores: Scores | None = None
    smoke: bool = True
    search_minutes: float = 0.0  # --strategy kld: refine the plan end to end this long (search/refine.py)
    gptq: GptqOptions | None = None  # --gptq: error feedback from the calibration text (realize/compensate.py)
    speed_tradeoff: float = DEFAULT_SPEED_TRADEOFF  # predicted error given up for a faster quantize (plan/speed.py)
    smooth: SmoothOptions | None = None  # --smooth: the head's and blocks' inputs scaled (--smooth-ffn: ffn_down's too)
    block_search: bool = False  # --search-rounding: Q4_1 / Q5_1 / Q4_K / Q5_K blocks searched (realize/rounding.py)


@dataclass(frozen=True)
class Delivered:
    result: BuildResult
    path: Path  # the model file where the user finds it (inside the bundle with --bundle)
    bundle: Path | None = None
    fit_lines: list[str] | None = None
    quality: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # Ollama's output, the pushed URL
    warnings: list[str] = field(default_factory=list)
    validation: ValidateReport | None = None  # build --validate (the caller turns a failed device into exit 4)


def deliver(model: Path, meta: dict[str, Any], target: Budget | FitSettings, delivery: Delivery, *,
            opts: ScoreOptions, recipe: Recipe = Recipe(), progress: bool = True) -> Delivered:
    """Build ``model`` (a float GGUF whose header is ``meta``) to ``target`` and deliver it as ``delivery`` says.

    With a bundle everything is assembled in a staging folder beside it and renamed into place at the end;
    a failure anywhere before that leaves nothing behind.
    """
    staging = staging_dir(delivery.bundle, delivery.force) if delivery.bundle else None
    out = staging / "model.gguf" if staging else delivery.output
    assert out is not None  # Delivery guarantees one of output / bundle
    try:
        res, fit_lines = _build_to(model, out, meta, target, delivery.force, opts, recipe, progress)
        quality = _quality(model, out, delivery.eval_text, progress) if delivery.eval_text else None
        # against the source it was built from; out.validate.json lands beside out (the bundle's validate.json)
        checked = validate_file(out, reference=model, n_ctx=delivery.validate_ctx) if delivery.validate_ctx else None
        if staging is not None:
            fit_ctx = (target.n_ctx, target.n_ubatch) if isinstance(target, FitSettings) else None
            write_bundle(model, meta, staging, delivery.bundle, res, fit_lines=fit_lines, quality=quality,
                         imatrix=opts.imatrix, fit_ctx=fit_ctx, validation=card_section(checked) if checked else None)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    path = delivery.bundle / "model.gguf" if delivery.bundle else out
    done = Delivered(res, path, delivery.bundle, fit_lines, quality, validation=checked)
    arch = str(meta.get("general.architecture", "unknown"))
    if delivery.ollama_name:
        done.warnings.extend(_ollama_warnings(arch, res))
        done.notes.append(run_ollama(delivery.bundle, delivery.ollama_name))
    if delivery.push_repo:
        done.notes.append(push(delivery.bundle, delivery.push_repo, delivery.private,
                               f"ggufmix bundle of {model.name} at {res.plan.budget}", progress))
    return done


def _build_to(model: Path, out: Path, meta: dict[str, Any], target: Budget | FitSettings, force: bool,
              opts: ScoreOptions, recipe: Recipe, progress: bool) -> tuple[BuildResult, list[str] | None]:
    kw = {"types": recipe.types, "pins": recipe.pins, "smoke": recipe.smoke, "scores": recipe.scores,
          "search_minutes": recipe.search_minutes, "gptq": recipe.gptq, "smooth": recipe.smooth,
          "speed_tradeoff": recipe.speed_tradeoff, "block_search": recipe.block_search}
    if isinstance(target, Budget):
        return build(model, out, target, opts=opts, force=force, progress=progress, **kw), None
    res, report, measured = build_to_fit(model, out, meta, target, opts=opts, force=force, progress=progress, **kw)
    return res, [*report.lines(), f"llama.cpp measured model + KV + compute + output = {measured / 2**20:.2f} MiB "
                 f"<= {target.device.usable_bytes / 2**20:.2f} MiB usable"]


def _quality(model: Path, out: Path, text: Path, progress: bool) -> dict[str, Any]:
    """The model card's quality row: perplexity and KLD of ``out`` against ``model`` on ``text``."""
    rep = evaluate(model, [out], read_text(text), chunks=QUALITY_CHUNKS, progress=progress)
    q, s = rep.quants[0], rep.settings
    d = q.divergence
    return {"settings": f"{s.n_chunks} x {s.ctx} tokens of {text.name}, KLD {s.kld_mode}",
            "base_ppl": rep.base.perplexity.ppl.value, "ppl": q.perplexity.ppl.value, "kld": d.kld.value,
            "kld_err": d.kld.stderr, "kld_p99": d.kld_p99, "top1": d.same_top.value}


def _ollama_warnings(arch: str, res: BuildResult) -> list[str]:
    misfits = ollama_engine_misfits(arch, set(res.plan.type_histogram()))
    if not misfits:
        return []
    return [f"Ollama runs {arch} on its own engine, whose code does not list {', '.join(misfits)}; "
            "rebuild with --palette ollama if `ollama run` fails"]


def push(bundle: Path, repo: str, private: bool, message: str, progress: bool) -> str:
    """Upload a finished bundle; a failure says how to retry it without rebuilding.

    Returns:
        The line to print: where the bundle went.
    """
    try:
        url = push_bundle(bundle, repo, private=private, message=message, progress=progress)
    except HubError as e:
        raise HubError(f"{e} (the bundle is complete in {bundle}: retry with `ggufmix push {bundle} {repo}`)") from None
    return f"pushed {bundle}/ to {repo}: {url}"
