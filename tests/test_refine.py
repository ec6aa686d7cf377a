"""The refine step's moves (pure): byte-neutral, best predicted first."""
from __future__ import annotations

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
