#!/usr/bin/env python3
"""Time and memory of ggufmix's stages against one plain llama.cpp quantize, in the same run.

Each stage runs as its own process (so its peak RSS is its own, read with wait4):

    python scripts/bench_build.py ~/.cache/ggufmix-bench/smollm2-135m.dither.f16.gguf [--mix Q4_K_M] [--repeat 5]

Targets: the whole build (score, plan, quantize, read-back) within 1.5x of one plain quantize (issue 19);
re-planning from saved scores under 2 s. The last row is the least-error plan whatever its quantize time
(``--speed-tradeoff 0``), for comparison. The plain quantize runs first, from a cold page cache if the source
was not read lately: run it twice and read the second table. ``--repeat N`` runs every stage N times and
prints the median seconds (SmolLM2's stages take 1-3 s, and one run's ratio moved 1.34 -> 1.55 between two
runs on this shared machine). Prints a table; nothing here is a timed test.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


def run(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed ({status}): {shlex.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", type=Path)
    ap.add_argument("--mix", default="Q4_K_M", help="stock mix to compare with and to size the budget")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every stage; the table shows the median")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="ggufmix-bench-") as tmp:  # the files are GBs for a 1.5B model
            budget, rows = measure_stages(args.source, args.mix, Path(tmp))
        runs.append(rows)
    rows = [(name, statistics.median(r[i][1] for r in runs), max(r[i][2] for r in runs))
            for i, (name, _, _) in enumerate(runs[0])]
    plain = rows[0][1]
    print(f"model: {args.source.name}   budget: {budget} (= stock {args.mix})   cpus: {os.cpu_count()}   "
          f"runs: {args.repeat} (median seconds)")
    print(f"| {'stage':<50} | {'seconds':>8} | {'x plain':>7} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 52}|{'-' * 10}|{'-' * 9}|{'-' * 13}|")
    for name, sec, rss in rows:
        print(f"| {name:<50} | {sec:>8.2f} | {sec / plain:>7.2f} | {rss:>11.0f} |")


def measure_stages(source: Path, mix: str, work: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """The budget (the stock file's tensor bytes) and (stage, wall seconds, peak RSS MB) of the plain quantize and
    of each ggufmix stage, files in ``work``."""
    stock = work / f"stock-{mix}.gguf"
    rows: list[tuple[str, float, float]] = []
    rows.append(("plain llama.cpp quantize " + mix, *run(
        [PY, "-c", "import sys; from ggufmix.engine.quantize import quantize_file; from ggufmix.types import mix_file_type; "
         f"quantize_file(sys.argv[1], sys.argv[2], ftype=mix_file_type('{mix}'), progress=False)",
         str(source), str(stock)])))
    from ggufmix.io.gguf_source import open_gguf

    budget = f"{open_gguf(stock).total_bytes}B"
    gm = [PY, "-m", "ggufmix", "-q"]
    rows.append(("ggufmix score", *run([*gm, "score", str(source), "-o", str(work / "s.json")])))
    rows.append(("ggufmix plan (from saved scores)", *run([*gm, "plan", str(work / "s.json"), "--budget", budget,
                                                          "-o", str(work / "p.json")])))
    rows.append(("ggufmix build --scores (quantize+verify)", *run(
        [*gm, "build", str(source), "--scores", str(work / "s.json"), "--budget", budget,
         "-o", str(work / "a.gguf"), "--no-smoke"])))
    rows.append(("ggufmix build (whole: score+plan+quantize+verify)", *run(
        [*gm, "build", str(source), "--budget", budget, "-o", str(work / "b.gguf"), "--no-smoke"])))
    rows.append(("ggufmix build (whole, with smoke test)", *run(
        [*gm, "build", str(source), "--budget", budget, "-o", str(work / "c.gguf")])))
    rows.append(("ggufmix build (whole, --speed-tradeoff 0)", *run(
        [*gm, "build", str(source), "--budget", budget, "-o", str(work / "d.gguf"), "--no-smoke",
         "--speed-tradeoff", "0"])))
    return budget, rows


if __name__ == "__main__":
    main()
