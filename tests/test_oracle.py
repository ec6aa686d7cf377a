"""The KLD oracle against real llama.cpp on tiny models: the in-place swap against a real file, resume."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufmix.engine.logits import plan_chunks
from ggufmix.engine.oracle import SwapModel, from_float32, to_float32
from ggufmix.engine.quantize import quantize_file
from ggufmix.types import QuantType

CTX = 64
TENSOR = "blk.1.ffn_down.weight"


def _text() -> str:
    words = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jolly "
             "boxing judges and ten pack my box with five dozen liquor jugs").split()
    rng = np.random.default_rng(0)
    return " ".join(rng.choice(words, 3000))


def _kld(p: np.ndarray, q: np.ndarray) -> float:
    return float((np.exp(p) * (p - q)).sum(axis=1).mean())


def _weights(path: Path) -> list[str]:
    return [t.name for t in gguf.GGUFReader(path).tensors if len(t.shape) > 1]


def tiny_kld_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, width: float):  # noqa: ANN201
    """A two-block tiny model, a calibration text and its ``kld`` scores (one chunk, the types around ``width``),
    with a fresh oracle journal under ``tmp_path``: (model, calib, Scores)."""
    from tinymodel import write_tiny_llama

    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    model = write_tiny_llama(tmp_path / "two-block.f16.gguf", n_layer=2, n_embd=256, n_ff=256, n_vocab=384, seed=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(_text())
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    opts = ScoreOptions(strategy="kld", calib=calib, calib_chunks=1, widths=(width,), threads=1, max_rows=32)
    return model, calib, score_source(open_source(model, False), opts, None, progress=False)


def test_bf16_and_f16_round_trip() -> None:
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for t in (QuantType.F32, QuantType.F16, QuantType.BF16):
        y = to_float32(from_float32(x, t), t)
        assert np.abs(y - x).max() <= (0 if t == QuantType.F32 else 2 ** -7) * np.abs(x).max()
    # BF16 rounds to nearest even, as ggml does: 1 + 2^-8 (a tie) stays 1, 1 + 3 * 2^-8 goes up
    ties = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    assert to_float32(from_float32(ties, QuantType.BF16), QuantType.BF16).tolist() == [1.0, 1 + 2 ** -6]


def test_swap_matches_a_real_file_with_that_one_override(tiny_model: Path, tmp_path: Path) -> None:
    real = tmp_path / "one.gguf"
    quantize_file(tiny_model, real, ftype=7, overrides=[(r"^blk\.1\.ffn_down\.weight$", QuantType.Q4_K),
                                                          (".*", QuantType.F16)], progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(real).tensors if len(t.shape) > 1}
    assert types[TENSOR] == "Q4_K" and {v for k, v in types.items() if k != TENSOR} == {"F16"}
    with SwapModel(tiny_model, _weights(tiny_model), ctx=CTX, n_threads=2) as m:
        tokens = m.tokenize(_text())
        plan = plan_chunks(len(tokens), CTX, 3)
        m.find_weights(tokens, plan)
        base = np.concatenate([lp.copy() for lp in m.iter_chunks(tokens, plan)])
        m.swap_quantized(TENSOR, QuantType.Q4_K)
        swapped = np.concatenate([lp.copy() for lp in m.iter_chunks(tokens, plan)])
        m.restore(TENSOR)
        restored = np.concatenate([lp.copy() for lp in m.iter_chunks(tokens, plan)])
    with SwapModel(real, [], ctx=CTX, n_threads=2) as r:
        built = np.concatenate([lp.copy() for lp in r.iter_chunks(tokens, plan)])
    assert np.array_equal(restored, base)
    effect = _kld(base, built)
    assert effect > 1e-4  # Q4_K on one tensor does move the output
    # same logits within float tolerance: what is left is llama.cpp's Q8_K rounding of the activations
    # in the real file's Q4_K matmul (the swap multiplies F16 weights with F16-rounded activations)
    assert np.abs(swapped - built).max() < 0.35 * np.abs(base - built).max()
    assert _kld(built, swapped) < 0.1 * effect
    assert abs(_kld(base, swapped) - effect) < 0.15 * effect


def test_a_weight_the_graph_never_uses_is_refused(tiny_model: Path) -> None:
    from ggufmix.errors import InputError

    with SwapModel(tiny_model, ["blk.9.attn_q.weight"], ctx=CTX, n_threads=2) as m:
        tokens = m.tokenize(_text())
        with pytest.raises(InputError, match="not found in llama.cpp's graph"):
            m.find_weights(tokens, plan_chunks(len(tokens), CTX, 1))


def test_kld_scores_resume_after_an_interruption(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tinymodel import write_tiny_llama

    from ggufmix.score import oracle
    from ggufmix.score.measure import ScoreOptions, open_source, score_source
    from ggufmix.types import bits_per_weight

    model = write_tiny_llama(tmp_path / "one-block.f16.gguf", n_layer=2, n_embd=256, n_ff=256, n_vocab=384, seed=4)

    calib = tmp_path / "calib.txt"
    calib.write_text(_text())
    opts = ScoreOptions(strategy="kld", calib=calib, calib_chunks=1, widths=(4.5,), threads=1, max_rows=32)
    src = open_source(model, False)
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "clean"))
    clean = score_source(src, opts, None, progress=False)

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cut"))
    real, calls = oracle.Oracle.divergence, []

    def cut(self):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) > 7:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(oracle.Oracle, "divergence", cut)
    with pytest.raises(KeyboardInterrupt):
        score_source(src, opts, None, progress=False)
    journal = next((tmp_path / "cut" / "oracle").glob("*.jsonl"))
    assert len(journal.read_text().splitlines()) == 7
    calls.clear()
    monkeypatch.setattr(oracle.Oracle, "divergence", lambda self: (calls.append(1), real(self))[1])
    resumed = score_source(src, opts, None, progress=False)
    n_measured = clean.settings["oracle"]["measured"]
    assert len(calls) == n_measured - 7 and n_measured == 2 * len(clean.tensors)
    assert resumed.tensors == clean.tensors
    # every tensor: the two types around 4.5 bpw measured, the others interpolated, and said so
    ts = clean.tensors[TENSOR]
    measured = sorted((QuantType[k.split(".", 1)[1]] for k in ts.stats if k.startswith("kld.")), key=bits_per_weight)
    assert len(measured) == 2 and bits_per_weight(measured[0]) <= 4.5 < bits_per_weight(measured[1])
    assert all(ts.errors[t] == ts.stats[f"kld.{t.name}"] for t in measured)
    assert ts.errors[QuantType.Q2_K] > ts.errors[QuantType.Q6_K]
    assert clean.settings["units"] == "kld" and clean.settings["oracle"]["interpolated"] > 0


def test_gains_fitted_from_oracle_scores_become_the_architectures_table(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil
    import sys

    from scriptload import load_script

    from ggufmix.plan import planner

    model, _, scores = tiny_kld_scores(tmp_path, monkeypatch, 4.5)
    saved = scores.save(tmp_path / "scores-kld.json")

    cal = load_script("calibrate_gains.py")
    gains_file = Path(shutil.copy(cal.GAINS, tmp_path / "role_gains.json"))
    before = json.loads(gains_file.read_text())
    monkeypatch.setattr(cal, "GAINS", gains_file)
    monkeypatch.setattr(sys, "argv", ["calibrate_gains.py", "--from-scores", str(saved), "--for-arch"])
    cal.main()

    after = json.loads(gains_file.read_text())
    assert {k: after[k] for k in ("plain", "imatrix")} == {k: before[k] for k in ("plain", "imatrix")}
    table = after["by_arch"]["llama"]["plain"]  # no imatrix: the plain table of the model's architecture
    for i in range(2):  # one block early, one late: each its own key, KLD per unit of NSR at the measured types
        stats = scores.tensors[f"blk.{i}.ffn_down.weight"].stats
        measured = [k[4:] for k in stats if k.startswith("kld.")]
        kld, nsr = sum(stats[f"kld.{t}"] for t in measured), sum(stats[f"nsr.{t}"] for t in measured)
        assert len(measured) == 2 and kld > 0
        assert table[f"ffn_down@{planner.depth_bucket(i, 2)}"] == pytest.approx(kld / nsr, rel=1e-4)
    assert "--oracle chunks=1,ctx=" in after["by_arch"]["llama"]["provenance_by_table"]["plain"]


def test_gain_probes_are_evaluated_one_at_a_time_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import shutil
    import sys

    from scriptload import load_script
    from tinymodel import write_tiny_llama

    model = write_tiny_llama(tmp_path / "two-block.f16.gguf", n_layer=2, n_embd=256, n_ff=256, n_vocab=384, seed=4)
    calib = tmp_path / "calib.txt"
    calib.write_text(_text())
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    cal = load_script("calibrate_gains.py")
    gains_file = Path(shutil.copy(cal.GAINS, tmp_path / "role_gains.json"))
    monkeypatch.setattr(cal, "GAINS", gains_file)
    work = tmp_path / "probes"
    built: list[str] = []
    quantize = cal.quantize_plan

    def counted(source, out, plan, imatrix, progress):  # noqa: ANN001, ANN202
        built.append(out.name)
        assert not [p for p in work.glob("*.gguf") if p != out]  # the previous probe is gone
        return quantize(source, out, plan, imatrix, progress=progress)
    monkeypatch.setattr(cal, "quantize_plan", counted)
    argv = ["calibrate_gains.py", str(model), str(calib), "--chunks", "1", "--ctx", str(CTX), "--probe", "Q2_K",
            "--for-arch", "--workdir", str(work)]
    monkeypatch.setattr(sys, "argv", argv)
    cal.main()

    table = json.loads(gains_file.read_text())["by_arch"]["llama"]["plain@Q2_K"]
    journal = json.loads((work / "kld.json").read_text())
    assert set(journal["kld"][str(calib)]) == {"floor", *table} and len(built) == len(table) + 1
    assert all(v > 0 for v in table.values()) and not list(work.glob("*.gguf"))
    del built[:]
    cal.main()  # every probe's KLD is in the journal: nothing is built again, the same gains
    assert not built and json.loads(gains_file.read_text())["by_arch"]["llama"]["plain@Q2_K"] == table

    prose = tmp_path / "prose.txt"
    prose.write_text(_text()[::-1])
    monkeypatch.setattr(sys, "argv", [*argv[:3], str(prose), *argv[3:]])
    cal.main()  # one more text: every probe is built once more and evaluated on that text only
    klds = json.loads((work / "kld.json").read_text())["kld"]
    assert len(built) == len(table) + 1 and klds[str(calib)] == journal["kld"][str(calib)]
    both = json.loads(gains_file.read_text())["by_arch"]["llama"]["plain@Q2_K"]
    one, two = klds[str(calib)], klds[str(prose)]

    def rise(k: str) -> float:  # what the group adds to the floor's KLD, averaged over the texts given
        return sum(t[k] - t["floor"] for t in (one, two)) / 2
    # a gain is its KLD rise over its (text-free) noise: the two texts' gain is the one text's times the mean rise
    assert both == pytest.approx({k: table[k] * rise(k) / (one[k] - one["floor"]) for k in table}, rel=1e-3, abs=1e-6)


def test_the_oracles_chunks_are_spread_over_the_text() -> None:
    from ggufmix.score.oracle import ScoredFrom

    tokens = np.arange(100)
    plan = ScoredFrom(ctx=8, n_chunks=3, start=2, stride=100 // 8 // 3)  # 12 chunks in the text, every 4th
    assert [int(plan.chunk_tokens(tokens, i)[0]) for i in range(3)] == [0, 32, 64]
    assert plan.targets(tokens, 2).tolist() == list(range(67, 72))  # positions 2..6 predict tokens 3..7


def test_a_measurement_below_a_less_noisy_types_anchors_nothing() -> None:
    """SmolLM2-135M's blk.2.attn_q on 2 x 128 tokens: 0 at Q5_1, 1.7e-5 at Q8_0. Held beyond Q5_1, its gain priced
    Q2_0 (noise 0.97 of the signal) at 8e-10, and the plan took it (KLD 0.087 against the default's 0.029)."""
    from ggufmix.score.oracle import interpolate
    from ggufmix.types import QuantType as T

    nsr = {T.Q8_0: 8.0e-5, T.Q5_1: 1.19e-3, T.Q4_0: 1.09e-2, T.Q2_0: 0.973}
    out = interpolate(nsr, {T.Q8_0: (1.73e-5, 1.0), T.Q5_1: (0.0, 0.99)})
    assert out[T.Q5_1] == 0.0 and out[T.Q8_0] == 1.73e-5  # measured types keep their measurement
    gain = 1.73e-5 / 8.0e-5
    assert out[T.Q2_0] == pytest.approx(gain * 0.973) and out[T.Q4_0] == pytest.approx(gain * 1.09e-2)
    # measurements that grow with the noise still interpolate between them
    out = interpolate(nsr, {T.Q8_0: (1.0e-5, 1.0), T.Q4_0: (2.0e-3, 0.9)})
    assert 1.0e-5 < out[T.Q5_1] < 2.0e-3 and out[T.Q2_0] == pytest.approx(2.0e-3 / 1.09e-2 * 0.973)
