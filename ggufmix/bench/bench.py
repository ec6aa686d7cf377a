"""``ggufmix bench``: llama.cpp's stock mixes against ggufmix strategies at equal size, evaluated alike.

For each imatrix mode (none, and the imatrix computed on ``calib`` text when given):

1. quantize every stock mix with llama.cpp (``llama_model_quantize`` with the mix's ftype);
2. score the source once per strategy, then build a ggufmix file at every ``--budgets`` bpw and at
   exactly every stock mix's tensor bytes (from the saved scores: planning is instant);
3. evaluate every file against the source in one ``ggufmix eval`` pass (the base runs once); each file's
   numbers are kept in ``<file>.eval.json`` and reused while the file, source, text and settings match.

Files already in the output folder are reused (the folder doubles as a cache: delete it to rebuild),
so an interrupted bench resumes where it stopped; a kept ggufmix file whose recipe differs from what
the current planner makes of the same scores is built again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ggufmix.errors import BudgetError, EngineError, UsageError
from ggufmix.imatrix import Imatrix
from ggufmix.plan.budget import Budget
from ggufmix.types import mix_file_type

if TYPE_CHECKING:
    from ggufmix.plan.plan import Plan
    from ggufmix.realize.compensate import GptqOptions
    from ggufmix.scores import Scores

logger = logging.getLogger(__name__)

STOCK = "stock"


@dataclass(frozen=True)
class BenchConfig:
    """What to compare; see ``ggufmix bench --help``."""

    source: Path
    text: Path
    out: Path
    budgets: tuple[float, ...] = ()
    baselines: tuple[str, ...] = ("Q2_K", "Q4_K_M")
    strategies: tuple[str, ...] = ("measured", "uniform")
    calib: Path | None = None
    imatrix_chunks: int | None = 32
    ctx: int = 512
    chunks: int | None = None
    exact: bool = False
    progress: bool = True
    modes: tuple[str, ...] = ("none", "imatrix")
    oracle: Any = None          # kld: score.oracle.OracleSettings (its widths: the targets' bpw)
    search_minutes: float = 0.0  # kld: end-to-end refine of each plan (search/refine.py)
    gptq_chunks: int = 0         # > 0: also build every ggufmix file with --gptq on this many chunks of calib
    gptq_all: bool = False       # those files with --gptq-all (ffn_down compensated too)
    smooth: bool = False         # also build every ggufmix file (and --gptq file) with --smooth (the head)

    def __post_init__(self) -> None:
        from ggufmix.score.base import scorers

        for b in self.budgets:
            if b <= 0:
                raise UsageError(f"--budgets: {b:g} is not a positive bpw")
        for mix in self.baselines:
            mix_file_type(mix)
        for s in self.strategies:
            if s not in scorers():
                raise UsageError(f"--strategies: {s!r} is not a strategy; choose from {', '.join(sorted(scorers()))}")
            if scorers()[s].activations and self.calib is None:
                raise UsageError(f"--strategies: {s} ranks blocks by their activations: give --calib TEXT")
        if not set(self.modes) <= {"none", "imatrix"} or not self.modes:
            raise UsageError(f"--modes {','.join(self.modes)}: choose from none, imatrix")
        if "imatrix" in self.modes and self.calib is None and "none" not in self.modes:
            raise UsageError("--modes imatrix needs --calib (the text the imatrix is computed on)")
        if self.gptq_chunks and self.calib is None:
            raise UsageError("--gptq-chunks needs --calib (the text the weights' inputs are measured on)")
        if self.gptq_all and not self.gptq_chunks:
            raise UsageError("--gptq-all widens the --gptq files: give --gptq-chunks too")
        if self.smooth and self.calib is None:
            raise UsageError("--smooth picks its scales on calibration text: give --calib TEXT")
        if not self.baselines and not self.budgets:
            raise UsageError("nothing to compare: give --baselines or --budgets")


@dataclass(frozen=True)
class BenchFile:
    """One evaluated file: a stock mix or a ggufmix build."""

    path: Path
    kind: str      # "stock" or the strategy
    imatrix: str   # "none" or "imatrix"
    target: str    # the stock mix (for ggufmix: built at its size) or "4.5bpw"
    build_s: float | None


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Build, evaluate and report; returns the ``results.json`` body (also written with the md and plots).

    Raises:
        InputError, UsageError, EngineError: as the stages they come from.
    """
    from ggufmix.evaluate.evaluation import evaluate
    from ggufmix.io.text import read_text

    if cfg.out.exists() and not cfg.out.is_dir():
        raise UsageError(f"{cfg.out}: not a folder")
    cfg.out.mkdir(parents=True, exist_ok=True)  # a results folder, like mkdir -p: bench/ is not in a fresh clone
    text = read_text(cfg.text)
    modes: dict[str, Path | None] = {"none": None} if "none" in cfg.modes else {}
    if cfg.calib is not None and "imatrix" in cfg.modes:
        modes["imatrix"] = _imatrix(cfg)
    files: list[BenchFile] = []
    for mode, imatrix in modes.items():
        stock = [f for f in (_stock(cfg, mix, mode, imatrix) for mix in cfg.baselines) if f is not None]
        targets = [(f"{b:g}bpw", Budget(b, "bpw")) for b in cfg.budgets]
        targets += [(f.target, Budget(_tensor_bytes(f.path), "b")) for f in stock]
        files += stock
        widths = tuple(sorted({_width(cfg.source, b) for _, b in targets}))
        for strategy in cfg.strategies:
            scores = _scores(cfg, strategy, mode, imatrix, widths)
            for gptq, smooth in _variants(cfg):
                files += [f for f in (_ours(cfg, strategy, mode, imatrix, scores, label, budget, gptq, smooth)
                                      for label, budget in targets) if f is not None]
    done = {f.path: row for f in files if (row := _cached_row(cfg, text, f)) is not None}
    todo = [f for f in files if f.path not in done]
    report = evaluate(cfg.source, [f.path for f in todo], text, ctx=cfg.ctx, chunks=cfg.chunks,
                      cache=not cfg.exact, progress=cfg.progress)
    for f, q in zip(todo, report.quants):
        done[f.path] = _row(f, q)
        _save_row(cfg, text, f, done[f.path])
    results = _results(cfg, [done[f.path] | {"build_s": _seconds(f)} for f in files], report)
    results["score_s"] = _score_seconds(cfg)
    _write_outputs(cfg, results)
    return results


def _variants(cfg: BenchConfig) -> list[tuple[bool, bool]]:
    """(--gptq, --smooth) of each ggufmix file built per strategy and target; smoothing only where the source has a
    head of its own or pre-norm blocks (build's default smoothing: the head's and the blocks' inputs)."""
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.realize.smooth import GATED_FFN_ARCHS, HEAD

    src = open_gguf(cfg.source, check_data=False)
    smooth = cfg.smooth and (HEAD in src.tensors or src.arch in GATED_FFN_ARCHS)
    if cfg.smooth and not smooth:
        logger.warning("--smooth: %s has no output head of its own (tied) and no pre-norm blocks llama.cpp builds "
                       "alike; no smoothed files", cfg.source.name)
    gptqs = (False, True) if cfg.gptq_chunks else (False,)
    return [(g, s) for g in gptqs for s in ((False, True) if smooth else (False,))]


def _imatrix(cfg: BenchConfig) -> Path:
    from ggufmix.engine.activations import collect_imatrix
    from ggufmix.io.imatrix import write_imatrix_gguf
    from ggufmix.io.text import read_text

    out = cfg.out / "imatrix.gguf"
    if not out.exists():
        assert cfg.calib is not None
        im = collect_imatrix(cfg.source, read_text(cfg.calib), n_ctx=cfg.ctx, n_chunks=cfg.imatrix_chunks,
                             progress=cfg.progress, dataset=cfg.calib.name)
        write_imatrix_gguf(out, im)
    return out


def _read_imatrix(imatrix: Path | None) -> Imatrix | None:
    from ggufmix.io.imatrix import read_imatrix

    return None if imatrix is None else read_imatrix(imatrix)


def _stock(cfg: BenchConfig, mix: str, mode: str, imatrix: Path | None) -> BenchFile | None:
    from ggufmix.artifacts import temp_beside
    from ggufmix.engine.quantize import quantize_file

    out = cfg.out / f"stock-{mix}-{mode}.gguf"
    seconds = None
    if not out.exists():
        tmp = temp_beside(out)
        t0 = time.perf_counter()
        try:
            quantize_file(cfg.source, tmp, ftype=mix_file_type(mix), imatrix=_read_imatrix(imatrix), progress=False)
            tmp.replace(out)
        except EngineError as e:  # e.g. IQ mixes without an imatrix: llama.cpp refuses them
            logger.warning("stock %s (%s imatrix) skipped: %s", mix, mode, e)
            return None
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.perf_counter() - t0
    return BenchFile(out, STOCK, mode, mix, seconds)


def _width(source: Path, budget: Budget) -> float:
    from ggufmix.io.gguf_source import open_gguf

    n = open_gguf(source, check_data=False).total_elements
    return round(budget.to_bytes(n) * 8 / n, 3)


def _scores(cfg: BenchConfig, strategy: str, mode: str, imatrix: Path | None, widths: tuple[float, ...]) -> Path:
    from ggufmix.score.measure import (
        ScoreOptions,
        load_imatrix,
        open_source,
        score_source,
    )

    out = cfg.out / f"scores-{strategy}-{mode}.json"
    if not out.exists():
        src = open_source(cfg.source, False)
        opts = ScoreOptions(strategy, imatrix, calib=cfg.calib, widths=widths, oracle=cfg.oracle)
        t0 = time.perf_counter()
        score_source(src, opts, load_imatrix(imatrix, src), cfg.progress).save(out)
        out.with_suffix(".seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    return out


def _ours(cfg: BenchConfig, strategy: str, mode: str, imatrix: Path | None, scores: Path, label: str,
          budget: Budget, gptq: bool = False, smooth: bool = False) -> BenchFile | None:
    from ggufmix.io.text import read_text
    from ggufmix.realize.build import build
    from ggufmix.realize.compensate import GptqOptions
    from ggufmix.realize.smooth import SmoothOptions
    from ggufmix.score.measure import ScoreOptions
    from ggufmix.scores import Scores

    kind = (f"{strategy}-gptq-all" if cfg.gptq_all else f"{strategy}-gptq") if gptq else strategy
    kind += "-smooth" if smooth else ""
    out = cfg.out / f"ggufmix-{kind}-{mode}-{label}.gguf"
    compensation = (GptqOptions(read_text(cfg.calib), cfg.gptq_chunks, every_role=cfg.gptq_all)
                    if gptq and cfg.calib else None)
    smoothing = SmoothOptions(read_text(cfg.calib)) if smooth and cfg.calib else None
    seconds = None
    if out.exists() and _planned_otherwise(out, scores, budget, compensation, smooth):
        logger.warning("%s: this ggufmix plans, compensates or smooths it otherwise; building it again", out.name)
        out.unlink()
    if not out.exists():
        t0 = time.perf_counter()
        try:
            loaded = Scores.load(scores)
            search = cfg.search_minutes if loaded.settings.get("units") == "kld" else 0.0
            build(cfg.source, out, budget, opts=ScoreOptions(strategy, imatrix), scores=loaded, smoke=False,
                  progress=cfg.progress, search_minutes=search, gptq=compensation, smooth=smoothing)
        except BudgetError as e:
            logger.warning("%s at %s skipped: %s", strategy, label, e)
            return None
        seconds = time.perf_counter() - t0
    return BenchFile(out, kind, mode, label, seconds)


def _planned_otherwise(out: Path, scores: Path, budget: Budget, gptq: GptqOptions | None = None,
                       smooth: bool = False) -> bool:
    """Whether a file kept from an earlier run was planned differently from what this code plans now (a
    planner change would otherwise leave stale files in the folder): its recipe against a fresh plan, for
    a ``--gptq`` file the chunks of text its feedback was measured on and the roles it left plain against
    ``gptq``'s, and for a ``--smooth`` file whether it was smoothed as this code smooths."""
    from ggufmix.errors import InputError
    from ggufmix.plan.plan import Plan
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.overrides import recipe
    from ggufmix.scores import Scores

    kept = out.with_suffix(".recipe.txt")
    try:
        plan, current = Plan.load(out.with_suffix(".plan.json")), Scores.load(scores)
        done = plan.settings.get("gptq", {})
        fed = (done.get("chunks"), done.get("plain_roles", []))  # plans from before plain_roles compensated all
        if gptq is not None and fed != (gptq.chunks, sorted(gptq.plain_roles)):
            return True
        if smooth and not smoothed_alike(plan):
            return True
        if "refine" in plan.settings:  # an end-to-end search moved it off the solver's plan on purpose
            return not planned_from(plan, current)
        return kept.read_text() != recipe(make_plan(current, budget))
    except (OSError, BudgetError, InputError):
        return True


def smoothed_alike(plan: Plan) -> bool:
    """Whether a ``--smooth`` file chose its alphas from the candidates and by the gain this code uses ("smooth_head":
    the head alone, before 2026-12-06)."""
    from ggufmix.realize.smooth import KIND_GAIN, alphas_offered

    done = plan.settings.get("smooth", {})
    return done.get("alphas") == alphas_offered(ffn=True) and done.get("kind_gain") == KIND_GAIN


def planned_from(plan: Plan, scores: Scores) -> bool:
    """Whether every quantized tensor of ``plan`` carries the error ``scores`` give its type: a refined plan
    cannot be re-planned to compare, but one made from other scores (an older oracle run) shows here."""
    tensors = scores.tensors
    return all(e.name in tensors and tensors[e.name].errors.get(e.qtype) == e.error for e in plan.quantized())


def _score_seconds(cfg: BenchConfig) -> dict[str, float | None]:
    """Wall seconds each scores file took to make (``<strategy>-<mode>`` -> s; None: made elsewhere)."""
    out: dict[str, float | None] = {}
    for p in sorted(cfg.out.glob("scores-*.json")):
        try:
            out[p.stem[len("scores-"):]] = float(p.with_suffix(".seconds").read_text())
        except (OSError, ValueError):
            out[p.stem[len("scores-"):]] = None
    return out


def _tensor_bytes(path: Path) -> int:
    from ggufmix.io.gguf_source import open_gguf

    return open_gguf(path).total_bytes


def _row(f: BenchFile, q: Any) -> dict[str, Any]:
    from ggufmix.io.gguf_source import open_gguf

    info = open_gguf(f.path)
    d = q.divergence
    return {"file": f.path.name, "kind": f.kind, "imatrix": f.imatrix, "target": f.target,
            "tensor_bytes": info.total_bytes, "file_bytes": f.path.stat().st_size,
            "bpw": info.total_bytes * 8 / info.total_elements,
            "kld": d.kld.value, "kld_stderr": d.kld.stderr, "kld_p99": d.kld_p99,
            "ppl": q.perplexity.ppl.value, "ppl_stderr": q.perplexity.ppl.stderr, "top1": d.same_top.value}


def _seconds(f: BenchFile) -> float | None:
    return None if f.build_s is None else round(f.build_s, 2)


# A file's evaluation is kept beside it, keyed by everything that decides the numbers, so a bench that
# adds budgets or strategies evaluates only the new files (one forward pass of a 1.5B model is minutes).
def _eval_key(cfg: BenchConfig, text: str, f: BenchFile) -> dict[str, Any]:
    from ggufmix.io.text import text_sha256

    src, st = cfg.source.stat(), f.path.stat()
    return {"source": [str(cfg.source.resolve()), src.st_size, src.st_mtime_ns], "file": [st.st_size, st.st_mtime_ns],
            "text": text_sha256(text), "ctx": cfg.ctx, "chunks": cfg.chunks, "exact": cfg.exact}


def _eval_path(f: BenchFile) -> Path:
    return f.path.with_name(f.path.stem + ".eval.json")


def _cached_row(cfg: BenchConfig, text: str, f: BenchFile) -> dict[str, Any] | None:
    import json

    try:
        doc = json.loads(_eval_path(f).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(doc, dict) and doc.get("key") == _eval_key(cfg, text, f) and isinstance(doc.get("row"), dict)
    return doc["row"] if ok else None


def _save_row(cfg: BenchConfig, text: str, f: BenchFile, row: dict[str, Any]) -> None:
    import json

    from ggufmix.artifacts import write_text_atomic

    write_text_atomic(_eval_path(f), json.dumps({"key": _eval_key(cfg, text, f), "row": row}) + "\n")


def _results(cfg: BenchConfig, rows: list[dict[str, Any]], report: Any) -> dict[str, Any]:
    return {"format": "ggufmix.bench", "version": 1, "model": cfg.source.name,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "eval": vars(report.settings).copy(), "base_ppl": report.base.perplexity.ppl.value, "rows": rows}


def _write_outputs(cfg: BenchConfig, results: dict[str, Any]) -> None:
    import json

    from ggufmix.artifacts import write_text_atomic
    from ggufmix.bench.report import markdown

    write_text_atomic(cfg.out / "results.json", json.dumps(results, indent=1, default=str) + "\n")
    write_text_atomic(cfg.out / "results.md", markdown(results))
    try:
        from ggufmix import plots
    except ImportError:
        logger.warning("matplotlib is not installed: no pictures (pip install 'ggufmix[plot]')")
        return
    plots.pareto(results, cfg.out / "pareto.png")
    for row in results["rows"]:
        if row["kind"] != STOCK:
            plan = cfg.out / (Path(row["file"]).stem + ".plan.json")
            plots.layers(plan, cfg.out / (Path(row["file"]).stem + ".layers.png"))
