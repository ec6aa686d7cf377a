"""Planning the largest models from their headers: time ``score`` (cold and warm), ``plan`` at 1.8/2.5/4.0 bpw and
``plan --fit`` for 128/192/256 GB machines on the header-only GGUFs of scripts/header_models.py, each a fresh
``python -m ggufmix`` process; prints the markdown tables of docs/big-models.md and each plan's per-group table.

    python scripts/bench_headers.py WORK_DIR [--models deepseek-v3,qwen3-235b,llama-405b] [--ctx 4096]

Cold: an empty ``GGUFMIX_CACHE`` (the type prices are computed); warm: the same command again with it kept.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

BUDGETS = ("1.8bpw", "2.5bpw", "4.0bpw")
FITS = ("128GB", "192GB", "256GB")
STRATEGIES = ("fastewq", "uniform")


def ggufmix(args: list[str], cache: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    """One fresh process; its wall seconds and result."""
    env = os.environ | {"GGUFMIX_CACHE": str(cache)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ggufmix", *args], capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, res


def cold_warm(header: Path, strategy: str, out: Path, cache: Path) -> tuple[float, float]:
    shutil.rmtree(cache, ignore_errors=True)
    cmd = ["score", str(header), "--strategy", strategy, "--assume-imatrix", "-o", str(out)]
    times = []
    for _ in range(2):
        t, res = ggufmix(cmd, cache)
        if res.returncode:
            raise SystemExit(f"{' '.join(cmd)}: {res.stderr.strip()}")
        times.append(t)
    return times[0], times[1]


def plan(scores: Path, target: list[str], cache: Path, ctx: int) -> tuple[float, str, str]:
    """Seconds, the summary cell (size, bpw, weights budget) and the full output."""
    out = scores.with_suffix(".plan.json")
    args = ["plan", str(scores), "-o", str(out), *target] + (["--ctx", str(ctx)] if target[0] == "--fit" else [])
    t, res = ggufmix(args, cache)
    if res.returncode:
        return t, "does not fit: " + _range(res.stderr), res.stderr.strip()
    m = re.search(r"wrote \S+: ([0-9.]+) MB, ([0-9.]+) bpw", res.stdout)
    assert m, res.stdout
    return t, f"{float(m.group(1)) / 1000:.1f} GB, {m.group(2)} bpw", res.stdout.strip()


def _range(stderr: str) -> str:
    m = re.search(r"sizes range from ([0-9.]+) MB \(([0-9.]+) bpw\)", stderr)
    return f"the smallest plan is {float(m.group(1)) / 1000:.1f} GB ({m.group(2)} bpw)" if m else stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--models", default="deepseek-v3,qwen3-235b,llama-405b")
    ap.add_argument("--ctx", type=int, default=4096)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    subprocess.run([sys.executable, str(here / "header_models.py"), str(args.work), "--models", args.models],
                   check=True, capture_output=True)
    score_rows, plan_rows, outputs = [], [], []
    for model in args.models.split(","):
        header, cache = args.work / f"{model}.gguf", args.work / "cache"
        cells = []
        for strategy in STRATEGIES:
            cold, warm = cold_warm(header, strategy, args.work / f"{model}.{strategy}.json", cache)
            cells.append(f"{cold:.1f} s / {warm:.1f} s")
        score_rows.append(f"| {model} | " + " | ".join(cells) + " |")
        scores = args.work / f"{model}.fastewq.json"
        cells = []
        for target in [["--budget", b] for b in BUDGETS] + [["--fit", f] for f in FITS]:
            t, cell, text = plan(scores, target, cache, args.ctx)
            cells.append(f"{cell} ({t:.1f} s)")
            outputs.append(f"### {model} {' '.join(target)}\n{text}")
        plan_rows.append(f"| {model} | " + " | ".join(cells) + " |")
    print("| model | `score --strategy fastewq --assume-imatrix` cold / warm | `uniform` cold / warm |\n|---|---|---|")
    print("\n".join(score_rows))
    heads = [f"`--budget {b}`" for b in BUDGETS] + [f"`--fit {f}`" for f in FITS]
    print("\n| model (fastewq scores) | " + " | ".join(heads) + " |\n|---|" + "---|" * len(heads))
    print("\n".join(plan_rows))
    print("\n" + "\n\n".join(outputs))


if __name__ == "__main__":
    main()
