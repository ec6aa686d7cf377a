"""One backend device's run of ``ggufmix validate``, in a child process so that a crash is a failed row.

The parent (:mod:`ggufmix.ship.validate`) calls :func:`run_on_device` once per ggml device; the child
(``python -m ggufmix.engine.validate SPEC.json``) loads the file with every layer on that device
(``--split-mode none --main-gpu K -ngl all``, or no offload device at all for the CPU), runs the prompt text
through :class:`~ggufmix.engine.logits.LogitsModel` (the same chunked log-softmax rows as ``ggufmix eval``) or,
for an embedding model, embeds each prompt, times a greedy generation, and reads llama.cpp's own log:

- ``using device CUDA0 (...)``: the device llama.cpp really offloaded to (checked against the one asked for);
- ``offloaded N/M layers to GPU``;
- ``tensor 'X' (q4_K) (and K others) cannot be used with preferred buffer type CUDA0, using CPU instead``:
  weights the device's buffer type refused (llama_model_loader::done_getting_tensors; a DEBUG line);
- ``graph: nodes = N, splits = S`` (``pp / tg`` when the prompt and generation graphs differ): more than one
  split on an all-offloaded model means some ops ran on another backend;
- ``... model|KV|compute|output buffer size = X MiB``: what was allocated (:mod:`ggufmix.engine.buffers`).

The rows (float32 log-probabilities or embeddings) are written to ``.npy`` files in the work folder the parent
gives; the maths that compares them lives in :mod:`ggufmix.evaluate.metrics`.
"""
from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.engine.backends import Device
from ggufmix.engine.buffers import parse_buffers
from ggufmix.engine.isolated import reply, run_child
from ggufmix.engine.llamalib import _LISTENERS, last_error, llama
from ggufmix.errors import EngineError, GgufmixError

_USING = re.compile(r"using device (\S+) \(")
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_MOVED = re.compile(r"tensor '([^']+)' \((\w+)\) \(and (\d+) others\) cannot be used with preferred buffer type "
                    r"(\S+), using (\S+) instead")
_SPLITS = re.compile(r"graph(?: \([^)]*\))?: nodes = [\d /]+, splits = (\d+(?: / \d+)?)")
CHUNK = 128       # tokens per scored chunk (perplexity.cpp's layout: the second half of each chunk is scored)
GEN_TOKENS = 32   # greedy tokens timed for the generation speed
TIMEOUT_S = 900.0


@dataclass(frozen=True)
class RunSpec:
    """What one child run does (written as JSON for the child).

    Attributes:
        path: the GGUF.
        device: registry name of the device ("CPU", "CUDA0").
        main_gpu: index among llama.cpp's offload devices; -1 for the CPU.
        n_ctx, n_ubatch: context and physical batch of the load (the memory ``--fit`` predicts is for these).
        text_file: the prompts joined by blank lines (causal models).
        prompts_file: JSON list of prompts (embedding models).
        embedding: embed each prompt instead of scoring logits.
        out_dir: where the child writes its ``.npy`` rows.
        tag: file-name prefix of those rows.
        pooling: llama.cpp pooling type for embeddings (-1: the file's own; 1: mean, for files that set none).
    """

    path: str
    device: str
    main_gpu: int
    n_ctx: int
    n_ubatch: int
    text_file: str
    prompts_file: str
    embedding: bool
    out_dir: str
    tag: str
    pooling: int = -1


def offload_index(devices: list[Device], dev: Device) -> int:
    """``main_gpu`` for ``dev``: its position in llama.cpp's list of offload devices (``llama_model_load_from_file_impl``:
    GPUs in registry order, integrated GPUs only when there is no GPU, CPU and ACCEL never); -1 for the CPU.

    Raises:
        EngineError: an ACCEL device (llama.cpp uses those beside the CPU, never as the place of the layers).
    """
    if dev.kind == "cpu":
        return -1
    if dev.kind == "accel":
        raise EngineError(f"{dev.name}: an accelerator llama.cpp runs beside the CPU, not a device to offload to")
    gpus = [d for d in devices if d.kind == "gpu"]
    pool = gpus if gpus else [d for d in devices if d.kind == "igpu"]
    return pool.index(dev)


def run_on_device(spec: RunSpec) -> dict[str, Any]:
    """Run ``spec`` in a child process.

    Returns:
        The child's report (see :func:`_run`).

    Raises:
        EngineError: llama.cpp refused the file on that device, crashed, or ran past the time limit.
    """
    spec_file = Path(spec.out_dir) / f"{spec.tag}.spec.json"
    spec_file.write_text(json.dumps(spec.__dict__))
    return run_child("ggufmix.engine.validate", [str(spec_file)], f"{spec.path} on {spec.device}",
                     f"loading and running it on {spec.device}", timeout=TIMEOUT_S, hint="")


def read_log(lines: list[str]) -> dict[str, Any]:
    """What llama.cpp's log says about where the model went (see the module docstring)."""
    text = "".join(lines)
    offloaded = _OFFLOADED.findall(text)
    splits = _SPLITS.findall(text)
    return {"used_devices": _USING.findall(text),
            "offloaded": f"{offloaded[-1][0]}/{offloaded[-1][1]}" if offloaded else None,
            "moved": [{"first": m[0], "type": m[1], "tensors": int(m[2]) + 1, "from": m[3], "to": m[4]}
                      for m in _MOVED.findall(text)],
            "graph_splits": splits[-1] if splits else None}


def _placement(spec: RunSpec) -> Any:
    from ggufmix.engine.logits import Placement

    gpu = spec.main_gpu >= 0
    return Placement(n_ctx=spec.n_ctx, n_batch=max(spec.n_ubatch, CHUNK), n_ubatch=spec.n_ubatch,
                     n_gpu_layers=-1 if gpu else 0, main_gpu=spec.main_gpu, single_device=True, use_mmap=False)


def _logits(spec: RunSpec, lines: list[str]) -> dict[str, Any]:
    from ggufmix.engine.logits import LogitsModel, plan_chunks

    with LogitsModel(Path(spec.path), ctx=CHUNK, placement=_placement(spec), preflight=False) as m:
        log = read_log(lines)
        tokens = m.tokenize(Path(spec.text_file).read_text(encoding="utf-8"))
        chunk = min(CHUNK, (len(tokens) // 2) & ~1)
        if chunk < 4:
            raise EngineError(f"{spec.path}: the prompts tokenize to {len(tokens)} tokens; too few to score")
        m.ctx = chunk
        plan = plan_chunks(len(tokens), chunk)
        rows, targets, decode_s = [], [], 0.0
        for ch in m.iter_chunks(tokens, plan):
            rows.append(ch.logprobs.copy())
            targets.append(ch.targets)
            decode_s += ch.decode_s
        n_gen, gen_s = m.generation_speed(tokens[:64], GEN_TOKENS)
    out = Path(spec.out_dir)
    np.save(out / f"{spec.tag}.rows.npy", np.concatenate(rows))
    np.save(out / f"{spec.tag}.targets.npy", np.concatenate(targets))
    return {**log, "n_vocab": m.n_vocab, "prompt_tokens": plan.n_chunks * plan.ctx, "prompt_s": decode_s,
            "gen_tokens": n_gen, "gen_s": gen_s, "tokens_sha": _sha(tokens)}


def _embeddings(spec: RunSpec, lines: list[str]) -> dict[str, Any]:
    lib = llama()
    kw = _placement(spec).llama_kwargs()
    try:
        m = lib.Llama(spec.path, embedding=True, pooling_type=spec.pooling, verbose=False, **kw)
    except (ValueError, RuntimeError, OSError) as e:
        raise EngineError(f"{spec.path}: llama.cpp could not load the model on {spec.device} ({e}): {last_error()}") from None
    try:
        log = read_log(lines)
        prompts = json.loads(Path(spec.prompts_file).read_text(encoding="utf-8"))
        t0 = time.perf_counter()
        vecs = np.asarray(m.embed(prompts, normalize=False, truncate=True), dtype=np.float32)
        dt = time.perf_counter() - t0
        n_tok = sum(len(m.tokenize(p.encode("utf-8"))) for p in prompts)
    except (ValueError, RuntimeError) as e:
        raise EngineError(f"{spec.path}: llama.cpp could not embed on {spec.device} ({e}): {last_error()}") from None
    finally:
        m.close()
    if vecs.ndim != 2:
        raise EngineError(f"{spec.path}: llama.cpp returned per-token embeddings (no pooling); cannot compare")
    np.save(Path(spec.out_dir) / f"{spec.tag}.rows.npy", vecs)
    return {**log, "prompt_tokens": n_tok, "prompt_s": dt, "gen_tokens": 0, "gen_s": 0.0, "dim": int(vecs.shape[1])}


def _sha(tokens: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _run(spec: RunSpec) -> dict[str, Any]:
    """The child's work: load, run, read the log; the buffers llama.cpp allocated."""
    lines: list[str] = []
    llama()

    def keep(line: str) -> None:
        lines.append(line)
        sys.stderr.write(line)  # the parent names llama.cpp's last line when this process dies in a kernel

    _LISTENERS.append(keep)
    try:
        doc = (_embeddings if spec.embedding else _logits)(spec, lines)
    finally:
        _LISTENERS.remove(keep)
    try:
        b = parse_buffers("".join(lines), spec.path)
        doc["buffers"] = {"model": b.model, "kv": b.kv, "compute": b.compute, "output": b.output, "lines": list(b.lines)}
    except EngineError:
        doc["buffers"] = None
    return doc


def main(argv: list[str]) -> int:
    """Child entry point: ``SPEC.json``; one JSON line on stdout (``{"error": ...}`` when llama.cpp refused)."""
    spec = RunSpec(**json.loads(Path(argv[0]).read_text()))
    return reply(lambda: _run(spec), GgufmixError)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
