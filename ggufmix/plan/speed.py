"""How long llama.cpp's quantizer takes to write a tensor at a type (data/quantize_speed.json).

ggml's quantizers differ a hundredfold per weight: Q4_0 takes 2 ns on this project's machine, Q4_K 60,
IQ4_XS 200 (it tries 15 scales per block), IQ2_XS 600. A plan that leans on IQ types can take twice as long to
write as a stock mix of the same size for a fraction of a percent of predicted quality; the planner's
``speed_tradeoff`` trades that fraction for the time (plan/solver.py ``faster_within``). Only the ratios
between types matter to it; ``scripts/measure_quantize_speed.py`` regenerates the table on another machine.
"""
from __future__ import annotations

import json
from functools import cache
from importlib import resources

from ggufmix.types import QuantType

DEFAULT_SPEED_TRADEOFF = 0.02  # predicted error a plan may give up for the fastest quantize within it (docs/results.md)


@cache
def _table() -> dict[str, dict[str, float]]:
    doc = json.loads(resources.files("ggufmix.data").joinpath("quantize_speed.json").read_text())
    return doc["ns_per_weight"]


def quantize_seconds(qtype: QuantType, n_elements: int, imatrix: bool) -> float:
    """One thread's seconds for ggml to quantize ``n_elements`` weights to ``qtype`` (0 for a type the table
    lacks: F32 is copied). With ``imatrix`` the K and legacy types search harder: Q4_K 60 -> 107 ns a weight."""
    ns = _table()["imatrix" if imatrix else "plain"].get(qtype.name, 0.0)
    return ns * n_elements * 1e-9
