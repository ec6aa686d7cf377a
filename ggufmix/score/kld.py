"""``--strategy kld``: every tensor's cost is the end-to-end KLD the oracle measured (score/oracle.py).

The per-tensor pass measures the noise-to-signal ratio of every candidate type, as ``measured`` does; the
oracle measures the real KLD of 2-4 types per tensor (those nearest the budget's widths); the finish step
turns both into one KLD per candidate: the measured types keep their measurement, the others are
interpolated along the tensor's own noise curve (score/oracle.interpolate). Every tensor's stats say which
types were measured (``kld.<TYPE>``, ``top1.<TYPE>``) and which interpolated (the rest).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ggufmix.score.base import ModelContext, TensorJob, TensorScore, register
from ggufmix.score.oracle import interpolate
from ggufmix.score.quant_error import measured


def _finish(scores: Mapping[str, Any], ctx: ModelContext) -> dict[str, TensorScore]:
    if ctx.oracle is None:
        raise ValueError("kld needs the oracle's measurements (calibration text)")
    out = {}
    for name, ts in scores.items():
        got = ctx.oracle.get(name) or {}
        if not got:
            raise ValueError(f"{name!r}: the oracle measured no type of this tensor")
        errors = interpolate(ts.errors, got)
        stats = {f"nsr.{t.name}": float(v) for t, v in ts.errors.items()}
        stats.update({f"kld.{t.name}": float(m[0]) for t, m in got.items()})
        stats.update({f"top1.{t.name}": float(m[1]) for t, m in got.items()})
        stats["measured_types"] = float(len(got))
        out[name] = TensorScore(errors, 1.0, stats)
    return out


@register("kld", calibrated=False, finish=_finish, activations="oracle",
          description="end-to-end KLD of each tensor alone at 2-4 types (llama.cpp, calibration text), "
                      "the rest interpolated by its noise curve")
def kld(job: TensorJob) -> TensorScore:
    """The noise-to-signal ratio of every type (the curve the oracle's KLDs are interpolated along)."""
    return measured(job)
