"""The evaluator: pure metrics on hand-made distributions, then ``evaluate`` on a tiny llama model
against an independent numpy computation from llama-cpp-python's full logits."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufmix.errors import InputError, UsageError
from ggufmix.evaluate import basecache
from ggufmix.evaluate.basecache import BaseLogits, CacheKey, TopKRows, compress_topk, token_stats_topk
from ggufmix.numerics import log_softmax
from ggufmix.evaluate.metrics import (
    DivergenceAccumulator,
    PerplexityAccumulator,
    TokenStats,
    kld_rows,
    mean_and_uncertainty,
    token_stats_full,
)

# ---------------------------------------------------------------------------------------------
# pure metrics


def _logp(p: list[float]) -> np.ndarray:
    return np.log(np.asarray([p], dtype=np.float64)).astype(np.float32)


def test_log_softmax_normalizes_and_is_shift_invariant() -> None:
    x = np.random.default_rng(0).normal(size=(5, 300)).astype(np.float32) * 4
    lp = log_softmax(x)
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(log_softmax(x + 100.0), lp, atol=2e-5)


def test_kld_of_hand_made_distributions() -> None:
    p, q = [0.5, 0.25, 0.25], [0.25, 0.25, 0.5]
    expected = 0.5 * math.log(2) + 0.25 * math.log(0.5)
    assert kld_rows(_logp(p), _logp(q))[0] == pytest.approx(expected, rel=1e-6)
    assert kld_rows(_logp(p), _logp(p))[0] == pytest.approx(0.0, abs=1e-9)
    # KL is not symmetric: KL(q||p) = 0.25 ln(1/2) + 0.5 ln 2
    assert kld_rows(_logp(q), _logp(p))[0] == pytest.approx(0.25 * math.log(0.5) + 0.5 * math.log(2), rel=1e-6)


def test_token_stats_full_nll_top_and_kld() -> None:
    base = np.vstack([_logp([0.7, 0.2, 0.1]), _logp([0.1, 0.3, 0.6])])
    quant = np.vstack([_logp([0.6, 0.3, 0.1]), _logp([0.5, 0.3, 0.2])])
    st = token_stats_full(base, quant, np.array([1, 2]))
    np.testing.assert_allclose(st.nll, [-math.log(0.3), -math.log(0.2)], rtol=1e-6)
    np.testing.assert_allclose(st.nll_base, [-math.log(0.2), -math.log(0.6)], rtol=1e-6)
    assert st.same_top.tolist() == [True, False]
    kl0 = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3)
    assert st.kld[0] == pytest.approx(kl0, rel=1e-5)


def test_mean_and_uncertainty_matches_perplexity_cpp() -> None:
    x = np.random.default_rng(1).exponential(size=1000)
    est = mean_and_uncertainty(x.sum(), (x * x).sum(), x.size)
    assert est.value == pytest.approx(x.mean())
    assert est.stderr == pytest.approx(math.sqrt(x.var() / (x.size - 1)))
    assert mean_and_uncertainty(x[:10].sum(), (x[:10] ** 2).sum(), 10).stderr == 0.0  # count <= 10
    lo, hi = est.ci95
    assert lo < est.value < hi and hi - est.value == pytest.approx(1.96 * est.stderr, rel=1e-3)


def _random_stats(rng: np.random.Generator, n: int) -> TokenStats:
    nll_base = rng.exponential(2.0, size=n)
    return TokenStats(nll=nll_base + rng.normal(0.1, 0.2, size=n), nll_base=nll_base,
                      kld=rng.exponential(0.05, size=n), same_top=rng.random(n) < 0.9)


def test_divergence_accumulator_streaming_equals_batch_formulas() -> None:
    rng = np.random.default_rng(2)
    chunks = [_random_stats(rng, 255) for _ in range(7)]
    acc = DivergenceAccumulator()
    for c in chunks:
        acc.add(c)
    res = acc.result()
    nll = np.concatenate([c.nll for c in chunks])
    nllb = np.concatenate([c.nll_base for c in chunks])
    kld = np.concatenate([c.kld for c in chunks])
    top = np.concatenate([c.same_top for c in chunks])
    n = nll.size
    dp = np.exp(-nll) - np.exp(-nllb)
    assert res.n_tokens == n
    assert res.kld.value == pytest.approx(kld.mean())
    assert res.kld.stderr == pytest.approx(kld.std() / math.sqrt(n - 1))
    assert res.kld_median == pytest.approx(np.median(kld), rel=1e-6)
    assert res.kld_p99 == pytest.approx(_perplexity_cpp_percentile(kld, 0.99), rel=1e-5)
    assert res.kld_p999 == pytest.approx(_perplexity_cpp_percentile(kld, 0.999), rel=1e-5)
    assert res.kld_max == pytest.approx(kld.max(), rel=1e-6)
    assert res.same_top.value == pytest.approx(top.mean())
    assert res.same_top.stderr == pytest.approx(math.sqrt(top.mean() * (1 - top.mean()) / (n - 1)))
    assert res.dp_rms.value == pytest.approx(math.sqrt(np.mean(dp**2)))
    # ln(PPL ratio) error: the standard error of the mean of the paired difference
    assert res.ln_ppl_ratio.value == pytest.approx(nll.mean() - nllb.mean())
    assert res.ln_ppl_ratio.stderr == pytest.approx((nll - nllb).std() / math.sqrt(n - 1), rel=1e-6)
    assert acc.perplexity().ppl.value == pytest.approx(math.exp(nll.mean()))
    assert acc.base_perplexity().ppl.value == pytest.approx(math.exp(nllb.mean()))


def _perplexity_cpp_percentile(values: np.ndarray, fraction: float) -> float:
    v = np.sort(values)
    p = fraction * (v.size - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, v.size - 1)])


def test_perplexity_accumulator_uncertainty() -> None:
    nll = np.random.default_rng(3).exponential(3.0, size=500)
    acc = PerplexityAccumulator()
    acc.add(nll[:200])
    acc.add(nll[200:])
    r = acc.result()
    assert r.ppl.value == pytest.approx(math.exp(nll.mean()))
    assert r.ppl.stderr == pytest.approx(r.ppl.value * nll.std() / math.sqrt(nll.size - 1))


def test_topk_lumped_bound_and_tail_estimate_hand_made() -> None:
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.4, 0.3, 0.05, 0.25]
    # 4 systematic samples of the tail (0.75, 0.25 renormalized) hit token 2 three times, token 3 once
    base = compress_topk(_logp(p), np.array([0]), k=2, tail=4)
    assert base.ids[0].tolist() == [0, 1]
    assert sorted(base.tail_ids[0].tolist()) == [2, 2, 2, 3]
    assert float(np.exp(base.log_rest[0])) == pytest.approx(0.2, rel=1e-6)
    st = token_stats_topk(base, _logp(q), np.array([0]))
    lumped = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.3)
    full = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert st.kld_bound[0] == pytest.approx(lumped, rel=1e-5)
    assert st.kld_bound[0] < full
    assert st.kld[0] == pytest.approx(full, rel=1e-5)  # proportional samples: the estimate is exact here


def test_topk_bound_is_monotone_and_estimate_unbiased() -> None:
    rng = np.random.default_rng(4)
    base = log_softmax(rng.normal(size=(400, 200)).astype(np.float32) * 3)
    quant = log_softmax((base + rng.normal(size=base.shape) * 0.5).astype(np.float32))
    targets = rng.integers(0, 200, size=400)
    exact = token_stats_full(base, quant, targets)
    prev = np.zeros(400)
    for k in (1, 4, 16, 64, 199):
        st = token_stats_topk(compress_topk(base, targets, k, tail=16), quant, targets)
        assert np.all(st.kld_bound <= exact.kld + 1e-6)
        assert np.all(st.kld_bound >= prev - 1e-6)  # refining the partition never lowers the divergence
        prev = st.kld_bound
        # unbiased: the mean estimate is within a few standard errors of the exact mean
        err = (st.kld - exact.kld).std() / math.sqrt(400)
        assert abs(st.kld.mean() - exact.kld.mean()) < 4 * err + 1e-9
        assert st.kld.mean() > st.kld_bound.mean() or k == 199
        np.testing.assert_array_equal(st.same_top, exact.same_top)
        np.testing.assert_allclose(st.nll_base, exact.nll_base, rtol=1e-6)
    full = compress_topk(base, targets, 1000)
    assert np.all(np.isneginf(full.log_rest))
    st = token_stats_topk(full, quant, targets)
    np.testing.assert_allclose(st.kld, exact.kld, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(st.kld_bound, exact.kld, rtol=1e-5, atol=1e-8)


def test_no_tail_samples_falls_back_to_the_bound() -> None:
    rng = np.random.default_rng(6)
    base = log_softmax(rng.normal(size=(20, 100)).astype(np.float32) * 2)
    quant = log_softmax((base + rng.normal(size=base.shape) * 0.3).astype(np.float32))
    st = token_stats_topk(compress_topk(base, np.zeros(20, int), 8, tail=0), quant, np.zeros(20, int))
    np.testing.assert_array_equal(st.kld, st.kld_bound)


def test_cache_roundtrip_and_key_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "c"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    key = CacheKey.of(model, "some text", ctx=8, chunks=None, topk=4, tail=2, llama_cpp="0.3.36")
    rng = np.random.default_rng(5)
    lp = log_softmax(rng.normal(size=(6, 20)).astype(np.float32))
    rows = compress_topk(lp, np.arange(6), 4, tail=2)
    from ggufmix.engine.logits import ChunkPlan
    base = BaseLogits(np.arange(16, dtype=np.int32), ChunkPlan(8, 2), 20, True, 1, rows, 1.5)
    path = basecache.save(key, base)
    assert path.parent == tmp_path / "c" / "base-logits"
    got = basecache.load(key)
    assert got is not None and got.plan == base.plan and got.bos == 1 and got.decode_s == 1.5
    for f in ("ids", "logprobs", "log_rest", "nll", "tail_ids", "tail_logprobs"):
        np.testing.assert_array_equal(getattr(got.rows, f), getattr(rows, f))
    assert isinstance(got.chunk(1), TopKRows) and got.chunk(1).ids.shape == (3, 4)
    other = CacheKey.of(model, "other text", ctx=8, chunks=None, topk=4, tail=2, llama_cpp="0.3.36")
    assert basecache.load(other) is None


# ---------------------------------------------------------------------------------------------
# llama.cpp on a tiny model

CTX = 64
WORDS = ("the of and to in is was for on that with as by at from his an were are which this be has or "
         "river city music north station album county season war team first school born village").split()


def _tinymodel():
    return pytest.importorskip("tinymodel", reason="tests/tinymodel.py builds the tiny GGUFs")


def _text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words)) + "."


def _perturbed_copy(src: Path, dst: Path, scale: float, seed: int) -> Path:
    shutil.copyfile(src, dst)
    reader = gguf.GGUFReader(dst, "r+")
    rng = np.random.default_rng(seed)
    for t in reader.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            w = np.asarray(t.data)
            w[...] = (w.astype(np.float32) * (1 + scale * rng.standard_normal(w.shape))).astype(np.float16)
    reader.data.flush()
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("tiny")
    base = _tinymodel().write_tiny_llama(d / "base.gguf", seed=0)
    return base, _perturbed_copy(base, d / "quant.gguf", scale=0.2, seed=1)


def _reference(path: Path, text: str, n_chunks: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Scored log-softmax rows per chunk straight from llama-cpp-python, perplexity.cpp style."""
    from ggufmix.engine.llamalib import llama

    # llama_cpp as ggufmix sets it up: on AMX CPUs models load without extra buffer types (llamalib), which moves
    # the tiny model's PPL by 7e-5; a bare `import llama_cpp` made this module fail when run before any engine use
    llama_cpp = llama()
    llm = llama_cpp.Llama(str(path), n_ctx=CTX, n_batch=CTX, logits_all=True, verbose=False, n_threads=2)
    tokens = np.asarray(llm.tokenize(text.encode(), add_bos=True, special=False))
    assert tokens[0] == llm.token_bos()  # the tiny vocabulary adds BOS
    rows = []
    for i in range(n_chunks):
        chunk = tokens[i * CTX:(i + 1) * CTX].tolist()
        chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        rows.append(log_softmax(np.array(llm.scores[CTX // 2:CTX - 1])))
    llm.close()
    return tokens, rows


def _numpy_metrics(base_rows: list[np.ndarray], quant_rows: list[np.ndarray], tokens: np.ndarray) -> dict[str, object]:
    b, q = np.concatenate(base_rows).astype(np.float64), np.concatenate(quant_rows).astype(np.float64)
    tgt = np.concatenate([tokens[i * CTX + CTX // 2 + 1:(i + 1) * CTX] for i in range(len(base_rows))])
    nll_q = -q[np.arange(len(tgt)), tgt]
    nll_b = -b[np.arange(len(tgt)), tgt]
    kld = (np.exp(b) * (b - q)).sum(axis=1)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    return {"ppl_q": math.exp(nll_q.mean()), "ppl_b": math.exp(nll_b.mean()), "kld": kld,
            "top": np.mean(b.argmax(1) == q.argmax(1)), "dp_rms": math.sqrt(np.mean(dp**2)), "n": len(tgt)}


@pytest.fixture(scope="module")
def reference(models: tuple[Path, Path]) -> dict[str, object]:
    text = _text(1500)
    tokens, base_rows = _reference(models[0], text, 4)
    _, quant_rows = _reference(models[1], text, 4)
    return {"text": text, "tokens": tokens, **_numpy_metrics(base_rows, quant_rows, tokens)}


def _check_against_reference(rep, ref: dict[str, object], *, exact: bool) -> None:
    q = rep.quants[0]
    assert rep.settings.n_chunks == 4 and q.divergence.n_tokens == ref["n"] == 4 * (CTX - 1 - CTX // 2)
    assert rep.base.perplexity.ppl.value == pytest.approx(ref["ppl_b"], rel=1e-5)
    assert q.perplexity.ppl.value == pytest.approx(ref["ppl_q"], rel=1e-5)
    assert q.divergence.kld.value == pytest.approx(ref["kld"].mean(), rel=1e-4)
    assert q.divergence.kld_p99 == pytest.approx(np.quantile(ref["kld"], 0.99), rel=1e-4)
    assert q.divergence.kld_max == pytest.approx(ref["kld"].max(), rel=1e-4)
    assert q.divergence.same_top.value == pytest.approx(ref["top"])
    assert q.divergence.dp_rms.value == pytest.approx(ref["dp_rms"], rel=1e-4)
    assert q.divergence.kld_method == ("exact" if exact else "topk+tail-sample")
    assert (q.divergence.kld_lower_bound is None) is exact
    assert q.divergence.kld.value > 1e-3  # the perturbation is visible: the test can fail


def test_evaluate_exact_matches_numpy(models: tuple[Path, Path], reference: dict[str, object]) -> None:
    from ggufmix.evaluate.evaluation import evaluate

    rep = evaluate(models[0], [models[1]], reference["text"], ctx=CTX, chunks=4, cache=False, n_threads=2,
                   progress=False)
    assert rep.settings.kld_mode == "exact" and rep.settings.cache_file is None
    _check_against_reference(rep, reference, exact=True)


def test_evaluate_cached_equals_exact_when_topk_covers_vocab(
    models: tuple[Path, Path], reference: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ggufmix.evaluate.evaluation import evaluate, format_table

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path))
    kw = dict(ctx=CTX, chunks=4, cache=True, n_threads=2, progress=False, topk=512)  # 512 >= 384 tokens
    first = evaluate(models[0], [models[1]], reference["text"], **kw)
    assert not first.settings.cache_hit and Path(first.settings.cache_file).is_file()
    assert first.base.throughput is not None
    _check_against_reference(first, reference, exact=False)
    again = evaluate(models[0], [models[1]], reference["text"], **kw)
    assert again.settings.cache_hit and again.base.throughput is None
    assert again.quants[0].divergence.kld.value == first.quants[0].divergence.kld.value
    exact = evaluate(models[0], [models[1]], reference["text"], ctx=CTX, chunks=4, cache=False, n_threads=2,
                     progress=False)
    assert first.quants[0].divergence.kld.value == pytest.approx(exact.quants[0].divergence.kld.value, rel=1e-5)
    small = evaluate(models[0], [models[1]], reference["text"], **{**kw, "topk": 8})
    d_small, d_exact = small.quants[0].divergence, exact.quants[0].divergence
    assert d_small.kld_lower_bound.value < 0.9 * d_exact.kld.value  # flat tiny-model rows: top-8 misses a lot
    assert d_small.kld.value == pytest.approx(d_exact.kld.value, rel=0.05)  # the tail samples recover it
    assert small.quants[0].perplexity.ppl.value == pytest.approx(exact.quants[0].perplexity.ppl.value, rel=1e-6)
    blob = json.loads(json.dumps(first.to_json()))
    assert blob["settings"]["ctx"] == CTX and blob["settings"]["topk"] == 512
    assert blob["quants"][0]["divergence"]["kld_mean"]["value"] == first.quants[0].divergence.kld.value
    table = format_table(first)
    assert "quant.gguf" in table and f"{first.quants[0].divergence.kld.value:.6f}" in table


def test_engine_chunks_and_bos(models: tuple[Path, Path], reference: dict[str, object]) -> None:
    from ggufmix.engine.logits import LogitsModel, plan_chunks

    with LogitsModel(models[0], ctx=CTX, n_threads=2) as lm:
        tokens = lm.tokenize(reference["text"])
        np.testing.assert_array_equal(tokens, reference["tokens"])
        plan = plan_chunks(len(tokens), CTX, 2)
        got = [(c.targets.copy(), c.logprobs.copy()) for c in lm.iter_chunks(tokens, plan)]
    _, ref_rows = _reference(models[0], reference["text"], 2)
    for i, (targets, rows) in enumerate(got):
        np.testing.assert_array_equal(targets, tokens[i * CTX + CTX // 2 + 1:(i + 1) * CTX])
        np.testing.assert_allclose(rows, ref_rows[i], atol=1e-5)


def test_errors(models: tuple[Path, Path], tmp_path: Path) -> None:
    from ggufmix.evaluate.evaluation import evaluate

    other = _tinymodel().write_tiny_llama(tmp_path / "other.gguf", n_vocab=400)
    with pytest.raises(InputError, match="vocabulary"):
        evaluate(models[0], [other], _text(1500), ctx=CTX, chunks=1, cache=False, n_threads=2, progress=False)
    with pytest.raises(InputError, match="tokens"):
        evaluate(models[0], [models[1]], "too short", ctx=CTX, cache=False, n_threads=2, progress=False)
    with pytest.raises(InputError, match="no such"):
        evaluate(tmp_path / "missing.gguf", [], "x", ctx=CTX)
    with pytest.raises(UsageError):
        evaluate(models[0], [], "x", ctx=63)


def test_backend_is_reported(models: tuple[Path, Path], reference: dict[str, object]) -> None:
    """The report says where the forward passes ran; asking for GPU layers on a CPU build falls back to CPU."""
    from ggufmix.engine.logits import system_info
    from ggufmix.evaluate.evaluation import evaluate

    rep = evaluate(models[0], [models[1]], reference["text"], ctx=CTX, chunks=2, cache=False, n_threads=2,
                   progress=False, n_gpu_layers=99)
    gpu, info = system_info()
    assert "CPU" in info
    assert (rep.settings.backend == "CPU") != gpu


def test_paired_difference_cancels_what_two_models_share() -> None:
    from ggufmix.evaluate.metrics import mean_and_uncertainty, paired_difference

    rng = np.random.default_rng(0)
    hard = rng.exponential(0.4, 4000)  # each token's difficulty, shared by both models
    better, worse = hard, hard * 1.01 + rng.normal(0, 0.001, hard.size)
    d = paired_difference(better, worse)
    alone = mean_and_uncertainty(float(worse.sum()), float(np.dot(worse, worse)), worse.size)
    assert d.value == pytest.approx(worse.mean() - better.mean())
    # 1% apart: the plain errors overlap, the paired one does not
    assert alone.stderr > d.value > 3 * d.stderr and d.stderr < alone.stderr / 10
    with pytest.raises(ValueError, match="4000 tokens against 3999"):
        paired_difference(better, worse[1:])


def test_evaluate_reports_each_models_kld_against_the_first_paired(models: tuple[Path, Path],
                                                                    reference: dict[str, object]) -> None:
    from ggufmix.evaluate.evaluation import evaluate, format_table

    rep = evaluate(models[0], [models[1], models[1], models[0]], reference["text"], ctx=CTX, chunks=2, cache=False,
                   n_threads=2, progress=False)
    quant = rep.quants[0].divergence.kld
    (same, d_same), (base, d_base) = rep.kld_against_first()
    assert (same.path, base.path) == (str(models[1]), str(models[0]))
    assert d_same.value == 0 and d_same.stderr == 0  # the same file on the same tokens
    assert d_base.value == pytest.approx(-quant.value, abs=1e-6)  # the base against itself has no divergence
    assert d_base.stderr == pytest.approx(quant.stderr, rel=1e-3)
    doc = rep.to_json()["kld_against_first"]
    assert [e["path"] for e in doc] == [str(models[1]), str(models[0])] and doc[0]["stderr"] == 0
    assert f"KLD against {models[1].name}, paired on the same tokens:" in format_table(rep)
