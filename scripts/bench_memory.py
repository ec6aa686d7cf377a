#!/usr/bin/env python3
"""Peak memory of ``ggufmix score`` against model size, on synthetic GGUFs of several sizes.

    python scripts/bench_memory.py [--layers 8,32] [--n-embd 2048] [--n-ff 5632] [--rows 128]

Each model has the same tensor shapes and a different number of blocks, so its largest tensor is
fixed while its size grows; scoring streams tensor by tensor, so peak RSS should stay flat.
Prints a table; the models are written to a temporary folder and deleted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ggufmix.io.gguf_source import open_gguf

TESTS = Path(__file__).resolve().parent.parent / "tests"


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak resident memory of one command (wait4's ru_maxrss), in MB."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def measure(layers: int, n_embd: int, n_ff: int, rows: int, work: Path) -> tuple[float, int, float, float]:
    """(file GB, tensors, largest tensor MB, peak RSS MB) for a model of ``layers`` blocks."""
    model = work / f"synthetic-{layers}.gguf"
    # Written by a child process: a forked child starts with its parent's resident set, and wait4's
    # ru_maxrss would report the writer's memory instead of the scorer's.
    subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from tinymodel import "
                    "write_tiny_llama as w; w(sys.argv[2], n_layer=int(sys.argv[3]), n_embd=int(sys.argv[4]), "
                    "n_ff=int(sys.argv[5]), n_head=int(sys.argv[4]) // 128, n_head_kv=int(sys.argv[4]) // 128, "
                    "n_vocab=4096, seed=int(sys.argv[3]))", str(TESTS), str(model), str(layers), str(n_embd),
                    str(n_ff)], check=True)
    src = open_gguf(model)
    largest = max(t.n_bytes for t in src.tensors.values())
    rss = peak_rss_mb([sys.executable, "-m", "ggufmix", "-q", "score", str(model), "-o", str(work / "s.json"),
                       "--rows", str(rows)])
    size = model.stat().st_size
    model.unlink()
    return size / 1e9, len(src.tensors), largest / 1e6, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="8,32")
    ap.add_argument("--n-embd", type=int, default=2048)
    ap.add_argument("--n-ff", type=int, default=5632)
    ap.add_argument("--rows", type=int, default=128)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ggufmix-mem-"))
    try:
        print("| model GB | tensors | largest tensor MB | peak RSS of ggufmix score, MB |")
        print("|---|---|---|---|")
        for n in (int(x) for x in args.layers.split(",")):
            gb, count, largest, rss = measure(n, args.n_embd, args.n_ff, args.rows, work)
            print(f"| {gb:.2f} | {count} | {largest:.1f} | {rss:.0f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
