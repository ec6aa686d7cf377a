from __future__ import annotations

import math

import pytest

from ggufmix.errors import BudgetError
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
    """`uniform` is the unweighted baseline: the solver's cost of a tensor is its type's noise on Gaussian
    weights times its share of the weights, whatever its role; at the size of an all-Q4_K file every tensor
    gets one of the types around 4.5 bits per weight."""
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import QuantType, bits_per_weight

    scores = score_source(open_source(tiny_model, False), ScoreOptions("uniform"), None, progress=False)
    slots = [s for s in scores.layout.slots if s.quantized]
    share = {s.name: s.n_elements / sum(t.n_elements for t in slots) for s in slots}
    assert len(set(share.values())) > 1  # tensors of different sizes
    plan = make_plan(scores, Budget(5.5, "bpw"))
    assert plan.settings["gains"] == {} and plan.settings["weights"] == "elements"
    for e in plan.quantized():
        assert e.cost == pytest.approx(share[e.name] * scores.tensors[e.name].errors[e.qtype]), e.name
    all_q4k = scores.layout.fixed_bytes + sum(s.candidates[QuantType.Q4_K] for s in slots)
    plan = make_plan(scores, Budget(all_q4k, "b"))
    # the best types on Gaussian weights bracket 4.5 bpw (Q4_K is barely better than IQ4_XS, far from Q5_K):
    # every tensor lands on them, whatever its size or role
    assert {bits_per_weight(e.qtype) for e in plan.quantized()} <= {4.25, 4.5, 5.5}


@pytest.mark.parametrize("strategy", ["ewq", "zd"])
def test_pure_paper_plans_move_bits_by_block_importance_alone(tiny_model, strategy: str) -> None:  # noqa: ANN001
    """Equal sizes, unequal importances: more important blocks never get fewer bits for the same role."""
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import bits_per_weight

    scores = score_source(open_source(tiny_model, False), ScoreOptions(strategy), None, progress=False)
    plan = make_plan(scores, Budget(4.5, "bpw"))
    assert plan.settings["weights"] == "elements"
    for role in ("ffn_up", "attn_q"):
        entries = sorted((scores.tensors[e.name].importance, bits_per_weight(e.qtype))
                         for e in plan.quantized() if e.name.endswith(f"{role}.weight") and e.name.startswith("blk."))
        assert len({i for i, _ in entries}) > 1
        assert [b for _, b in entries] == sorted(b for _, b in entries), (role, entries)


def test_assumed_imatrix_candidates_mirror_llama_cpp(tiny_model) -> None:  # noqa: ANN001
    """--assume-imatrix: the blk.* tensors (what llama-imatrix records) may take every imatrix-only type and the
    1-bit ones; token_embd/output only those llama.cpp writes without an imatrix (IQ1_M, IQ2_S, IQ3_XXS: exempt
    from tensor_requires_imatrix, and ggml's kernel needs none); the plan lists what the build needs one for."""
    from ggufmix.errors import UsageError
    from ggufmix.layout.rules import requires_imatrix
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.build import check_imatrix
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import QuantType

    src = open_source(tiny_model, False)
    plain = score_source(src, ScoreOptions("uniform"), None, progress=False)
    assumed = score_source(src, ScoreOptions("uniform", assume_imatrix=True), None, progress=False)
    assert assumed.settings["assume_imatrix"] is True and "assume_imatrix" not in plain.settings
    one_bit = {QuantType.IQ1_S, QuantType.IQ1_M}
    for slot in assumed.layout.slots:
        if not slot.quantized:
            continue
        plain_types, types = set(plain.layout.by_name()[slot.name].candidates), set(slot.candidates)
        assert not plain_types & one_bit and not any(requires_imatrix(slot.name, t) for t in plain_types)
        if slot.name.startswith("blk."):
            assert types == plain_types | one_bit | {QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ2_S,
                                                     QuantType.IQ3_XXS}, slot.name
        else:
            assert types - plain_types == {QuantType.IQ1_M}, slot.name  # IQ2_S, IQ3_XXS: allowed there already
    plan = make_plan(assumed, Budget(1.8, "bpw"))
    assert plan.bpw <= 1.8 and {e.qtype for e in plan.quantized()} & one_bit
    need = plan.needing_imatrix()
    assert need and all(e.name.startswith("blk.") for e in need)
    assert plan.needing_imatrix([e.name for e in need]) == []
    with pytest.raises(UsageError, match="--imatrix"):
        check_imatrix(plan, None)
    with pytest.raises(UsageError, match="--assume-imatrix"):
        ScoreOptions("measured", assume_imatrix=True)
    with pytest.raises(BudgetError, match="not achievable"):
        make_plan(plain, Budget(1.8, "bpw"))


def test_a_model_whose_architecture_has_its_own_table_is_planned_with_it() -> None:
    import json
    from importlib import resources

    doc = json.loads(resources.files("ggufmix.data").joinpath("role_gains.json").read_text())
    qwen = doc["by_arch"]["qwen2"]
    assert load_gains(False, "qwen2") == {k: float(v) for k, v in qwen["plain"].items()}
    assert load_gains(False, "llama") == load_gains(False) != load_gains(False, "qwen2")
    assert "plain" in qwen["provenance_by_table"]
    if "imatrix" not in qwen:  # a mode the architecture was not calibrated in takes the default's table
        assert load_gains(True, "qwen2") == load_gains(True)


def test_gains_follow_the_noise_curve_between_the_two_probes() -> None:
    from ggufmix.plan.planner import GAIN_PROBE, LOW_PROBE, gain_at
    from ggufmix.types import QuantType

    errors = {GAIN_PROBE: 0.01, LOW_PROBE: 0.09, QuantType.Q3_K: 0.03, QuantType.Q6_K: 0.001}
    assert gain_at(0.001, 2.0, 0.5, errors) == 2.0  # at or below the Q4_0 probe's noise: its gain
    assert gain_at(0.2, 2.0, 0.5, errors) == 0.5  # at or past the Q2_K probe's noise: that one's
    assert gain_at(0.03, 2.0, 0.5, errors) == pytest.approx(2.0 * 0.25 ** 0.5)  # halfway in log noise: geometric
    assert gain_at(0.2, 2.0, None, errors) == 2.0  # no low table
    assert gain_at(0.2, 2.0, 0.5, {GAIN_PROBE: 0.01}) == 2.0  # a tensor that cannot take Q2_K


def test_the_low_probe_table_is_the_architectures_own_or_none() -> None:
    import json
    from importlib import resources

    from ggufmix.plan.planner import LOW_PROBE

    doc = json.loads(resources.files("ggufmix.data").joinpath("role_gains.json").read_text())
    qwen = doc["by_arch"]["qwen2"]
    assert load_gains(False, "qwen2", LOW_PROBE) == {k: float(v) for k, v in qwen["plain@Q2_K"].items()}
    assert "probe Q2_K" in qwen["provenance_by_table"]["plain@Q2_K"]
    assert load_gains(True, "qwen2", LOW_PROBE) == {}  # the oracle's imatrix table has no curve
    assert load_gains(False, "llama", LOW_PROBE) == doc.get("plain@Q2_K", {})


def test_a_plan_prices_low_bit_types_at_the_low_probes_gain(tiny_model) -> None:  # noqa: ANN001
    """With a low-probe table, a Q2_K tensor's cost is its Q2_K noise times the low-probe gain; plan.json keeps
    both tables."""
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import QuantType

    scores = score_source(open_source(tiny_model, False), ScoreOptions("measured"), None, progress=False)
    gains = {"other@none": 1.0}
    plain = make_plan(scores, Budget(3.0, "bpw"), gains=gains, speed_tradeoff=0)
    curved = make_plan(scores, Budget(3.0, "bpw"), gains=gains, low_gains={"other@none": 0.25}, speed_tradeoff=0)
    low = [e for e in curved.quantized() if e.qtype == QuantType.Q2_K]
    assert low and curved.settings["gains@Q2_K"] == {"other@none": 0.25} and "gains@Q2_K" not in plain.settings
    for e in low:
        ts = scores.tensors[e.name]
        assert e.cost == pytest.approx(0.25 * ts.importance * ts.errors[QuantType.Q2_K], rel=1e-6)


@pytest.mark.parametrize("bpw", [4.0, 5.0])
def test_a_plan_gives_up_at_most_its_speed_tradeoff_for_a_faster_quantize(tiny_model, bpw: float) -> None:  # noqa: ANN001
    """The default plan may cost up to 2% more predicted error than the least-error one, for less predicted
    quantize time; plan.json records both times, as the speed table gives them for the chosen types."""
    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.plan.speed import DEFAULT_SPEED_TRADEOFF, quantize_seconds
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    scores = score_source(open_source(tiny_model, False), ScoreOptions("measured"), None, progress=False)
    best = make_plan(scores, Budget(bpw, "bpw"), speed_tradeoff=0)
    fast = make_plan(scores, Budget(bpw, "bpw"))
    assert best.settings["speed"]["error_given_up"] == 0 and fast.settings["speed"]["tradeoff"] == DEFAULT_SPEED_TRADEOFF

    def cost(plan):  # noqa: ANN001, ANN202
        return sum(e.cost for e in plan.quantized())
    assert cost(best) < cost(fast) <= cost(best) * (1 + DEFAULT_SPEED_TRADEOFF)
    def seconds(plan):  # noqa: ANN001, ANN202
        return sum(quantize_seconds(e.qtype, math.prod(e.shape), False) for e in plan.quantized())
    assert seconds(fast) < seconds(best)
    for plan in (best, fast):
        assert plan.settings["speed"]["quantize_seconds"] == pytest.approx(seconds(plan), abs=1e-3)
    assert fast.total_bytes <= fast.budget_bytes


def test_a_plan_at_a_type_whose_noise_swamps_the_signal_warns(tiny_model, caplog) -> None:  # noqa: ANN001
    """Q2_0's measured noise is about half the weights' signal; a plan forced onto it says so in one warning
    naming the type, and a plan at 4.5 bpw does not warn."""
    import logging

    from ggufmix.plan.budget import Budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import QuantType

    scores = score_source(open_source(tiny_model, False), ScoreOptions("measured"), None, progress=False)
    with caplog.at_level(logging.WARNING, logger="ggufmix.plan.planner"):
        make_plan(scores, Budget(4.5, "bpw"))
        assert not [r for r in caplog.records if "measured noise" in r.getMessage()]
        plan = make_plan(scores, Budget(2.7, "bpw"), types=[QuantType.Q2_0, QuantType.Q4_0])
    assert any(e.qtype == QuantType.Q2_0 for e in plan.quantized())
    warned = [r.getMessage() for r in caplog.records if "measured noise" in r.getMessage()]
    assert len(warned) == 1 and "at Q2_0" in warned[0] and "--types" in warned[0]
