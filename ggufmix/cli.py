"""The command line: each command validates its flags and calls one library function."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ggufmix import __version__
from ggufmix.artifacts import write_text_atomic
from ggufmix.bench.bench import BenchConfig, run_bench
from ggufmix.engine.activations import collect_imatrix
from ggufmix.errors import GgufmixError, UsageError
from ggufmix.evaluate.evaluation import evaluate, format_table
from ggufmix.inspect_gguf import format_inspect, inspect_gguf
from ggufmix.io.gguf_source import open_gguf
from ggufmix.io.hf import HfOptions, copy_converted, resolve_model
from ggufmix.io.imatrix import write_imatrix_gguf
from ggufmix.io.text import read_text
from ggufmix.layout.groups import group_lines
from ggufmix.plan.budget import Budget, parse_budget
from ggufmix.plan.plan import Plan
from ggufmix.plan.planner import make_plan, parse_pin
from ggufmix.plan.speed import DEFAULT_SPEED_TRADEOFF
from ggufmix.realize.build import check_output, versions
from ggufmix.realize.compensate import GPTQ_CHUNKS, GptqOptions
from ggufmix.realize.smooth import SmoothOptions
from ggufmix.realize.overrides import recipe as tensor_type_file
from ggufmix.score.base import scorers
from ggufmix.score.cluster import check_ray
from ggufmix.score.oracle import parse_oracle
from ggufmix.score.measure import ScoreOptions, load_imatrix, open_source, score_source
from ggufmix.scores import Scores
from ggufmix.ship import deliver as ship
from ggufmix.ship.devices import resolve_fit
from ggufmix.ship.fit import FitSettings, fit_report
from ggufmix.ship.palettes import palette_types
from ggufmix.ship.validate import failure, validate_file
from ggufmix.ship.validate import format_table as validate_table
from ggufmix.types import parse_type

logger = logging.getLogger("ggufmix")

_path = click.Path(path_type=Path)


@click.group()
@click.version_option(__version__, prog_name="ggufmix")
@click.option("--debug", is_flag=True, help="Show tracebacks and llama.cpp's log.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool) -> None:
    """Mixed-precision GGUF: every tensor its own llama.cpp quantization type, to a size budget."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = {"debug": debug, "progress": not quiet and sys.stderr.isatty()}


def _score_opts(strategy: str, imatrix: Path | None, rows: int, threads: int, allow_requantize: bool,  # noqa: ANN202
                calib: Path | None = None, calib_chunks: int | None = None, ray: str | None = None,
                oracle: str | None = None, assume_imatrix: bool = False, measuring: bool = True):
    """The scoring flags as ScoreOptions; ``measuring`` False (``--scores`` given): no --calib needed, the
    saved scores say what they were measured on."""
    if strategy not in scorers():
        raise click.BadParameter(f"{strategy!r}; choose from {', '.join(sorted(scorers()))}", param_hint="--strategy")
    if scorers()[strategy].activations and calib is None and measuring:
        raise click.UsageError(f"--strategy {strategy} ranks blocks by their activations: give --calib TEXT")
    if ray is not None:
        check_ray(ray)  # a missing extra or an unreachable cluster fails now, not after the conversion
    chunks = calib_chunks or ScoreOptions.calib_chunks
    return ScoreOptions(strategy, imatrix, rows, threads, allow_requantize, calib, chunks, ray,
                        oracle=parse_oracle(oracle) if oracle else None, assume_imatrix=assume_imatrix)


def _palette(types: str | None, palette: str | None, arch: str, pins=(), fit: str | None = None):  # noqa: ANN001, ANN202
    """--types and --palette NAME (a --fit device's own palette when not given) as the planner's types."""
    chosen = None if not types else tuple(parse_type(t) for t in types.split(",") if t.strip())
    if palette is None and fit is not None:
        palette = resolve_fit(fit).palette
    planned, why = palette_types(chosen, palette, arch, pins)
    if why:
        click.echo(f"palette {palette}: {why}")
    return planned


_score_options = [
    click.option("--strategy", default="measured", show_default=True, help="Scorer (measured, uniform, ...)."),
    click.option("--imatrix", type=_path, help="Importance matrix (llama-imatrix GGUF or legacy .dat)."),
    click.option("--rows", default=128, show_default=True, help="Rows sampled per tensor when measuring."),
    click.option("--threads", default=2, show_default=True,
                 help="Scoring threads (processes for ewq, ewq-norm and zd, where the OS forks)."),
    click.option("--allow-requantize", is_flag=True, help="Accept an already-quantized source (loses quality)."),
    click.option("--calib", type=_path, help="Calibration text for strategies that rank blocks by activations "
                                             "(lim, lieq and their measured+ hybrids); build also smooths "
                                             "the head's and blocks' inputs on it (--smooth) and --gptq needs it."),
    click.option("--calib-chunks", type=click.IntRange(1),
                 help="512-token chunks of --calib to run (default 8; 32 for build --gptq)."),
    click.option("--ray", "ray", is_flag=False, flag_value="local", metavar="[ADDRESS]",
                 help="Score each tensor as a Ray task: 'auto', a cluster ADDRESS (host:port), or no value to start "
                      "a local cluster of --threads workers (pip install 'ggufmix[cluster]'). Give it after MODEL."),
    click.option("--oracle", help="--strategy kld: chunks=N,ctx=N,start=N,types=N,threads=N of the KLD oracle "
                                  "(unset: chunks 4, ctx 512, start 64, types 4, all threads; no --oracle: chunks = --calib-chunks)."),
]
_plan_options = [
    click.option("--budget", help="Target: 3.0bpw, 90MB, 85MiB, 1.2GB ... (tensor data)."),
    click.option("--types", help="Comma-separated palette, e.g. Q4_K,Q5_K,Q6_K,Q8_0."),
    click.option("--palette", type=click.Choice(["ollama", "cuda", "metal", "vulkan", "adreno", "cpu-arm"]),
                 help="Only types this runtime or llama.cpp backend runs (ollama: no IQ types where Ollama's own "
                      "engine runs the model; cuda/metal/vulkan/adreno: the backend's MUL_MAT kernels, "
                      "data/backends.json). Default with --fit DEVICE: the device's palette."),
    click.option("--pin", "pins", multiple=True, help="REGEX=TYPE: fix matching tensors (repeatable)."),
    click.option("--speed-tradeoff", default=DEFAULT_SPEED_TRADEOFF, show_default=True, type=click.FloatRange(0, 1),
                 help="Predicted error (a fraction) the plan may give up for a faster llama.cpp quantize (IQ types "
                      "take 3-10x longer to write than K types), each 1% of it for at least 10% of the time at 0.02 "
                      "(1% at 0.2). 0: the least error, whatever the time."),
]


_hf_options = [
    click.option("--revision", help="Hub MODEL: branch, tag or commit (default: main)."),
    click.option("--outtype", type=click.Choice(["f16", "bf16", "f32"]),
                 help="Hugging Face MODEL: convert to this float type (default: bf16 for a bfloat16 checkpoint, else f16)."),
    click.option("--llama-cpp-dir", type=_path, help="llama.cpp checkout whose convert_hf_to_gguf.py to use "
                                                    "(default: $GGUFMIX_LLAMA_CPP, else fetched for the installed llama-cpp-python)."),
]


def _gguf(model: Path, revision: str | None, outtype: str | None, llama_cpp_dir: Path | None, progress: bool) -> Path:
    """MODEL as a GGUF path: a Hugging Face folder or hub id is converted (once; the result is cached)."""

    return resolve_model(model, HfOptions(revision, outtype, llama_cpp_dir, progress))


def _apply(options):  # noqa: ANN001, ANN202
    def deco(fn):  # noqa: ANN001, ANN202
        for opt in reversed(options):
            fn = opt(fn)
        return fn
    return deco


_fit_options = [
    click.option("--fit", help="Derive the budget from a device's memory: a size (100MB, 4GB) or a profile "
                               "(rpi5-8gb, iphone15, mac-16gb ...; see ggufmix/data/devices.json)."),
    click.option("--ctx", "n_ctx", default=2048, show_default=True, type=click.IntRange(1),
                 help="With --fit: context the KV cache holds."),
    click.option("--ubatch", default=512, show_default=True, type=click.IntRange(1),
                 help="With --fit: llama.cpp's n_ubatch (compute buffer)."),
    click.option("--kv-type", default="f16", show_default=True, help="With --fit: KV cache type (f16, q8_0 ...)."),
    click.option("--swa-full", is_flag=True, help="With --fit: sliding-window layers keep the whole context (llama.cpp "
                 "--swa-full, llama-cpp-python's default); otherwise they hold the window, as llama-server and Ollama do."),
]


@cli.command()
@click.argument("model", type=_path)
@click.option("-o", "--output", type=_path, help="Output .gguf (or --bundle).")
@_apply(_score_options + _plan_options + _fit_options)
@click.option("--bundle", type=_path, help="Write a folder: model.gguf, Modelfile, README.md, recipe, plan, SHA256SUMS.")
@click.option("--ollama", "ollama_name", help="With --bundle: ollama create NAME (or print the commands).")
@click.option("--push", "push_repo", metavar="REPO", help="With --bundle: upload it to this Hugging Face model repo "
              "(owner/name; HF_TOKEN or `hf auth login`; HF_ENDPOINT for another hub).")
@click.option("--private", is_flag=True, help="With --push: create the repository private.")
@click.option("--eval-text", type=_path, help="Evaluate the result against MODEL on this text (numbers in the card).")
@click.option("--scores", "scores_path", type=_path, help="Reuse a scores.json instead of measuring.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--no-smoke", is_flag=True, help="Skip the generation smoke test.")
@click.option("--validate", "run_validate", is_flag=True,
              help="Run `ggufmix validate` on the result (every ggml device, against MODEL); exit 4 if a device fails.")
@click.option("--search-minutes", default=0.0, show_default=True, type=click.FloatRange(0),
              help="--strategy kld: refine the plan end to end (byte-neutral swaps measured by the oracle) this long.")
@click.option("--gptq", is_flag=True, help="GPTQ-style error feedback: each weight block's rounding error is cancelled "
              "by the blocks after it (K types, IQ4_XS and Q8_0: each column's, by the columns after it), using the "
              "inputs' covariance on --calib (32 chunks unless --calib-chunks). "
              "llama.cpp's own quantizer and the same file format. ffn_down is rounded plainly (see --gptq-all).")
@click.option("--gptq-all", is_flag=True, help="With --gptq: compensate ffn_down too (its wide input: 2.9x the feedback's "
              "time on Qwen2.5-Coder-1.5B for no gain, 3-9% lower KLD on SmolLM2-135M; docs/results.md).")
@click.option("--smooth/--no-smooth", default=None,
              help="Turn down the loud input channels that llama.cpp's CPU backend rounds coarsely and scale the "
              "columns that read them up: the same logits, the scales chosen on --calib. The output head's (untied; "
              "Qwen2.5-Coder-1.5B at Q5_K_M's size 0.00667 -> 0.00553 mean KLD) and, where that lowers their output "
              "error on held-out calibration rows, each block's attention and FFN inputs and ffn_down's (SmolLM2-135M "
              "at Q4_K_M's size 0.0416 -> 0.0366). On whenever --calib is given.")
@click.option("--smooth-ffn/--no-smooth-ffn", default=None,
              help="With --smooth (the default): whether ffn_down's input is a candidate (ffn_up's rows divided).")
@click.option("--smooth-head/--no-smooth-head", "smooth_head", default=None, hidden=True)  # --smooth before 2026-12-06
@click.option("--search-rounding", is_flag=True,
              help="Search each Q4_1, Q5_1, Q4_K and Q5_K block's scales for less imatrix-weighted error than "
              "llama.cpp's own quantizer leaves, block by block (the same format): at Q5_K_M's size 4-10% lower KLD "
              "on most held-out texts, for 1-4 minutes more on SmolLM2-135M and 23 on Qwen2.5-Coder-1.5B "
              "(2 cores; docs/results.md).")
@_apply(_hf_options)
@click.pass_context
def build(ctx: click.Context, model: Path, output: Path | None, strategy: str, imatrix: Path | None, rows: int,
          threads: int, allow_requantize: bool, calib: Path | None, calib_chunks: int | None, ray: str | None,
          oracle: str | None,
          budget: str | None,
          types: str | None, palette: str | None, pins: tuple[str, ...], speed_tradeoff: float,
          fit: str | None, n_ctx: int, ubatch: int, kv_type: str, swa_full: bool, bundle: Path | None,
          ollama_name: str | None, push_repo: str | None, private: bool, eval_text: Path | None,
          scores_path: Path | None, force: bool, no_smoke: bool, run_validate: bool, search_minutes: float,
          gptq: bool, gptq_all: bool, smooth: bool | None, smooth_ffn: bool | None, smooth_head: bool | None,
          search_rounding: bool, revision: str | None,
          outtype: str | None, llama_cpp_dir: Path | None) -> None:
    """Build MODEL into a mixed-precision GGUF that fits --budget or --fit.

    MODEL is an F32/F16/BF16 GGUF, a Hugging Face folder (config.json + safetensors) or a hub id
    (owner/name), which llama.cpp's converter turns into a float GGUF first (cached).
    """
    if (budget is None) == (fit is None):
        raise click.UsageError("give one of --budget (size or bpw of the weights) or --fit (memory of a device)")
    try:
        delivery = ship.Delivery(output, bundle, ollama_name, push_repo, private, eval_text, force,
                                 validate_ctx=max(n_ctx, 256) if run_validate else None)
    except UsageError as e:
        raise click.UsageError(str(e)) from None  # a combination of flags: click shows it with the usage line
    opts = _score_opts(strategy, imatrix, rows, threads, allow_requantize, calib, calib_chunks, ray, oracle,
                       measuring=scores_path is None)
    if gptq and calib is None:
        raise click.UsageError("--gptq measures each weight's inputs on calibration text: give --calib TEXT")
    if gptq_all and not gptq:
        raise click.UsageError("--gptq-all widens --gptq: give --gptq too")
    compensation = (GptqOptions(read_text(calib), calib_chunks or GPTQ_CHUNKS, every_role=gptq_all)
                    if gptq and calib else None)
    smooth = smooth_head if smooth is None else smooth
    if (smooth or smooth_ffn) and calib is None:
        raise click.UsageError("--smooth and --smooth-ffn pick their scales on calibration text: give --calib TEXT")
    if smooth_ffn and smooth is False:
        raise click.UsageError("--smooth-ffn widens --smooth: drop --no-smooth")
    smoothing = (SmoothOptions(read_text(calib), ffn=smooth_ffn is not False) if smooth is not False and calib
                 else None)
    model = _gguf(model, revision, outtype, llama_cpp_dir, ctx.obj["progress"])
    meta = open_gguf(model, check_data=False).metadata
    pin_list = [parse_pin(p) for p in pins]
    recipe = ship.Recipe(_palette(types, palette, str(meta.get("general.architecture", "unknown")), pin_list, fit),
                         pin_list, Scores.load(scores_path) if scores_path else None, not no_smoke, search_minutes,
                         compensation, speed_tradeoff, smoothing, search_rounding)
    target = _fit_settings(fit, n_ctx, ubatch, kv_type, swa_full) if fit else parse_budget(budget)
    done = ship.deliver(model, meta, target, delivery, opts=opts, recipe=recipe, progress=ctx.obj["progress"])
    _print_delivered(done)


def _print_delivered(done: ship.Delivered) -> None:
    res, v = done.result, done.result.verified
    click.echo(f"wrote {done.path}: {v.total_bytes / 1e6:.2f} MB tensor data, {v.bpw:.4f} bpw "
               f"(budget {res.plan.budget}), {v.n_tensors} tensors verified")
    click.echo("types by bytes: " + ", ".join(f"{k} {b / 1e6:.1f}MB" for k, b in res.plan.type_histogram().items()))
    _echo_speed(res.plan)
    click.echo("seconds: " + ", ".join(f"{k} {s:.1f}" for k, s in res.seconds.items()))
    for line in done.fit_lines or ():
        click.echo(line)
    if done.quality:
        q = done.quality
        click.echo(f"quality: PPL {q['ppl']:.3f} (source {q['base_ppl']:.3f}), mean KLD {q['kld']:.4f}, "
                   f"same top-1 {100 * q['top1']:.2f}%")
    if res.smoke is not None:
        click.echo(f"smoke test: {res.smoke!r}")
    if done.validation is not None:
        click.echo(validate_table(done.validation))
    if done.bundle:
        click.echo(f"bundle: {done.bundle}/ (check with: cd {done.bundle} && sha256sum -c SHA256SUMS)")
    for line in done.warnings:
        click.echo(f"warning: {line}", err=True)
    for line in done.notes:
        click.echo(line)
    err = failure(done.validation) if done.validation is not None else None
    if err:
        raise err


def _echo_speed(plan: Plan) -> None:
    """What --speed-tradeoff did to the plan, when it did anything."""
    speed = plan.settings.get("speed") or {}
    if speed.get("quantize_seconds", 0) < speed.get("least_error_quantize_seconds", 0):
        click.echo(f"speed: {100 * speed['error_given_up']:.2f}% more predicted error for "
                   f"{speed['quantize_seconds'] / speed['least_error_quantize_seconds']:.0%} of the least-error plan's "
                   f"quantize time (--speed-tradeoff {speed['tradeoff']:g}; 0 turns it off)")


def _fit_settings(fit: str, n_ctx: int, ubatch: int, kv_type: str, swa_full: bool) -> FitSettings:
    return FitSettings(resolve_fit(fit), n_ctx, ubatch, kv_type, swa_full)


@cli.command()
@click.argument("bundle", type=_path)
@click.argument("repo")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.pass_context
def push(ctx: click.Context, bundle: Path, repo: str, private: bool) -> None:
    """Upload a --bundle folder to the Hugging Face model repository REPO (owner/name), checked file by file
    against its SHA256SUMS before and by model.gguf's SHA-256 on the hub after."""

    click.echo(ship.push(bundle, repo, private, f"ggufmix bundle {bundle.name}", ctx.obj["progress"]))


@cli.command()
@click.argument("model", type=_path)
@click.option("-o", "--output", type=_path, required=True, help="scores.json to write.")
@_apply(_score_options + _hf_options)
@click.option("--assume-imatrix", is_flag=True,
              help="Also score the types llama.cpp writes only with an importance matrix (IQ1_S, IQ1_M, IQ2_XXS, "
                   "IQ2_XS ...; planning 1.8 bpw needs them) before you have one (uniform, fastewq); building such a "
                   "plan then needs --imatrix.")
@click.pass_context
def score(ctx: click.Context, model: Path, output: Path, strategy: str, imatrix: Path | None, rows: int,
          threads: int, allow_requantize: bool, calib: Path | None, calib_chunks: int | None, ray: str | None,
          oracle: str | None, revision: str | None, outtype: str | None, llama_cpp_dir: Path | None,
          assume_imatrix: bool) -> None:
    """Measure every tensor of MODEL (GGUF, Hugging Face folder or hub id) once; plan any budget from the result."""

    opts = _score_opts(strategy, imatrix, rows, threads, allow_requantize, calib, calib_chunks, ray, oracle,
                       assume_imatrix)
    src = open_source(_gguf(model, revision, outtype, llama_cpp_dir, ctx.obj["progress"]), allow_requantize,
                      check_data=scorers()[strategy].reads_weights)
    scores = score_source(src, opts, load_imatrix(imatrix, src), ctx.obj["progress"])
    scores.save(output)
    click.echo(f"wrote {output}: {len(scores.tensors)} tensors scored with {strategy}")


@cli.command()
@click.argument("scores_file", type=_path)
@_apply(_plan_options + _fit_options)
@click.option("-o", "--output", type=_path, required=True, help="plan.json to write.")
@click.option("--recipe", type=_path, help="Also write a llama-quantize --tensor-type-file.")
def plan(scores_file: Path, budget: str | None, types: str | None, palette: str | None, pins: tuple[str, ...],
         speed_tradeoff: float, fit: str | None, n_ctx: int, ubatch: int, kv_type: str, swa_full: bool, output: Path,
         recipe: Path | None) -> None:
    """Plan a budget from saved scores (instant); with --fit, show the memory arithmetic behind the budget."""
    if (budget is None) == (fit is None):
        raise click.UsageError("give one of --budget or --fit")
    scores = Scores.load(scores_file)
    if fit is not None:
        report = fit_report(Path(scores.source["path"]), None, _fit_settings(fit, n_ctx, ubatch, kv_type, swa_full))
        click.echo("\n".join(report.lines()))
        target = Budget(max(report.weights_bytes, 1), "b", at_most=True)
    else:
        target = parse_budget(budget)
    pins_ = [parse_pin(x) for x in pins]
    p = make_plan(scores, target, types=_palette(types, palette, scores.layout.arch, pins_, fit),
                  pins=pins_, speed_tradeoff=speed_tradeoff).with_versions(versions())
    p.save(output)
    if recipe:
        write_text_atomic(recipe, tensor_type_file(p))
    click.echo(f"wrote {output}: {p.total_bytes / 1e6:.2f} MB, {p.bpw:.4f} bpw (budget {p.budget})")
    click.echo("\n".join(group_lines(p.by_group(), p.total_bytes)))
    _echo_speed(p)
    need = p.needing_imatrix()
    if need and scores.settings.get("imatrix") is None:
        kinds = ", ".join(sorted({e.qtype.name for e in need}))
        click.echo(f"needs an imatrix: {len(need)} tensors at {kinds} (scored with --assume-imatrix); "
                   "build with --imatrix FILE")


@cli.command()
@click.argument("model", type=_path)
@click.option("-o", "--output", type=_path, help="Also copy the converted GGUF here (default: only the cache).")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@_apply(_hf_options)
@click.pass_context
def convert(ctx: click.Context, model: Path, output: Path | None, force: bool, revision: str | None,
            outtype: str | None, llama_cpp_dir: Path | None) -> None:
    """Convert a Hugging Face folder or hub id to a float GGUF with llama.cpp's converter (cached)."""

    gguf_path = _gguf(model, revision, outtype, llama_cpp_dir, ctx.obj["progress"])
    if output is not None:
        check_output(output, [gguf_path], force)
        copy_converted(gguf_path, output)
    click.echo(f"wrote {output or gguf_path}")


@cli.command()
@click.argument("model", type=_path)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(model: Path, as_json: bool) -> None:
    """Per tensor: name, shape, type, bytes, bpw; totals."""

    info = inspect_gguf(model)
    click.echo(json.dumps(info, indent=1) if as_json else format_inspect(info))


@cli.command("eval")
@click.argument("base", type=_path)
@click.argument("quants", type=_path, nargs=-1)
@click.option("--text", "text_file", type=_path, required=True, help="Evaluation text (not the calibration text).")
@click.option("--ctx", "n_ctx", default=512, show_default=True, help="Tokens per chunk (llama-perplexity -c).")
@click.option("--chunks", type=int, help="Chunks to score (default: all the text holds).")
@click.option("--exact", is_flag=True, help="Full-vocabulary KLD in lock-step, no base cache (slower).")
@click.option("--threads", type=int, help="llama.cpp threads (default: all cores).")
@click.option("--gpu-layers", default=0, show_default=True, help="Layers to offload (Metal/CUDA builds; -1: all).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.pass_context
def eval_(ctx: click.Context, base: Path, quants: tuple[Path, ...], text_file: Path, n_ctx: int,
          chunks: int | None, exact: bool, threads: int | None, gpu_layers: int, as_json: bool) -> None:
    """Perplexity of BASE and QUANTS, and each QUANT's KL-divergence and top-1 agreement against BASE.

    With several QUANTS, each later one's KLD is also given against the first's, paired on the same tokens: its
    error is the difference's, smaller than either file's own (each token's difficulty cancels)."""

    report = evaluate(base, list(quants), read_text(text_file), ctx=n_ctx, chunks=chunks, cache=not exact,
                      n_threads=threads, progress=ctx.obj["progress"], n_gpu_layers=gpu_layers)
    click.echo(json.dumps(report.to_json(), indent=1, default=str) if as_json else format_table(report))


@cli.command()
@click.argument("file", type=_path)
@click.option("--reference", type=_path, help="Also compare with this source (the F16 the file was built from), on the CPU.")
@click.option("--backends", default="auto", show_default=True,
              help="ggml devices to run on: auto (all) or names/prefixes, e.g. cpu,cuda; the CPU always runs.")
@click.option("--ctx", "n_ctx", default=2048, show_default=True, help="Context llama.cpp is loaded with.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
def validate(file: Path, reference: Path | None, backends: str, n_ctx: int, as_json: bool) -> None:
    """Run FILE on every ggml backend device: load, fallbacks, KLD/top-1 against the CPU (and --reference),
    speed, memory against --fit; writes FILE.validate.json. Exit code 4 when a device fails."""
    report = validate_file(file, reference=reference, backends=backends, n_ctx=n_ctx)
    click.echo(json.dumps(report.to_json(), indent=1) if as_json else validate_table(report))
    err = failure(report)
    if err:
        raise err


@cli.command()
@click.argument("model", type=_path)
@click.option("--text", "text_file", type=_path, required=True, help="Calibration text.")
@click.option("-o", "--output", type=_path, required=True, help="imatrix.gguf to write (llama-imatrix format).")
@click.option("--ctx", "n_ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, help="Chunks to run (default: all the text holds).")
@_apply(_hf_options)
@click.pass_context
def imatrix(ctx: click.Context, model: Path, text_file: Path, output: Path, n_ctx: int, chunks: int | None,
            revision: str | None, outtype: str | None, llama_cpp_dir: Path | None) -> None:
    """Compute an importance matrix for MODEL on calibration text (llama-imatrix's statistic and format)."""

    model = _gguf(model, revision, outtype, llama_cpp_dir, ctx.obj["progress"])
    im = collect_imatrix(model, read_text(text_file), n_ctx=n_ctx, n_chunks=chunks,
                         progress=ctx.obj["progress"], dataset=text_file.name)
    write_imatrix_gguf(output, im)
    click.echo(f"wrote {output}: {len(im)} matrices, {im.chunk_count} chunks of {im.chunk_size} tokens")


@cli.command()
@click.argument("model", type=_path)
@click.option("--text", "text_file", type=_path, required=True, help="Evaluation text (never the calibration text).")
@click.option("--budgets", default="", help="ggufmix budgets in bpw, comma-separated, e.g. 4.5,5,5.5.")
@click.option("--baselines", default="Q2_K,Q4_K_M", show_default=True, help="Stock llama-quantize mixes.")
@click.option("--strategies", default="measured,uniform", show_default=True, help="ggufmix strategies to build.")
@click.option("--calib", type=_path, help="Calibration text: adds every file again with an imatrix computed on it.")
@click.option("--imatrix-chunks", default=32, show_default=True, help="Chunks of --calib for the imatrix.")
@click.option("--modes", default="none,imatrix", show_default=True,
              help="Which imatrix modes to run (imatrix needs --calib; none alone still uses --calib for lim/lieq).")
@click.option("--ctx", "n_ctx", default=512, show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=int, help="Evaluation chunks (default: all the text holds).")
@click.option("--exact", is_flag=True, help="Full-vocabulary KLD (the base runs again for every file).")
@click.option("-o", "--output", type=_path, default=Path("bench"), show_default=True, help="Output folder.")
@click.option("--oracle", help="kld: the oracle's chunks=N,ctx=N,start=N,types=N,threads=N (see build --oracle).")
@click.option("--search-minutes", default=0.0, show_default=True, type=click.FloatRange(0),
              help="kld: refine each plan end to end this long.")
@click.option("--gptq-chunks", default=0, show_default=True, type=click.IntRange(0),
              help="Also build every ggufmix file with build --gptq on this many chunks of --calib (0: not).")
@click.option("--gptq-all", is_flag=True, help="Those files with build --gptq --gptq-all (ffn_down compensated too).")
@click.option("--smooth", is_flag=True, help="Also build every ggufmix file (and --gptq file) with build --smooth "
              "on --calib (where it has something to smooth: an untied head, a pre-norm block).")
@click.pass_context
def bench(ctx: click.Context, model: Path, text_file: Path, budgets: str, baselines: str, strategies: str,
          calib: Path | None, imatrix_chunks: int, modes: str, n_ctx: int, chunks: int | None, exact: bool,
          output: Path, oracle: str | None, search_minutes: float, gptq_chunks: int, gptq_all: bool,
          smooth: bool) -> None:
    """Stock llama.cpp mixes against ggufmix at equal sizes: results.json, results.md, pareto.png."""

    try:
        bpws = tuple(float(b) for b in budgets.replace("bpw", "").split(",") if b.strip())
    except ValueError:
        raise click.BadParameter(f"{budgets!r}: expected numbers such as 4.5,5,5.5", param_hint="--budgets") from None
    cfg = BenchConfig(model, text_file, output, bpws, _names(baselines), _names(strategies), calib, imatrix_chunks,
                      n_ctx, chunks, exact, ctx.obj["progress"], _names(modes),
                      parse_oracle(oracle) if oracle else None, search_minutes, gptq_chunks, gptq_all, smooth)
    run_bench(cfg)
    click.echo((output / "results.md").read_text(), nl=False)


def _names(csv: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in csv.split(",") if x.strip())


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so `kill` cleans up like Ctrl-C: temporary files are removed on the way out


def main() -> None:
    """Entry point: one line and a non-zero exit for user errors; tracebacks only with --debug."""
    import signal

    debug = "--debug" in sys.argv[1:]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("ggufmix: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except GgufmixError as e:
        if debug:
            raise
        click.echo(f"ggufmix: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("ggufmix: interrupted", err=True)
        sys.exit(130)
