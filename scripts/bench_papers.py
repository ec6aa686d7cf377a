"""The paper strategies against ``measured``, ``uniform`` and the stock mixes on one model: one table.

    python scripts/bench_papers.py MODEL.gguf --text EVAL --calib CALIB -o bench/papers \\
        [--modes imatrix] [--budgets 4.5,5.5] [--baselines Q4_K_M] [--chunks 10] [--strategies a,b,...]

Runs ``ggufmix bench`` once per strategy, so that an interruption loses one strategy's evaluations at
most (the output folder caches every file and its evaluation), then once with every strategy (all
cached) for the combined ``results.md``, and prints its "Mean KLD by strategy" tables with the wall time
each strategy took. The README's paper tables are these tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from ggufmix.bench.report import markdown
from ggufmix.bench.bench import BenchConfig, run_bench
from ggufmix.score.layerwise import PAPERS

DEFAULT = ",".join(["measured", "uniform", *PAPERS, "fastewq", *(f"measured+{p}" for p in PAPERS)])


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--text", type=Path, required=True, help="evaluation text")
    ap.add_argument("--calib", type=Path, required=True, help="calibration text (imatrix, lim, lieq)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--modes", default="imatrix")
    ap.add_argument("--budgets", default="4.5,5.5")
    ap.add_argument("--baselines", default="Q4_K_M")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--imatrix-chunks", type=int, default=32)
    ap.add_argument("--strategies", default=DEFAULT)
    args = ap.parse_args()
    strategies = _csv(args.strategies)
    cfg = BenchConfig(args.model, args.text, args.output, tuple(float(b) for b in _csv(args.budgets)),
                      _csv(args.baselines), strategies, args.calib, args.imatrix_chunks, chunks=args.chunks,
                      modes=_csv(args.modes))
    seconds = {}
    for s in strategies:
        t0 = time.perf_counter()
        run_bench(dataclasses.replace(cfg, strategies=(s,)))
        seconds[s] = time.perf_counter() - t0
        print(f"{s}: {seconds[s] / 60:.1f} min", flush=True)
    md = markdown(run_bench(cfg))
    print(md[md.index("## Mean KLD by strategy"):md.index("## At each stock")] if "## At each stock" in md else md)
    print("| strategy | wall minutes (score, build, evaluate; 0 = cached) |\n|---|---|")
    for s in strategies:
        print(f"| `{s}` | {seconds[s] / 60:.1f} |")


if __name__ == "__main__":
    main()
