"""The paper strategies' statistics on arrays with known answers, and the strategies on a tiny model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggufmix.cli import cli
from ggufmix.numerics import effective_rank
from ggufmix.score import stats
from ggufmix.score.fastewq import block_features, fit_logistic, labels_from_entropy, predict

RNG = np.random.default_rng(11)


def _direct_entropy(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    p = np.exp(x - x.max())
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def test_softmax_entropy_of_a_constant_tensor_is_ln_n() -> None:
    acc = stats.SoftmaxEntropy()
    for _ in range(3):
        acc.add(np.full((7, 10), 2.5))
    assert acc.entropy == pytest.approx(math.log(210), abs=1e-12)
    assert acc.excess == pytest.approx(0.0, abs=1e-12)


def test_softmax_entropy_streams_to_the_direct_value_in_any_chunking() -> None:
    x = RNG.standard_normal(10_000) * 3.0
    acc = stats.SoftmaxEntropy()
    for part in np.array_split(x[::-1], 17):  # rising and falling maxima across chunks
        acc.add(part)
    assert acc.entropy == pytest.approx(_direct_entropy(x), rel=1e-12)


def test_two_valued_softmax_entropy_in_closed_form() -> None:
    # n/2 weights at 0 and n/2 at ln 3: p = 1/(2n) and 3/(2n); H = ln(2n) - (3/4) ln 3
    n = 1000
    x = np.r_[np.zeros(n // 2), np.full(n // 2, math.log(3))]
    acc = stats.SoftmaxEntropy()
    acc.add(x)
    assert acc.entropy == pytest.approx(math.log(2 * n) - 0.75 * math.log(3), rel=1e-12)


def test_entropy_excess_is_half_the_variance_for_small_weights() -> None:
    """The note in the brief: H ~ ln N - var/2, so the excess ln N - H measures spread, not size."""
    for n, sd in ((20_000, 0.02), (80_000, 0.05)):
        acc = stats.SoftmaxEntropy()
        acc.add(RNG.standard_normal(n) * sd)
        assert acc.excess == pytest.approx(sd * sd / 2, rel=0.05)


def test_z_share_in_closed_form() -> None:
    x = np.r_[np.zeros(8), 3.0]  # mean 1/3, std sqrt(8)/3: only the 3 lies beyond one std above
    assert stats.z_share(x) == pytest.approx(1 / 9)
    assert stats.z_share(np.array([-1.0, 1.0] * 50)) == 0.0  # every value exactly at one std: not beyond
    assert stats.z_share(np.ones(10)) == 0.0
    u = np.linspace(-1, 1, 200_001)  # uniform: P(x > 1/sqrt 3) = (1 - 1/sqrt 3) / 2
    assert stats.z_share(u) == pytest.approx((1 - 1 / math.sqrt(3)) / 2, abs=1e-4)


def test_z_accumulator_over_chunks_equals_one_pass() -> None:
    x = RNG.standard_normal(5000) ** 3
    acc = stats.ZAccumulator()
    for part in np.array_split(x, 9):
        acc.add(part)
    assert sum(acc.count_above(p) for p in np.array_split(x, 9)) / acc.n == stats.z_share(x)


@pytest.mark.parametrize("piece", [8192, 3 * 8192, stats.PIECE])
def test_pieces_give_the_bits_of_one_sum_over_the_chunk(monkeypatch: pytest.MonkeyPatch, piece: int) -> None:
    """numpy sums float32 with dtype=float64 in 8192-value buffers, one after another: pieces of a multiple of
    that, carried on with ``initial=``, are the same sum to the bit (if numpy changes its buffering, this fails
    first). Magnitudes over ~6 decades make these float64 sums depend on their order: with this seed, pieces of
    4096 or 5000 values change the last bits of both."""
    monkeypatch.setattr(stats, "PIECE", piece)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(300_007) * np.exp(1.5 * rng.standard_normal(300_007))).astype(np.float32)
    acc = stats.ZAccumulator()
    acc.add(x)
    assert (acc.s1, acc.s2) == (float(x.sum(dtype=np.float64)), float((x * x).sum(dtype=np.float64)))
    ent = stats.SoftmaxEntropy()
    ent.add(x)
    assert ent.s0 == float(np.exp(x - x.max()).sum(dtype=np.float64))


def _with_singular_values(s: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    u, _ = np.linalg.qr(RNG.standard_normal((shape[0], len(s))))
    v, _ = np.linalg.qr(RNG.standard_normal((shape[1], len(s))))
    return (u * s) @ v.T


def test_topk_energy_and_effective_rank_from_known_singular_values() -> None:
    s = np.array([4.0, 3.0, 2.0, 1.0])
    w = _with_singular_values(s, (40, 30))
    assert stats.topk_energy(w, 1) == pytest.approx(16 / 30)
    assert stats.topk_energy(w, 2) == pytest.approx(25 / 30)
    p = s / s.sum()
    assert effective_rank(w) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-9)
    assert effective_rank(np.eye(16)) == pytest.approx(16)
    assert effective_rank(np.outer(np.arange(1, 9), np.ones(5))) == pytest.approx(1.0)


def test_energy_gain_is_one_for_the_reference_and_high_for_low_rank() -> None:
    shape = (64, 96)
    g = np.random.default_rng(0).standard_normal(shape)
    assert stats.energy_gain(g, seed=0) == pytest.approx(1.0)
    k = stats.energy_k(shape)
    assert k == 3
    low = _with_singular_values(np.array([10.0, 5.0, 1.0]), shape)
    assert stats.energy_gain(low, seed=0) == pytest.approx(1.0 / stats.random_topk_energy(shape, k, 0))
    assert stats.energy_gain(low, seed=0) > 3


def test_importance_is_two_to_the_clipped_z() -> None:
    imp = stats.importance_from_scores({0: 1.0, 1: 2.0, 2: 3.0})
    z = 1 / np.std([1.0, 2.0, 3.0])
    assert imp == pytest.approx({0: 2 ** -z, 1: 1.0, 2: 2 ** z})
    flipped = stats.importance_from_scores({0: 1.0, 1: 2.0, 2: 3.0}, higher_is_important=False)
    assert flipped[0] == pytest.approx(imp[2])
    many = stats.importance_from_scores({i: float(i == 0) * 100 for i in range(50)})
    assert many[0] == 2 ** stats.Z_CLIP
    assert stats.importance_from_scores({0: 5.0, 1: 5.0}) == {0: 1.0, 1: 1.0}


def test_ewq_tiers() -> None:
    h = {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0, 4: 6.0, 5: 11.0}  # mean 9.5, std ~1.61
    assert stats.ewq_tiers(h) == {0: 2, 1: 2, 2: 2, 3: 2, 4: 0, 5: 2}
    assert stats.ewq_tiers({0: 1.0, 1: 2.0, 2: 3.0}, spread=0.5) == {0: 0, 1: 1, 2: 2}


def _entropy_blocks(blocks: dict[int, list[np.ndarray]]) -> tuple[dict, dict]:
    """ewq and ewq-norm block scores of real weights, through the same per-tensor statistics as the scorer."""
    from types import SimpleNamespace

    from ggufmix.score.base import ModelContext
    from ggufmix.score.layerwise import ewq_blocks, ewq_norm_blocks

    slots, scores = [], {}
    for b, mats in blocks.items():
        for i, w in enumerate(mats):
            acc = stats.SoftmaxEntropy()
            acc.add(w)
            name = f"blk.{b}.t{i}.weight"
            slots.append(SimpleNamespace(name=name, layer=b, n_elements=w.size))
            scores[name] = SimpleNamespace(stats={"entropy": acc.entropy, "entropy_excess": acc.excess, "n": w.size})
    ctx = ModelContext(tuple(slots), len(blocks), {})
    return ewq_blocks(scores, ctx), ewq_norm_blocks(scores, ctx)


def test_ewq_norm_removes_the_size_term_that_raw_entropy_ranks_by() -> None:
    # block 0: big, wide-spread matrices; block 1: small, narrow ones. Raw entropy (~ln N - var/2) ranks the
    # big block first for its size alone; the size-normalised form ranks by spread and puts it last.
    raw, norm = _entropy_blocks({0: [RNG.normal(0, 0.3, 4096), RNG.normal(0, 0.3, 8192)],
                                 1: [RNG.normal(0, 0.05, 256), RNG.normal(0, 0.05, 512)]})
    assert raw[0] > raw[1] and norm[0] < norm[1]
    # with equal shapes the two differ by the same ln N constant in every block: identical importances
    same = {b: [RNG.normal(0, s, 4096), RNG.normal(0, s, 1024)] for b, s in enumerate((0.1, 0.3, 0.2))}
    raw, norm = _entropy_blocks(same)
    assert stats.importance_from_scores(raw) == pytest.approx(stats.importance_from_scores(norm), rel=1e-9)
    assert raw[0] > raw[2] > raw[1]  # narrower spread = higher entropy


def test_logistic_fit_separates_and_predicts() -> None:
    x = np.r_[RNG.normal(-2, 0.5, (40, 2)), RNG.normal(2, 0.5, (40, 2))]
    y = np.r_[np.zeros(40), np.ones(40)]
    model = fit_logistic(x, y)
    assert ((predict(model, x) > 0.5) == y).mean() == 1.0
    assert labels_from_entropy({0: 1.0, 1: 2.0, 2: 4.0}) == {0: 0, 1: 0, 2: 1}


# -- the strategies on a tiny model ------------------------------------------------------------------------

def _score(model: Path, tmp_path: Path, strategy: str, *extra: str) -> dict:
    out = tmp_path / f"{strategy}.json"
    res = CliRunner().invoke(cli, ["-q", "score", str(model), "--strategy", strategy, "-o", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def _block_importance(doc: dict) -> dict[int, float]:
    return {t["layer"]: t["stats"]["block_importance"] for t in doc["tensors"]
            if t.get("stats") and "block_importance" in t["stats"]}


@pytest.mark.parametrize("strategy", ["ewq", "ewq-norm", "zd", "fastewq"])
def test_weight_strategies_rank_every_block(tiny_model: Path, tmp_path: Path, strategy: str) -> None:
    doc = _score(tiny_model, tmp_path, strategy)
    imp = _block_importance(doc)
    assert sorted(imp) == [0, 1, 2, 3]
    assert all(2 ** -stats.Z_CLIP <= v <= 2 ** stats.Z_CLIP for v in imp.values())
    embd = next(t for t in doc["tensors"] if t["name"] == "token_embd.weight")
    assert embd["importance"] == 1.0  # unranked tensors: the blocks' geometric mean, as in `uniform`
    assert math.prod(imp.values()) ** (1 / len(imp)) == pytest.approx(1.0)  # 4 blocks: |z| <= sqrt 3, no clip
    q = next(t for t in doc["tensors"] if t["name"] == "blk.0.ffn_up.weight")
    assert q["errors"]["Q2_K"] > q["errors"]["Q4_K"] > q["errors"]["Q8_0"] > 0


def test_ewq_scores_match_the_weights(tiny_model: Path, tmp_path: Path) -> None:
    from tinymodel import read_tiny_weights

    doc = _score(tiny_model, tmp_path, "ewq")
    weights = read_tiny_weights(tiny_model)
    for t in doc["tensors"]:
        if t["name"] in ("blk.2.attn_q.weight", "token_embd.weight"):
            w = weights[t["name"]].ravel()
            direct = _direct_entropy(w)  # all float64; the scorer runs exp in float32 and sums in float64
            assert t["stats"]["entropy"] == pytest.approx(direct, abs=1e-7)
            # what ranks blocks is the excess ln N - H (~var/2, here ~1e-3): it must be far more exact than that
            assert math.log(w.size) - t["stats"]["entropy"] == pytest.approx(math.log(w.size) - direct, rel=1e-4)


def test_activation_strategies_need_calibration_text(tiny_model: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["-q", "score", str(tiny_model), "--strategy", "lim", "-o", str(tmp_path / "s")])
    assert res.exit_code != 0 and "--calib" in res.output


def test_lieq_and_hybrid_use_llama_cpp_block_diagnostics(tiny_model: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 120)
    args = ("--calib", str(text), "--calib-chunks", "2")
    doc = _score(tiny_model, tmp_path, "lieq", *args)
    assert sorted(_block_importance(doc)) == [0, 1, 2, 3]
    hybrid = _score(tiny_model, tmp_path, "measured+lim", *args)
    measured = _score(tiny_model, tmp_path, "measured")
    for a, b in zip(hybrid["tensors"], measured["tensors"]):
        if "errors" in a:
            assert a["errors"] == b["errors"]  # the measured signal untouched, the prior in the importance
    assert {t["importance"] for t in hybrid["tensors"] if t["name"] == "token_embd.weight"} == {1.0}


def test_block_removal_cost_is_zero_for_an_identity_block(tmp_path: Path) -> None:
    """A block whose attention and FFN outputs are zero is the identity already: bypassing it costs
    nothing; bypassing a working block costs something."""
    from tinymodel import write_tiny_llama

    from ggufmix.engine.ablation import block_removal_cost

    model = write_tiny_llama(tmp_path / "m.gguf", n_layer=3, n_embd=256, n_ff=512, n_vocab=512, seed=4,
                             zero={"blk.1.attn_output.weight", "blk.1.ffn_down.weight"})
    text = "one two three four five six seven eight nine ten " * 80
    cost = block_removal_cost(model, text, 3, n_ctx=64, n_chunks=2, progress=False)
    assert cost[1] == pytest.approx(0.0, abs=1e-6)
    assert abs(cost[0]) > 1e-3 and abs(cost[2]) > 1e-3


def test_fastewq_reads_no_tensor_data(tiny_model: Path, tmp_path: Path) -> None:
    from ggufmix.io.gguf_index import read_index

    cut = tmp_path / "header-only.gguf"
    index = read_index(tiny_model)
    cut.write_bytes(tiny_model.read_bytes()[:index.data_offset + 32])  # the data region is gone
    doc = _score(cut, tmp_path, "fastewq")
    assert sorted(_block_importance(doc)) == [0, 1, 2, 3]
    res = CliRunner().invoke(cli, ["-q", "score", str(cut), "--strategy", "ewq", "-o", str(tmp_path / "e.json")])
    assert res.exit_code != 0 and "truncated" in str(res.exception)  # a weight-reading strategy refuses it


def test_block_features_use_metadata_only() -> None:
    from ggufmix.layout.slots import Slot
    from ggufmix.types import QuantType

    slots = [Slot(f"blk.{b}.{r}.weight", (64, 64), QuantType.F16, r, b, 4096, {}, 0)
             for b in range(3) for r in ("attn_q", "ffn_up", "ffn_down")]
    f = block_features(slots, 3)
    assert f[0][:5] == [0.0, 0.0, 1.0, 0.0, 0.0] and f[2][:5] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert f[1][6] == pytest.approx(1 / 3) and f[1][7] == pytest.approx(1 / 3)


def test_ewq_rule_plan_puts_each_block_at_its_tier_type(tiny_model: Path, tmp_path: Path) -> None:
    scores = tmp_path / "ewq.json"
    doc = _score(tiny_model, tmp_path, "ewq")
    tiers = {t["layer"]: t["stats"]["ewq_tier"] for t in doc["tensors"] if "ewq_tier" in t.get("stats", {})}
    plan = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["-q", "plan", str(scores), "--budget", "rule", "-o", str(plan)])
    assert res.exit_code == 0, res.output
    entries = {e["name"]: e for e in json.loads(plan.read_text())["tensors"]}
    names = ("Q4_K", "Q6_K", "Q8_0")
    for b, tier in tiers.items():
        assert entries[f"blk.{b}.ffn_up.weight"]["type"] == names[tier]
    assert entries["token_embd.weight"]["type"] == "Q8_0"
    measured = tmp_path / "m.json"
    CliRunner().invoke(cli, ["-q", "score", str(tiny_model), "-o", str(measured)])
    res = CliRunner().invoke(cli, ["-q", "plan", str(measured), "--budget", "rule", "-o", str(plan)])
    assert res.exit_code != 0 and "no decision rule" in str(res.exception)


def test_pure_strategy_with_an_imatrix_prices_every_iq_type(tiny_model: Path, tmp_path: Path) -> None:
    """With an imatrix the IQ1/IQ2 types become candidates; the Gaussian reference must price them too."""
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 120)
    im = tmp_path / "imatrix.gguf"
    res = CliRunner().invoke(cli, ["-q", "imatrix", str(tiny_model), "--text", str(text), "--chunks", "2",
                                   "--ctx", "64", "-o", str(im)])
    assert res.exit_code == 0, res.output
    doc = _score(tiny_model, tmp_path, "zd", "--imatrix", str(im))
    errors = next(t for t in doc["tensors"] if t["name"] == "blk.1.ffn_down.weight")["errors"]
    assert errors["IQ2_XXS"] > errors["IQ3_S"] > errors["Q8_0"] > 0


def test_gaussian_reference_holds_at_most_about_49k_values() -> None:
    from ggufmix.score.quant_error import reference_rows

    assert [reference_rows(n) for n in (256, 576, 1536, 8960, 28672, 10**6)] == [32, 32, 32, 6, 2, 1]


def test_type_prices_are_kept_across_runs(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ggufmix.score import quant_error

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_error, "_noise", {})
    doc = _score(tiny_model, tmp_path, "fastewq")
    kept = list((tmp_path / "cache" / "type-noise").glob("*.json"))
    assert len(kept) == 1
    table = json.loads(kept[0].read_text())
    q4k = next(t for t in doc["tensors"] if t["name"] == "blk.0.ffn_up.weight")
    width = q4k["shape"][0]
    assert [v for t, n, v in table if t == "Q4_K" and n == width] == [q4k["errors"]["Q4_K"]]
    # a fresh process reads the kept prices instead of quantizing the reference again
    kept[0].write_text(json.dumps([[t, n, 0.125 if (t, n) == ("Q4_K", width) else v] for t, n, v in table]))
    monkeypatch.setattr(quant_error, "_noise", {})
    (tmp_path / "again").mkdir()
    again = _score(tiny_model, tmp_path / "again", "fastewq")
    assert next(t for t in again["tensors"] if t["name"] == "blk.0.ffn_up.weight")["errors"]["Q4_K"] == 0.125


def test_block_statistics_are_kept_across_runs(tiny_model: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """LieQ's removal pass runs once per model and calibration text; the hybrid and later runs reuse it."""
    import ggufmix.engine.ablation as ablation

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 120)
    args = ("--calib", str(text), "--calib-chunks", "2")
    first = _score(tiny_model, tmp_path, "lieq", *args)
    assert len(list((tmp_path / "cache" / "block-stats").glob("*.json"))) == 1

    def no_second_pass(*a: object, **k: object) -> None:
        raise AssertionError("block removal measured again")

    monkeypatch.setattr(ablation, "block_removal_cost", no_second_pass)
    (tmp_path / "again").mkdir()
    again = _score(tiny_model, tmp_path / "again", "lieq", *args)
    assert _block_importance(again) == _block_importance(first)
    text.write_text("Another text entirely, so the statistics must be measured on it. " * 120)
    res = CliRunner().invoke(cli, ["-q", "score", str(tiny_model), "--strategy", "lieq", "-o",
                                   str(tmp_path / "other.json"), *args])
    assert res.exit_code != 0 and "measured again" in repr(res.exception)
