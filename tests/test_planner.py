from __future__ import annotations

import pytest

from ggufmix.plan.planner import depth_bucket, load_gains, lookup_gain


def test_depth_buckets_are_eighths() -> None:
    assert [depth_bucket(i, 30) for i in (0, 3, 4, 26, 27, 29)] == ["early", "early", "mid", "mid", "late", "late"]
    assert depth_bucket(None, 30) == "none" and depth_bucket(0, 0) == "none"


def test_gain_lookup_falls_back_in_order() -> None:
    gains = {"attn_v@early": 2.0, "attn_v@mid": 4.0, "token_embd_tied@none": 7.0, "other@none": 0.5}
    assert lookup_gain(gains, "attn_v@early") == 2.0
    assert lookup_gain(gains, "attn_v@late") == 3.0  # the role's average
    assert lookup_gain(gains, "output@none") == 7.0  # stand-in role
    assert lookup_gain(gains, "ffn_up@mid") == 0.5
    assert lookup_gain({}, "ffn_up@mid") == 1.0


@pytest.mark.parametrize("imatrix", [False, True])
def test_shipped_gains_are_calibrated(imatrix: bool) -> None:
    gains = load_gains(imatrix)
    assert all(v > 0 for v in gains.values())
    # the two roles every transformer block has, at every depth, and the tied embedding
    for key in ("attn_v@early", "attn_v@mid", "ffn_down@late", "token_embd_tied@none"):
        assert key in gains, key


def test_uniform_plans_ignore_role_gains(tiny_model) -> None:  # noqa: ANN001
    """`uniform` is the unweighted baseline: the solver's cost of a tensor is its type's 2^(-2 bpw), whatever its role."""
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.quantize.build import ScoreOptions, open_source, score_source
    from ggufmix.types import bits_per_weight

    scores = score_source(open_source(tiny_model, False), ScoreOptions("uniform"), None, progress=False)
    plan = make_plan(scores, Budget(5.5, "bpw"))
    assert plan.settings["gains"] == {}
    for e in plan.quantized():
        assert e.cost == 2.0 ** (-2.0 * bits_per_weight(e.qtype)), e.name
