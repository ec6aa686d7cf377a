"""Time every scoring strategy on one model against reading its weights once (GB/s), in one run.

    python scripts/bench_scorers.py MODEL.gguf [--calib TEXT] [--strategies ewq,zd,...]

Weight-only scorers should run near the speed of reading the weights; activation strategies add
llama.cpp forward passes over the calibration text (lim: one per chunk; lieq: one per block and chunk).
Scores go to a temporary cache (GGUFMIX_CACHE), so nothing is resumed from an earlier run; within the run,
the first strategy that prices types on the Gaussian reference (fastewq, ewq, zd, lieq...) pays for it
(seconds: llama.cpp sets up its IQ2 grids) and the later ones reuse the prices. `--llama-header` adds
FastEWQ on a header-only model of any size: the decision alone, then `ggufmix score` in a fresh process
with an empty cache and with the prices kept.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT = "uniform,fastewq,ewq,zd,lim,lieq,measured"


def read_all(path: Path) -> float:
    """Seconds to read every tensor once as float32 rows, chunk by chunk (what whole-tensor stats read)."""
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.score.layerwise import read_in_chunks

    src = open_gguf(path)
    t0 = time.perf_counter()
    for name, info in src.tensors.items():
        for _ in read_in_chunks(lambda idx, n=name: src.rows(n, idx), info.ncols, info.nrows):
            pass
    return time.perf_counter() - t0


def read_pieces(path: Path) -> float:
    """Seconds to read every F16 tensor once as ewq and zd do (stored values into one buffer, converted to
    float32 a piece at a time by ggml), on one thread; other types as float32 rows."""
    from ggufmix.engine import kernels
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.layout.slots import build_layout
    from ggufmix.score.base import Kernels
    from ggufmix.score.layerwise import row_chunks
    from ggufmix.score.stream import _job
    from ggufmix.types import DEFAULT_TYPES

    src = open_gguf(path)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows, kernels.f16_to_f32)
    slots = [s for s in build_layout(src.arch, src.tensors.values(), DEFAULT_TYPES).slots if s.quantized]
    kernels.f16_to_f32(np.zeros(1, np.float16), np.zeros(1, np.float32))  # load ggml before the clock
    t0 = time.perf_counter()
    for slot in slots:
        for chunk in row_chunks(_job(src, slot, k, None, 0, False)):
            for _ in chunk.pieces():
                pass
    return time.perf_counter() - t0


def score_once(path: Path, strategy: str, calib: Path | None) -> float:
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    src = open_source(path, False)
    t0 = time.perf_counter()
    score_source(src, ScoreOptions(strategy, calib=calib), None, progress=False)
    return time.perf_counter() - t0


def decide_once(path: Path) -> float:
    """Seconds for FastEWQ's decision alone: block features from the header, then the shipped classifier."""
    from ggufmix.layout.slots import build_layout
    from ggufmix.realize.build import DEFAULT_TYPES
    from ggufmix.score.measure import open_source
    from ggufmix.score.base import ModelContext
    from ggufmix.score.fastewq import predict_keep

    t0 = time.perf_counter()
    src = open_source(path, False, check_data=False)
    layout = build_layout(src.arch, src.tensors.values(), DEFAULT_TYPES)
    predict_keep(ModelContext(tuple(s for s in layout.slots if s.quantized), layout.n_layers, src.metadata, None))
    return time.perf_counter() - t0


def write_llama_header(path: Path, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_kv: int, n_vocab: int) -> None:
    """A Llama GGUF with these shapes and no tensor data (what FastEWQ needs; nothing else can read it)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(8192)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    kv = n_embd // n_head * n_kv
    shapes = {"token_embd.weight": (n_vocab, n_embd), "output_norm.weight": (n_embd,), "output.weight": (n_vocab, n_embd)}
    for b in range(n_layer):
        shapes |= {f"blk.{b}.{r}.weight": sh for r, sh in (
            ("attn_norm", (n_embd,)), ("ffn_norm", (n_embd,)), ("attn_q", (n_embd, n_embd)), ("attn_k", (kv, n_embd)),
            ("attn_v", (kv, n_embd)), ("attn_output", (n_embd, n_embd)), ("ffn_gate", (n_ff, n_embd)),
            ("ffn_up", (n_ff, n_embd)), ("ffn_down", (n_embd, n_ff)))}
    for name, shape in shapes.items():
        dt = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor_info(name, shape, dt, int(np.prod(shape)) * dt.itemsize,
                          raw_dtype=gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()


def header_rows(spec: str) -> None:
    """FastEWQ on a header-only model of the given shapes, as a user runs it: a fresh process each time,
    first with an empty cache (the type prices are computed), then with the prices kept."""
    import subprocess
    import sys

    n = [int(x) for x in spec.split(",")]
    path = Path(tempfile.mkdtemp(prefix="ggufmix-header-")) / "llama-header.gguf"
    write_llama_header(path, *n)
    label = f"{n[0]} blocks x {n[1]} (header only)"
    print(f"| {'fastewq decision, ' + label:<28} | {decide_once(path):8.2f} | {'-':>6} | {'-':>6} |")
    for run in ("cold cache", "prices kept"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ggufmix", "-q", "score", str(path), "--strategy", "fastewq",
                        "-o", str(path.with_name(f"{run.split()[0]}.json"))], check=True, stdout=subprocess.DEVNULL)
        print(f"| {f'ggufmix score, {run}':<28} | {time.perf_counter() - t0:8.2f} | {'-':>6} | {'-':>6} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, help="calibration text (needed by lim and lieq)")
    ap.add_argument("--strategies", default=DEFAULT)
    ap.add_argument("--llama-header", metavar="L,E,F,H,KV,V",
                    help="also time FastEWQ on a header-only Llama with these shapes, e.g. 80,8192,28672,64,8,128256 "
                         "(Llama-3-70B)")
    args = ap.parse_args()
    os.environ["GGUFMIX_CACHE"] = tempfile.mkdtemp(prefix="ggufmix-bench-scorers-")
    gb = args.model.stat().st_size / 1e9
    base = read_all(args.model)
    print(f"{args.model.name}: {gb:.2f} GB\n")
    print(f"| {'what':<28} | {'seconds':>8} | {'GB/s':>6} | {'x read':>6} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    print(f"| {'read every weight once':<28} | {base:8.2f} | {gb / base:6.2f} | {1.0:6.2f} |")
    pieces = read_pieces(args.model)
    print(f"| {'read as ewq/zd do (1 thread)':<28} | {pieces:8.2f} | {gb / pieces:6.2f} | {pieces / base:6.2f} |")
    for s in (x.strip() for x in args.strategies.split(",") if x.strip()):
        if s in ("lim", "lieq", "measured+lim", "measured+lieq") and args.calib is None:
            print(f"| {s:<28} | {'(needs --calib)':>26} |")
            continue
        sec = score_once(args.model, s, args.calib)
        print(f"| {'score --strategy ' + s:<28} | {sec:8.2f} | {gb / sec:6.2f} | {sec / base:6.2f} |")
        if s == "fastewq":
            print(f"| {'fastewq decision alone':<28} | {decide_once(args.model):8.2f} | {'-':>6} | {'-':>6} |")
    if args.llama_header:
        header_rows(args.llama_header)


if __name__ == "__main__":
    main()
