#!/usr/bin/env python3
"""How long ggml's quantizer takes per weight for each type, into ggufmix/data/quantize_speed.json.

Usage: python scripts/measure_quantize_speed.py [-o ggufmix/data/quantize_speed.json]

The planner reads the table to predict how long llama.cpp will take to write a plan (``--speed-tradeoff``):
IQ4_XS's search over 15 scales per block costs 200 ns a weight where Q4_K costs 60 and Q3_K 10, so a plan
full of IQ types can take twice as long to write as a stock mix of the same size. Only the ratios between
types matter to the planner; the absolute numbers are this machine's. One thread, Gaussian rows of 4096
columns, with and without a random importance matrix (llama.cpp's K-quants search harder with one), the
best of five runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from ggufmix.engine.kernels import quantize_rows
from ggufmix.layout.rules import KERNEL_NEEDS_IMATRIX
from ggufmix.layout.slots import DEFAULT_TYPES
from ggufmix.types import QuantType

ROWS, COLS, RUNS = 64, 4096, 5
# what --types may name beside the default palette (F32 is a copy, not in the table)
EXTRA = (QuantType.IQ1_S, QuantType.IQ1_M, QuantType.TQ1_0, QuantType.TQ2_0, QuantType.MXFP4, QuantType.NVFP4,
         QuantType.Q1_0, QuantType.F16, QuantType.BF16)
OUT = Path(__file__).resolve().parents[1] / "ggufmix" / "data" / "quantize_speed.json"


def ns_per_weight(rows: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None) -> float:
    quantize_rows(rows[:1], qtype, imatrix)  # IQ types build their grids on first use
    best = float("inf")
    for _ in range(RUNS):
        t0 = time.perf_counter()
        quantize_rows(rows, qtype, imatrix)
        best = min(best, time.perf_counter() - t0)
    return round(best / rows.size * 1e9, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((ROWS, COLS), dtype=np.float32)
    imatrix = rng.random(COLS, dtype=np.float32) + 0.1
    types = (*DEFAULT_TYPES, *EXTRA)
    with_imatrix = {t.name: ns_per_weight(rows, t, imatrix) for t in types}
    plain = {t.name: with_imatrix[t.name] if t in KERNEL_NEEDS_IMATRIX else ns_per_weight(rows, t, None)
             for t in types}
    doc = {"about": "ns per weight of ggml_quantize_chunk on one thread; types the kernel cannot quantize without "
                    "an importance matrix carry their imatrix time in 'plain'",
           "command": "python scripts/measure_quantize_speed.py",
           "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
           "ns_per_weight": {"plain": plain, "imatrix": with_imatrix}}
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
