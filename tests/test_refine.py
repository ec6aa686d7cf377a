"""The refine step: its moves (pure: byte-neutral, best predicted first), and the search on a real model."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ggufmix.search.refine import moves
from ggufmix.types import QuantType

LADDER = (QuantType.Q4_0, QuantType.Q5_0, QuantType.Q8_0)


def _options(costs: list[tuple[int, float]]) -> dict[str, dict[QuantType, tuple[int, float]]]:
    # tensor i: bytes grow with the type, predicted cost falls by a tensor-specific factor
    return {f"t{i}": {t: (size * (k + 4), scale / (k + 1) ** 2) for k, t in enumerate(LADDER)}
            for i, (size, scale) in enumerate(costs)}


def test_an_upgrade_is_paid_for_by_the_cheapest_downgrade() -> None:
    opts = _options([(100, 1.0), (100, 0.01), (100, 5.0)])
    chosen = {n: QuantType.Q5_0 for n in opts}
    best = moves(chosen, opts, slack=0)[0]
    # upgrading the most sensitive tensor (t2) and paying with the least sensitive (t1) is predicted best
    assert best.changes == (("t2", QuantType.Q8_0), ("t1", QuantType.Q4_0))
    assert best.predicted < 0 and best.extra_bytes <= 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1000), st.floats(1e-4, 10)), min_size=2, max_size=8),
       st.integers(0, 3000), st.lists(st.sampled_from(LADDER), min_size=8, max_size=8))
def test_moves_never_overspend_and_are_sorted(costs, slack, types) -> None:  # noqa: ANN001
    opts = _options(costs)
    chosen = {n: types[i] for i, n in enumerate(opts)}
    ms = moves(chosen, opts, slack)
    for m in ms:
        spent = sum(opts[n][t][0] - opts[n][chosen[n]][0] for n, t in m.changes)
        assert spent == m.extra_bytes <= slack
        assert len({n for n, _ in m.changes}) == len(m.changes)
    assert [m.predicted for m in ms] == sorted(m.predicted for m in ms)


def test_refine_on_a_real_model_keeps_the_budget_and_its_measured_kld(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The search end to end on a tiny model: within the budget, no worse than the solver's plan, and the
    plan it returns measures, swapped into a fresh oracle, the KLD it reported."""
    from test_oracle import tiny_kld_scores

    from ggufmix.io.text import read_text
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.score.oracle import Oracle, OracleSettings
    from ggufmix.search.refine import refine

    model, calib, scores = tiny_kld_scores(tmp_path, monkeypatch, 4.0)
    plan = make_plan(scores, parse_budget("4.0bpw"))
    done = refine(plan, scores, model, None, minutes=0.15, progress=False)

    assert done.kept >= 1 and done.kld < done.kld_planned  # 27 tried, 3 kept here in 9 s
    assert done.plan.total_bytes <= plan.budget_bytes
    assert done.plan.settings["refine"]["kept"] == done.kept
    o = scores.settings["oracle"]
    settings = OracleSettings(chunks=o["chunks"], ctx=o["ctx"], start=o["start"], widths=tuple(o["widths"]),
                              max_types=o["max_types"], threads=1)
    with Oracle(model, scores.layout, read_text(calib), settings, None) as fresh:
        for e in done.plan.quantized():
            fresh.swap(e.name, e.qtype)
        assert fresh.divergence()[0] == pytest.approx(done.kld, rel=1e-6)


def test_build_from_saved_kld_scores_refines_without_calib(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """`build --strategy kld --scores S --search-minutes N`: the scores carry the oracle's calibration text,
    so --calib is not asked for again."""
    import json

    from click.testing import CliRunner
    from test_oracle import tiny_kld_scores

    from ggufmix.cli import cli

    model, _, scores = tiny_kld_scores(tmp_path, monkeypatch, 4.0)
    saved = scores.save(tmp_path / "scores-kld.json")
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["-q", "build", str(model), "--strategy", "kld", "--scores", str(saved),
                                   "--budget", "4.0bpw", "--search-minutes", "0.05", "--no-smoke", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "refine" in json.loads(out.with_suffix(".plan.json").read_text())["settings"]
