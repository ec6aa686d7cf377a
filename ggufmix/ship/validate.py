"""``ggufmix validate``: does a GGUF run, and at what quality and speed, on every ggml backend device here.

Per device (enumerated through ggml's backend registry, :mod:`ggufmix.engine.backends`) one child process
loads the file with every layer there and runs the shipped prompt set (``ggufmix/data/prompts.json``); see
:mod:`ggufmix.engine.validate`. The CPU run is always made: it is what the other devices are compared with
(KL-divergence and top-1 agreement of the logits, or the cosine of the embeddings of an embedding model),
and a ``--reference`` source (the F16 the file was built from) is run on the CPU too. Memory: what
llama.cpp allocated on the device against what ``--fit`` predicts at the same context (tensor bytes + the
KV cache by :func:`ggufmix.ship.devices.kv_cache_bytes` + the compute and output buffers llama.cpp measures
on the CPU). On a GPU the prediction is for the GPU's own memory: llama.cpp keeps the input layer (the token
embedding's rows are gathered on the host) and the output buffer in host memory (``CUDA_Host``), and gives the
output layer a copy of a tied embedding; what it put in host memory is the row's ``host``. A device that fails
is a failed row with llama.cpp's reason.
"""
from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.engine.backends import Device, list_devices, select_devices
from ggufmix.engine.buffers import bytes_by_device
from ggufmix.engine.validate import RunSpec, offload_index, run_on_device
from ggufmix.errors import EngineError, InputError, UsageError
from ggufmix.evaluate.metrics import cosine_rows, divergence
from ggufmix.io.gguf_source import open_gguf
from ggufmix.ship.devices import ModelShape, kv_cache_bytes

logger = logging.getLogger(__name__)

MIN_CTX = 256
# llama.cpp's LLM_TENSOR_LAYER_INPUT tensors read by GET_ROWS (src/llama-arch.cpp): they stay in host memory
INPUT_LAYER = frozenset({"token_embd.weight", "position_embd.weight", "token_types.weight", "per_layer_token_embd.weight"})


@functools.cache
def prompt_set() -> tuple[int, tuple[str, ...]]:
    """(version, prompts) of the shipped prompt set."""
    doc = json.loads(resources.files("ggufmix.data").joinpath("prompts.json").read_text(encoding="utf-8"))
    return int(doc["version"]), tuple(doc["prompts"])


@dataclass(frozen=True)
class Agreement:
    """One run against another on the same prompts: logits (KLD, top-1) or embeddings (cosine)."""

    kld: float | None = None
    kld_p99: float | None = None
    top1: float | None = None
    cos_min: float | None = None
    cos_mean: float | None = None
    n: int = 0  # scored tokens, or prompts embedded


@dataclass(frozen=True)
class Row:
    """One device's result; ``error`` is llama.cpp's reason when it failed (then most fields are None)."""

    device: str
    kind: str
    description: str
    error: str | None = None
    offloaded: str | None = None
    used_devices: tuple[str, ...] = ()
    moved: tuple[dict[str, Any], ...] = ()
    graph_splits: str | None = None
    vs_cpu: Agreement | None = None
    vs_reference: Agreement | None = None
    prompt_tps: float | None = None
    gen_tps: float | None = None
    allocated: int | None = None  # on this device (on the CPU: every buffer)
    predicted: int | None = None
    host: int | None = None  # a GPU run's buffers in host memory (input layer, output and host compute buffers)
    buffers: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ValidateReport:
    """Everything ``validate`` found; ``to_json`` is the body of ``FILE.validate.json``."""

    path: str
    arch: str
    mode: str  # "logits" or "embeddings"
    n_ctx: int
    n_ubatch: int
    reference: str | None
    prompts_version: int
    rows: tuple[Row, ...]
    devices_seen: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def failed(self) -> tuple[Row, ...]:
        return tuple(r for r in self.rows if not r.ok)

    def to_json(self) -> dict[str, Any]:
        """The payload of the ``ggufmix.validate`` artifact (``artifacts.write_artifact`` adds format and version)."""

        def row(r: Row) -> dict[str, Any]:
            d = dict(r.__dict__)
            d["ok"] = r.ok
            for k in ("vs_cpu", "vs_reference"):
                d[k] = getattr(r, k).__dict__ if getattr(r, k) else None
            return d

        return {"file": self.path, "arch": self.arch, "mode": self.mode,
                "n_ctx": self.n_ctx, "n_ubatch": self.n_ubatch, "reference": self.reference,
                "prompts_version": self.prompts_version, "devices": list(self.devices_seen),
                "rows": [row(r) for r in self.rows]}


def validate(path: Path, *, reference: Path | None = None, backends: str = "auto", n_ctx: int = 2048,
             n_ubatch: int = 512) -> ValidateReport:
    """Run ``path`` on each chosen device and compare.

    Args:
        path: the GGUF to check.
        reference: a float source to compare with as well (run on the CPU).
        backends: ``auto`` (every device) or names/prefixes (``cpu,cuda``); the CPU runs regardless.
        n_ctx, n_ubatch: the context and physical batch llama.cpp is loaded with.

    Returns:
        The report; a device that failed is a row with ``error`` set (the caller decides the exit code).

    Raises:
        InputError: ``path`` or ``reference`` is missing or not a GGUF.
        UsageError: ``n_ctx`` below 256.
        EngineError: a backend name this llama.cpp build has no device for; the reference itself cannot run, or
            it tokenizes the prompts differently from the file.
    """
    if n_ctx < MIN_CTX:
        raise UsageError(f"--ctx {n_ctx}: validate needs at least {MIN_CTX} tokens of context")
    src = open_gguf(path, check_data=False)
    if reference is not None:
        open_gguf(reference, check_data=False)
    all_devices = list_devices()
    chosen = _devices(all_devices, select_devices(backends) if backends != "auto" else all_devices)
    mode = "embeddings" if _is_embedding(src.arch, src.metadata) else "logits"
    with tempfile.TemporaryDirectory(prefix="ggufmix-validate-") as tmp:
        work = _Work(Path(tmp), mode, n_ctx, n_ubatch, _pooling(src.arch, src.metadata))
        runs = [work.run(path, d, offload_index(all_devices, d), f"dev{d.index}") for d in chosen]
        ref = work.reference(reference, runs[0]) if reference is not None else None
        rows = tuple(work.row(d, r, runs[0], ref, _predicted(src, runs[0], n_ctx, n_ubatch, on_gpu=d.kind != "cpu"))
                     for d, r in zip(chosen, runs))
    return ValidateReport(str(path), src.arch, mode, n_ctx, n_ubatch, str(reference) if reference else None,
                          prompt_set()[0], rows, tuple(d.to_json() for d in all_devices))


def _devices(all_devices: list[Device], chosen: list[Device]) -> list[Device]:
    """The CPU first (the base of every comparison), then the chosen offload devices; ACCEL devices (BLAS ...)
    run beside the CPU, never hold the layers, so they get no row."""
    cpu = next((d for d in all_devices if d.kind == "cpu"), None)
    if cpu is None:
        raise EngineError("this llama.cpp build registers no CPU device; cannot validate")
    rest = [d for d in chosen if d.kind in ("gpu", "igpu")]
    for d in chosen:
        if d.kind == "accel":
            logger.info("%s: an accelerator llama.cpp uses beside the CPU; no row of its own", d.name)
    return [cpu, *rest]


def _is_embedding(arch: str, meta: dict[str, Any]) -> bool:
    """An encoder without a language-model head: non-causal attention or a pooling type in the header."""
    return meta.get(f"{arch}.attention.causal") is False or f"{arch}.pooling_type" in meta


def _pooling(arch: str, meta: dict[str, Any]) -> int:
    # llama.cpp's own pooling when the file names one, else mean pooling (LLAMA_POOLING_TYPE_MEAN)
    return -1 if f"{arch}.pooling_type" in meta else 1


@dataclass
class _Work:
    folder: Path
    mode: str
    n_ctx: int
    n_ubatch: int
    pooling: int

    def __post_init__(self) -> None:
        prompts = list(prompt_set()[1])
        (self.folder / "prompts.txt").write_text("\n\n".join(prompts), encoding="utf-8")
        (self.folder / "prompts.json").write_text(json.dumps(prompts), encoding="utf-8")

    def run(self, path: Path, dev: Device, main_gpu: int, tag: str) -> dict[str, Any]:
        """One child run; ``{"error": reason}`` when llama.cpp refused or crashed."""
        spec = RunSpec(str(path), dev.name, main_gpu, self.n_ctx, self.n_ubatch, str(self.folder / "prompts.txt"),
                       str(self.folder / "prompts.json"), self.mode == "embeddings", str(self.folder), tag, self.pooling)
        try:
            doc = run_on_device(spec)
        except EngineError as e:
            return {"error": str(e)}
        used = doc.get("used_devices") or []
        if main_gpu >= 0 and dev.name not in used:
            return {"error": f"{path}: llama.cpp offloaded to {', '.join(used) or 'no device'}, not {dev.name}"}
        if main_gpu < 0 and used:
            return {"error": f"{path}: llama.cpp offloaded to {', '.join(used)} on a CPU-only load"}
        return {**doc, "tag": tag}

    def reference(self, reference: Path, cpu: dict[str, Any]) -> dict[str, Any]:
        """The reference on the CPU; it must run and share the file's tokenizer.

        Raises:
            EngineError: it failed, or its tokens or vocabulary differ from the file's.
        """
        ref = self.run(reference, next(d for d in list_devices() if d.kind == "cpu"), -1, "reference")
        if "error" in ref:
            raise EngineError(f"--reference {reference}: {ref['error']}")
        if "error" not in cpu and (ref.get("tokens_sha"), ref.get("n_vocab")) != (cpu.get("tokens_sha"), cpu.get("n_vocab")):
            raise EngineError(f"--reference {reference}: it tokenizes the prompts differently from the file; "
                              "give the source the file was built from")
        return ref

    def rows(self, tag: str) -> np.ndarray:
        return np.load(self.folder / f"{tag}.rows.npy", mmap_mode="r")

    def agree(self, base: dict[str, Any], run: dict[str, Any]) -> Agreement | None:
        if "error" in base or "error" in run:
            return None
        a, b = self.rows(base["tag"]), self.rows(run["tag"])
        if self.mode == "embeddings":
            cos = cosine_rows(a, b)
            return Agreement(cos_min=float(cos.min()), cos_mean=float(cos.mean()), n=int(cos.size))
        targets = np.load(self.folder / f"{run['tag']}.targets.npy")
        d = divergence(a, b, targets)
        return Agreement(kld=d.kld.value, kld_p99=d.kld_p99, top1=d.same_top.value, n=d.n_tokens)

    def row(self, dev: Device, run: dict[str, Any], cpu: dict[str, Any], ref: dict[str, Any] | None,
            predicted: int | None) -> Row:
        head = {"device": dev.name, "kind": dev.kind, "description": dev.description}
        if "error" in run:
            return Row(**head, error=str(run["error"]))
        b = run.get("buffers")
        # on the CPU a tensor "moved" from an extra buffer type (AMX, CPU_REPACK) to plain CPU memory is no fallback
        moved = tuple(m for m in run.get("moved") or () if dev.kind != "cpu")
        allocated, host = _allocation(dev, b)
        return Row(**head, offloaded=run.get("offloaded"), used_devices=tuple(run.get("used_devices") or ()),
                   moved=moved, graph_splits=run.get("graph_splits"),
                   vs_cpu=self.agree(cpu, run), vs_reference=self.agree(ref, run) if ref else None,
                   prompt_tps=_rate(run["prompt_tokens"], run["prompt_s"]), gen_tps=_rate(run["gen_tokens"], run["gen_s"]),
                   allocated=allocated, predicted=predicted, host=host, buffers=b)


def _rate(n: int, seconds: float) -> float | None:
    return n / seconds if n and seconds > 0 else None


def _allocation(dev: Device, b: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(bytes allocated on ``dev``, bytes a GPU run put in host memory) from the run's buffer lines."""
    if not b:
        return None, None
    total = b["model"] + b["kv"] + b["compute"] + b["output"]
    if dev.kind == "cpu":
        return total, None
    on_dev = bytes_by_device(b["lines"]).get(dev.name, 0)
    return on_dev, total - on_dev


def _predicted(src: Any, cpu: dict[str, Any], n_ctx: int, n_ubatch: int, *, on_gpu: bool = False) -> int | None:
    """``--fit``'s arithmetic for this file: tensor bytes + KV cache (llama-cpp-python's ``swa_full`` default)
    + compute and output buffers as llama.cpp measured them on the CPU; None when any part is unknown.

    ``on_gpu``: the GPU's share when every layer is offloaded: without the input layer's tensors, with a copy of
    a tied embedding for the output layer, without the output buffer (both kept in host memory)."""
    b = cpu.get("buffers")
    if "error" in cpu or not b:
        return None
    try:
        kv = kv_cache_bytes(ModelShape.from_metadata(src.metadata), n_ctx, n_ubatch=n_ubatch, swa_full=True)
    except InputError:
        kv = 0 if b["kv"] == 0 else None
    if kv is None:
        return None
    weights = sum(t.n_bytes for t in src.tensors.values())
    if not on_gpu:
        return weights + kv + b["compute"] + b["output"]
    inputs = sum(t.n_bytes for name, t in src.tensors.items() if name in INPUT_LAYER)
    tied = src.tensors["token_embd.weight"].n_bytes if "token_embd.weight" in src.tensors and \
        "output.weight" not in src.tensors else 0
    return weights - inputs + tied + kv + b["compute"]


def write_report(report: ValidateReport, out: Path) -> Path:
    """``out`` (``FILE.validate.json``), atomically."""
    from ggufmix.artifacts import write_artifact

    return write_artifact(out, "validate", report.to_json())


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _cells(r: Row, mode: str) -> tuple[str, ...]:
    if not r.ok:
        return (r.device, "FAILED", str(r.error))
    moved = ", ".join(f"{m['tensors']} ({m['first']} {m['type']}) {m['from']}->{m['to']}" for m in r.moved) or "none"

    def agree(a: Agreement | None) -> tuple[str, str]:
        if a is None:
            return "-", "-"
        if mode == "embeddings":
            return _num(a.cos_min, ".5f"), _num(a.cos_mean, ".5f")
        return _num(a.kld, ".5f"), _num(None if a.top1 is None else 100 * a.top1, ".1f")

    delta = None if r.allocated is None or r.predicted is None else r.allocated - r.predicted
    return (r.device, "ok", r.offloaded or "cpu", moved, r.graph_splits or "-", *agree(r.vs_cpu),
            *agree(r.vs_reference), _num(r.prompt_tps, ".0f"), _num(r.gen_tps, ".1f"), _mib(r.allocated),
            _mib(r.predicted), "-" if delta is None else f"{delta / 2**20:+.1f}")


def format_table(report: ValidateReport) -> str:
    """The terminal table: one line per device (a failed device: its reason)."""
    emb = report.mode == "embeddings"
    pair = ("cos min", "cos mean") if emb else ("KLD", "top-1 %")
    cols = ("device", "load", "offloaded", "tensors moved", "splits", *(f"{p} cpu" for p in pair),
            *(f"{p} ref" for p in pair), "prompt tok/s", "gen tok/s", "MiB alloc", "MiB --fit", "diff")
    rows = [_cells(r, report.mode) for r in report.rows]
    good = [cols, *(c for c in rows if len(c) == len(cols))]
    widths = [max(len(c[i]) for c in good) for i in range(len(cols))]
    lines = [f"{Path(report.path).name} ({report.arch}, {report.mode}), ctx {report.n_ctx}, ubatch {report.n_ubatch}, "
             f"prompt set v{report.prompts_version}" + (f", reference {Path(report.reference).name}" if report.reference else ""), ""]
    for c in good[:1] + rows:
        lines.append("  ".join(x.ljust(w) for x, w in zip(c, widths)) if len(c) == len(cols) else "  ".join(c))
    return "\n".join(lines)


def card_section(report: ValidateReport) -> list[str]:
    """The model card's "Validated on" section (Markdown)."""
    emb = report.mode == "embeddings"
    head = ("cosine min vs CPU" if emb else "KLD vs CPU", "cosine min vs source" if emb else "KLD vs source",
            "" if emb else "top-1 vs source")
    lines = ["## Validated on", "", f"`ggufmix validate` (prompt set v{report.prompts_version}, ctx {report.n_ctx}):", "",
             f"| device | load | {head[0]} | {head[1]} |{' ' + head[2] + ' |' if head[2] else ''} prompt tok/s | "
             "gen tok/s | MiB allocated | MiB predicted |",
             "|---|---|---|---|" + ("---|" if head[2] else "") + "---|---|---|---|"]
    for r in report.rows:
        if not r.ok:
            lines.append(f"| {r.device} ({r.description}) | failed: {str(r.error)[:200]} |")
            continue
        a, b = r.vs_cpu, r.vs_reference
        val = (lambda x: _num(x.cos_min if x else None, ".5f")) if emb else (lambda x: _num(x.kld if x else None, ".5f"))
        top = "" if emb else f" {_num(100 * b.top1 if b and b.top1 is not None else None, '.1f')} |"
        lines.append(f"| {r.device} ({r.description}) | ok | {val(a)} | {val(b)} |{top} {_num(r.prompt_tps, '.0f')} | "
                     f"{_num(r.gen_tps, '.1f')} | {_mib(r.allocated)} | {_mib(r.predicted)} |")
    return [*lines, ""]


def failure(report: ValidateReport) -> EngineError | None:
    """The error that ends ``validate`` with exit code 4 when a device failed (None when all ran)."""
    bad = report.failed
    if not bad:
        return None
    return EngineError(f"{report.path}: failed on {len(bad)} of {len(report.rows)} devices ("
                       + "; ".join(f"{r.device}: {str(r.error)[:160]}" for r in bad) + ")")


def validate_file(path: Path, *, json_out: Path | None = None, **kw: Any) -> ValidateReport:
    """:func:`validate`, then ``FILE.validate.json`` (or ``json_out``) beside it."""
    report = validate(path, **kw)
    write_report(report, json_out or path.with_name(path.name.removesuffix(".gguf") + ".validate.json"))
    return report
