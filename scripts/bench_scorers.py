"""Time every scoring strategy on one model against reading its weights once (GB/s), in one run.

    python scripts/bench_scorers.py MODEL.gguf [--calib TEXT] [--strategies ewq,zd,...]

Weight-only scorers should run near the speed of reading the weights; activation strategies add
llama.cpp forward passes over the calibration text (lim: one per chunk; lieq: one per block and chunk).
Scores go to a temporary cache (GGUFMIX_CACHE), so nothing is resumed from an earlier run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

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


def score_once(path: Path, strategy: str, calib: Path | None) -> float:
    from ggufmix.quantize.build import ScoreOptions, open_source, score_source

    src = open_source(path, False)
    t0 = time.perf_counter()
    score_source(src, ScoreOptions(strategy, calib=calib), None, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, help="calibration text (needed by lim and lieq)")
    ap.add_argument("--strategies", default=DEFAULT)
    args = ap.parse_args()
    os.environ["GGUFMIX_CACHE"] = tempfile.mkdtemp(prefix="ggufmix-bench-scorers-")
    gb = args.model.stat().st_size / 1e9
    base = read_all(args.model)
    print(f"{args.model.name}: {gb:.2f} GB\n")
    print(f"| {'what':<28} | {'seconds':>8} | {'GB/s':>6} | {'x read':>6} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    print(f"| {'read every weight once':<28} | {base:8.2f} | {gb / base:6.2f} | {1.0:6.2f} |")
    for s in (x.strip() for x in args.strategies.split(",") if x.strip()):
        if s in ("lim", "lieq", "measured+lim", "measured+lieq") and args.calib is None:
            print(f"| {s:<28} | {'(needs --calib)':>26} |")
            continue
        sec = score_once(args.model, s, args.calib)
        print(f"| {'score --strategy ' + s:<28} | {sec:8.2f} | {gb / sec:6.2f} | {sec / base:6.2f} |")


if __name__ == "__main__":
    main()
