"""The block search (realize/rounding.py) against llama.cpp's real quantizer: the headers it writes are ggml's
layout, no block comes out worse than llama.cpp's, most come out better, and a build writes them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tinymodel import write_calib_text

from ggufmix.cli import cli
from ggufmix.engine.kernels import dequantize_rows, quantize_rows, type_size, with_header
from ggufmix.io.gguf_source import open_gguf
from ggufmix.realize.rounding import quantize_searched, searched_blocks
from ggufmix.types import QuantType

SEARCHED = (QuantType.Q4_1, QuantType.Q5_1, QuantType.Q4_K, QuantType.Q5_K)


def _weights(seed: int, rows: int = 24, cols: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Rows of uneven columns and an imatrix with a few loud columns, as real weights and inputs have."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(5, size=(rows, cols)) * rng.uniform(0.2, 2, size=(1, cols)) * 0.02).astype(np.float32)
    im = rng.lognormal(0, 1.5, size=cols).astype(np.float32)
    return w, im


def _k_scales(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml-quants.c ``get_scale_min_k4``: each sub-block's 6-bit scale and minimum from a K block's 12 bytes."""
    q = flat[:, 4:16].astype(np.uint8)
    sc, mn = np.zeros((len(q), 8), np.uint8), np.zeros((len(q), 8), np.uint8)
    sc[:, :4], mn[:, :4] = q[:, :4] & 63, q[:, 4:8] & 63
    sc[:, 4:] = (q[:, 8:12] & 0xF) | ((q[:, :4] >> 6) << 4)
    mn[:, 4:] = (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return sc, mn


@pytest.mark.parametrize("qtype", SEARCHED, ids=lambda t: t.name)
def test_the_header_written_is_ggmls_layout(qtype: QuantType) -> None:
    """llama.cpp's own blocks, their headers read back the way ggml reads them and written again over scrambled
    ones: the same bytes."""
    w, im = _weights(int(qtype))
    blocks = quantize_rows(w, qtype, im)
    flat = blocks.reshape(-1, type_size(qtype))
    d, m = flat[:, 0:2].copy().view(np.float16)[:, 0], flat[:, 2:4].copy().view(np.float16)[:, 0]
    scrambled = blocks.copy()
    header = 16 if qtype in (QuantType.Q4_K, QuantType.Q5_K) else 4
    scrambled.reshape(-1, type_size(qtype))[:, :header] = 0x5A
    extra = _k_scales(flat) if header == 16 else ()
    np.testing.assert_array_equal(with_header(scrambled, qtype, d, m, *extra), blocks)


@pytest.mark.parametrize("qtype", SEARCHED, ids=lambda t: t.name)
def test_no_block_is_worse_than_llama_cpps_and_the_whole_is_better(qtype: QuantType) -> None:
    w, im = _weights(100 + int(qtype))
    theirs = quantize_rows(w, qtype, im)
    ours = searched_blocks(w, qtype, theirs, im)
    per = 32 if qtype in (QuantType.Q4_1, QuantType.Q5_1) else 256

    def error(blocks: np.ndarray) -> np.ndarray:
        return ((dequantize_rows(blocks, qtype, w.shape[1]) - w) ** 2 * im).reshape(len(w), -1, per).sum(-1)
    before, after = error(theirs), error(ours)
    assert (after <= before).all()
    assert after.sum() < 0.97 * before.sum(), after.sum() / before.sum()
    assert (after < before).mean() > 0.5  # most blocks, not a lucky few


def test_other_types_are_llama_cpps_own() -> None:
    w, im = _weights(7)
    for qtype in (QuantType.Q6_K, QuantType.Q8_0, QuantType.Q5_0):
        np.testing.assert_array_equal(quantize_searched(w, qtype, im, threads=2), quantize_rows(w, qtype, im))


def test_threads_do_not_change_the_bytes() -> None:
    w, im = _weights(8, rows=600)
    np.testing.assert_array_equal(quantize_searched(w, QuantType.Q5_K, im, threads=1),
                                  quantize_searched(w, QuantType.Q5_K, im, threads=3))


@pytest.mark.parametrize("model, types, searched_types", [
    ("tiny_model", "Q4_K,Q5_K,Q6_K", (QuantType.Q4_K, QuantType.Q5_K)),
    ("odd_model", "Q4_1,Q5_1,Q8_0", (QuantType.Q4_1, QuantType.Q5_1)),  # 320-wide rows, as SmolLM2's 576
])
def test_search_rounding_writes_the_searched_blocks_and_the_default_does_not(model: str, types: str,
                                                                        searched_types: tuple[QuantType, ...],
                                                                        request: pytest.FixtureRequest,
                                                                        tmp_path: Path) -> None:
    """The same plan built twice: with --search-rounding its searched types' weights round the source closer (without
    an imatrix: plainly), by default they are llama-quantize's."""
    tiny_model = request.getfixturevalue(model)
    runner = CliRunner()
    files = {}
    for name, extra in (("searched", ["--search-rounding"]), ("llama", [])):
        out = tmp_path / f"{name}.gguf"
        res = runner.invoke(cli, ["build", str(tiny_model), "--budget", "5.5bpw", "--types", types,
                                  "--no-smoke", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        files[name] = out
    plans = {k: json.loads(v.with_suffix(".plan.json").read_text()) for k, v in files.items()}
    assert plans["searched"]["settings"]["rounding"] == "searched"
    assert plans["llama"]["settings"]["rounding"] == "llama.cpp"
    src, a, b = open_gguf(tiny_model), open_gguf(files["searched"]), open_gguf(files["llama"])
    searched = [t for t in a.tensors.values() if t.qtype in searched_types]
    assert searched
    closer = 0
    for t in searched:
        assert b.tensors[t.name].qtype == t.qtype
        ref = src.rows(t.name)
        err = [float(((f.rows(t.name) - ref) ** 2).sum()) for f in (a, b)]
        assert err[0] <= err[1]
        closer += err[0] < err[1]
    assert closer == len(searched)


def test_with_gptq_the_fed_back_blocks_are_the_searched_ones(odd_model: Path, tmp_path: Path) -> None:
    """--gptq --search-rounding: the block feedback rounds each Q4_1 / Q5_1 block with the search and the file holds
    those bytes (llama.cpp would quantize the compensated copy its own way); ffn_down, rounded plainly, is searched
    after llama.cpp wrote it. Same types and size as without the search."""
    from gguf import GGUFReader

    from ggufmix.realize.rounding import AFFINE_32

    calib = write_calib_text(tmp_path)
    files = {}
    for name, extra in (("searched", ["--search-rounding"]), ("llama", [])):
        out = tmp_path / f"{name}.gguf"
        res = CliRunner().invoke(cli, ["-q", "build", str(odd_model), "--rows", "32", "--no-smoke", "--budget",
                                       "5.5bpw", "--types", "Q4_1,Q5_1,Q8_0", "--calib", str(calib), "--calib-chunks",
                                       "2", "--gptq", "-o", str(out), *extra])
        assert res.exit_code == 0, res.output
        files[name] = {t.name: (t.tensor_type, np.asarray(t.data)) for t in GGUFReader(out).tensors}
    settings = json.loads((tmp_path / "searched.plan.json").read_text())["settings"]
    assert settings["rounding"] == "searched" and settings["gptq"]["output_error_ratio"] < 1.0
    a, b = files["searched"], files["llama"]
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}
    ours = [n for n, (t, _) in a.items() if QuantType(int(t)) in AFFINE_32]
    differ = {n for n in ours if not np.array_equal(a[n][1], b[n][1])}
    fed, downs = [n for n in ours if "ffn_down" not in n], [n for n in ours if "ffn_down" in n]
    assert fed and downs and set(fed) <= differ and set(downs) <= differ, (fed, downs, differ)


def test_the_smoothing_patch_searches_the_smoothed_weights(tiny_model: Path, tmp_path: Path) -> None:
    """--calib without --gptq smooths the quantized file in place: patch_quantized rounds the smoothed weights again
    from the source, and with the search those blocks are the search's, closer to the smoothed values."""
    from functools import partial

    from tinymodel import loud_copy

    from ggufmix.engine.activations import collect_imatrix
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.build import quantize_plan
    from ggufmix.realize.smooth import SmoothOptions, choose_smoothing, patch_quantized
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    model, calib = loud_copy(tiny_model, tmp_path), write_calib_text(tmp_path)
    im = collect_imatrix(model, calib.read_text(), n_ctx=64, n_chunks=4, include_output=True, progress=False)
    src = open_gguf(model)
    plan = make_plan(score_source(open_source(model, False), ScoreOptions(max_rows=32), im, progress=False),
                     parse_budget("5.2bpw"), types=(QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K))
    found = choose_smoothing(src, plan, im, SmoothOptions(calib.read_text(), ctx=64, ffn=True))
    assert found is not None and found.active
    files = {}
    for search in (True, False):
        files[search] = tmp_path / f"{search}.gguf"
        quantize_plan(model, files[search], plan, im, patch=partial(patch_quantized, src=src, smoothing=found,
                                                                     imatrix=im, block_search=search))
    a, b = open_gguf(files[True]), open_gguf(files[False])
    patched = [e.name for e in plan.quantized()
               if e.qtype in (QuantType.Q4_K, QuantType.Q5_K) and found.scaling(e.name)]
    assert patched
    for n in patched:
        assert not np.array_equal(a.rows(n), b.rows(n)), n
    others = [e.name for e in plan.quantized() if not found.scaling(e.name)]
    assert all(np.array_equal(a.rows(n), b.rows(n)) for n in others)  # the rest is write_searched's, after
