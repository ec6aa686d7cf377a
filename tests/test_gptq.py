"""GPTQ-style error feedback: the pure numerics on synthetic inputs, the real quantizer's block independence,
and `build --gptq` on a tiny real model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tinymodel import write_calib_text

from ggufmix.cli import cli
from ggufmix.realize.compensate import COLUMN_TYPES
from ggufmix.realize.gptq import compensate, feedback_steps, inverse_factor, output_error
from ggufmix.types import QuantType


def _correlated_inputs(rng: np.random.Generator, n: int, cols: int) -> np.ndarray:
    """Inputs with a few strong shared directions, as hidden states have (the same directions for every draw)."""
    directions = np.random.default_rng(99).normal(size=(4, cols)) * 3
    return (rng.normal(size=(n, 4)) @ directions + rng.normal(size=(n, cols))).astype(np.float32)


def _steps(h: np.ndarray, block: int = 32) -> list[np.ndarray]:
    return feedback_steps(inverse_factor(h), block)


def _grid(step: float):  # noqa: ANN202
    """A stand-in quantizer for the pure tests: round to a fixed grid."""
    return lambda block, cols: np.round(block / step) * step


def test_feedback_lowers_the_output_error_on_correlated_inputs() -> None:
    rng = np.random.default_rng(0)
    x = _correlated_inputs(rng, 2048, 128)
    h = x.T.astype(np.float64) @ x
    w = rng.normal(size=(64, 128)).astype(np.float32)
    roundtrip = _grid(0.25)
    wc = compensate(w, _steps(h), 32, roundtrip)
    plain, fed = output_error(w, roundtrip(w, slice(None)), h), output_error(w, roundtrip(wc, slice(None)), h)
    assert fed < 0.7 * plain, (fed, plain)
    # it holds on inputs the matrix never saw, from the same distribution
    y = _correlated_inputs(np.random.default_rng(1), 2048, 128)
    hy = y.T.astype(np.float64) @ y
    assert output_error(w, roundtrip(wc, slice(None)), hy) < 0.8 * output_error(w, roundtrip(w, slice(None)), hy)


def test_the_factor_is_the_cholesky_of_the_inverse() -> None:
    """``inverse_factor`` (one Cholesky, one triangular inverse) against the textbook: factor the damped inverse."""
    from ggufmix.realize.gptq import DAMP

    rng = np.random.default_rng(6)
    x = _correlated_inputs(rng, 900, 600)
    h = x.T.astype(np.float64) @ x
    damped = h + DAMP * np.mean(np.diag(h)) * np.eye(600)
    reference = np.linalg.cholesky(np.linalg.inv(damped)).T
    u = inverse_factor(h)
    assert np.allclose(np.triu(u), u)
    np.testing.assert_allclose(u, reference, rtol=2e-3, atol=1e-5 * np.abs(reference).max())


def test_uncorrelated_inputs_leave_the_weight_alone() -> None:
    """With a diagonal H no later column can cancel an error: the weight is returned as it was."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(8, 64)).astype(np.float32)
    wc = compensate(w, _steps(np.diag(rng.uniform(0.5, 2, 64))), 32, _grid(0.3))
    np.testing.assert_allclose(wc, w, atol=1e-6)


def test_inputs_that_never_fire_take_no_error() -> None:
    rng = np.random.default_rng(3)
    x = _correlated_inputs(rng, 512, 64)
    x[:, 40] = 0
    w = rng.normal(size=(4, 64)).astype(np.float32)
    wc = compensate(w, _steps(x.T.astype(np.float64) @ x), 32, _grid(0.3))
    assert wc[:, 40] == pytest.approx(w[:, 40]) and np.isfinite(wc).all()


def test_shapes_must_match_the_block() -> None:
    with pytest.raises(ValueError, match="blocks of 32"):
        feedback_steps(np.eye(48, dtype=np.float32), 32)
    with pytest.raises(ValueError, match="do not match"):
        compensate(np.zeros((2, 64), np.float32), _steps(np.eye(48), 16), 32, _grid(1))


@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q6_K, QuantType.IQ4_XS, QuantType.Q8_0,
                                   QuantType.Q3_K, QuantType.Q5_K, QuantType.Q2_K, QuantType.IQ4_NL, QuantType.IQ3_S,
                                   QuantType.IQ2_XS])
def test_llama_cpp_rounds_each_block_on_its_own(qtype: QuantType) -> None:
    """The claim compensate() rests on: quantizing whole rows gives the blocks quantized one at a time, so the
    file llama_model_quantize writes from the compensated weight is what the feedback saw."""
    from ggufmix.engine.oracle import quant_roundtrip
    from ggufmix.types import block_size

    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 1024)).astype(np.float32)
    im = rng.uniform(0.1, 3, size=(1, 1024)).astype(np.float32)
    whole = quant_roundtrip(w, qtype, im)
    bs = block_size(qtype)
    parts = np.concatenate([quant_roundtrip(np.ascontiguousarray(w[:, i:i + bs]), qtype, im[:, i:i + bs])
                            for i in range(0, 1024, bs)], axis=1)
    np.testing.assert_array_equal(whole, parts)


def _columns_case(qtype: QuantType, seed: int):  # noqa: ANN202
    """A weight, its inputs' H, an imatrix, and the build's column-by-column result on llama.cpp's grid with its
    bytes."""
    from ggufmix.realize.compensate import _Inputs

    rng = np.random.default_rng(seed)
    x = _correlated_inputs(rng, 4096, 512)
    h = x.T.astype(np.float64) @ x
    w = rng.normal(size=(48, 512)).astype(np.float32)
    im = np.diag(h).astype(np.float32)
    rounded, packed = _Inputs(h, inverse_factor(h), {}, im, 1).compensate(w, qtype, None)
    return w, h, im, rounded, packed


@pytest.mark.parametrize("qtype", sorted(COLUMN_TYPES), ids=lambda t: t.name)
def test_columns_inside_the_block_lower_the_error_further(qtype: QuantType) -> None:
    """Column by column on the block's grid against the block feedback, both with llama.cpp's own rounding."""
    from ggufmix.engine.oracle import quant_roundtrip
    from ggufmix.types import block_size

    w, h, im, rounded, _ = _columns_case(qtype, 10)
    bs = block_size(qtype)

    def roundtrip(block: np.ndarray, cols: slice) -> np.ndarray:
        return quant_roundtrip(np.ascontiguousarray(block), qtype, im[None, cols])
    blocks = quant_roundtrip(compensate(w, _steps(h, bs), bs, roundtrip), qtype, im[None, :])
    plain = output_error(w, quant_roundtrip(w, qtype, im[None, :]), h)
    assert output_error(w, rounded, h) < 0.9 * output_error(w, blocks, h) < 0.9 * plain


@pytest.mark.parametrize("qtype", sorted(COLUMN_TYPES), ids=lambda t: t.name)
def test_the_packed_bytes_read_back_as_the_rounded_values(qtype: QuantType) -> None:
    """The codes packed into llama.cpp's blocks are what the feedback rounded, value for value."""
    from ggufmix.engine.kernels import dequantize_rows

    _, _, _, rounded, packed = _columns_case(qtype, 11)
    np.testing.assert_array_equal(dequantize_rows(packed, qtype, rounded.shape[1]), rounded)


@pytest.mark.parametrize("qtype", [QuantType.Q4_K, QuantType.Q5_K, QuantType.IQ4_XS])
def test_llama_cpp_would_round_some_of_them_elsewhere(qtype: QuantType) -> None:
    """Why the bytes are packed rather than the values handed to llama.cpp: its scale search finds another grid
    for some of them."""
    from ggufmix.engine.oracle import quant_roundtrip

    _, _, im, rounded, _ = _columns_case(qtype, 11)
    assert np.mean(quant_roundtrip(rounded, qtype, im[None, :]) == rounded) < 0.99


def test_a_block_of_zeros_stays_zero_on_the_grid() -> None:
    from ggufmix.realize.gptq import on_grid

    x = np.array([0.0, 0.3, -0.2], np.float32)
    got, codes = on_grid(x, np.array([0.0, 0.1, 0.1], np.float32), np.array([0.0, -3.2, -3.2], np.float32), (0, 63))
    np.testing.assert_allclose(got, [0.0, 0.3, -0.2], atol=1e-6)
    assert codes.tolist() == [0, 35, 30]
    assert on_grid(np.array([9.0], np.float32), np.array([0.1], np.float32), np.array([-3.2], np.float32),
                   (0, 63))[0][0] == pytest.approx(3.1)


def test_levels_round_to_the_nearest_whatever_the_scale_s_sign() -> None:
    from ggufmix.realize.gptq import on_levels

    levels = np.array([-4.0, -1.0, 1.0, 5.0], np.float32)
    x = np.array([2.9, 3.1, -0.2, 0.1, 0.3, -9.0], np.float32)
    step = np.array([1.0, 1.0, 0.1, -0.1, 0.0, -1.0], np.float32)
    got, codes = on_levels(x, step, levels)
    assert codes.tolist() == [2, 3, 1, 1, codes[4], 3]
    np.testing.assert_allclose(got, [1.0, 5.0, -0.1, 0.1, 0.0, -5.0], atol=1e-6)


@pytest.mark.parametrize("qtype", [QuantType.Q4_0, QuantType.Q4_1, QuantType.Q5_0, QuantType.Q5_1])
def test_the_legacy_types_weigh_by_the_whole_row(qtype: QuantType) -> None:
    """Q4_0..Q5_1 with an imatrix weigh each value by the whole row's mean square (llama.cpp's quantize_row_q4_0_impl
    and kin), so a block alone rounds a quarter of its values differently; the error is the same within 1%."""
    from ggufmix.engine.oracle import quant_roundtrip

    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 1024)).astype(np.float32)
    im = rng.uniform(0.1, 3, size=(1, 1024)).astype(np.float32)
    whole = quant_roundtrip(w, qtype, im)
    parts = np.concatenate([quant_roundtrip(np.ascontiguousarray(w[:, i:i + 32]), qtype, im[:, i:i + 32])
                            for i in range(0, 1024, 32)], axis=1)
    assert not np.array_equal(whole, parts)
    assert np.sum((parts - w) ** 2) == pytest.approx(np.sum((whole - w) ** 2), rel=0.01)


# Types of 32-value blocks: the tiny model's 256-column weights hold eight, so every block but the last has later
# columns to move its error onto (with one 256-value K block per row there is none, only ffn_down has two).
SMALL_BLOCKS = ("--budget", "5bpw", "--types", "Q4_0,Q5_0,Q8_0")


def _plain_and_gptq(model: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    """The same build of ``model`` without and with --gptq, on ``write_calib_text``."""
    common = ["-q", "build", str(model), "--rows", "32", "--no-smoke", "--calib", str(write_calib_text(tmp_path)),
              "--calib-chunks", "2", *extra]
    plain, fed = tmp_path / "plain.gguf", tmp_path / "gptq.gguf"
    for args in ([*common, "-o", str(plain)], [*common, "--gptq", "-o", str(fed)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output
    return plain, fed


def _changed(a: Path, b: Path) -> set[str]:
    from gguf import GGUFReader

    ra, rb = ({t.name: np.asarray(t.data) for t in GGUFReader(p).tensors} for p in (a, b))
    return {n for n in ra if not np.array_equal(ra[n], rb[n])}


def test_build_gptq_on_a_real_model(tiny_model: Path, tmp_path: Path) -> None:
    """`build --gptq`: same types and size as without it, the compensated weights' output error on the calibration
    text below plain rounding's (recorded in the plan), an untied token_embd left alone, no copy of the source
    left behind."""
    from ggufmix.io.gguf_source import open_gguf

    plain, fed = _plain_and_gptq(tiny_model, tmp_path, *SMALL_BLOCKS)
    a, b = open_gguf(plain), open_gguf(fed)
    assert {n: t.qtype for n, t in a.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
    assert a.total_bytes == b.total_bytes
    settings = json.loads(fed.with_suffix(".plan.json").read_text())["settings"]["gptq"]
    assert settings["weights"] > 0 and settings["output_error_ratio"] < 1.0, settings
    assert settings["chunks"] == settings["text_chunks"] == 2, settings
    changed = _changed(plain, fed)
    assert "token_embd.weight" not in changed and any(n.startswith("blk.") for n in changed), changed
    assert not [n for n in changed if "ffn_down" in n] and settings["plain_roles"] == ["ffn_down"], changed
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_gptq_all_compensates_ffn_down_too(tiny_model: Path, tmp_path: Path) -> None:
    """--gptq-all: the ffn_down weights --gptq rounds plainly change as well, and nothing else changes with them."""
    plain, fed = _plain_and_gptq(tiny_model, tmp_path, *SMALL_BLOCKS)
    every = tmp_path / "all.gguf"
    res = CliRunner().invoke(cli, ["-q", "build", str(tiny_model), "--rows", "32", "--no-smoke", "--calib",
                                   str(tmp_path / "calib.txt"), "--calib-chunks", "2", *SMALL_BLOCKS, "--gptq",
                                   "--gptq-all", "-o", str(every)])
    assert res.exit_code == 0, res.output
    downs = {n for n in _changed(plain, every) if "ffn_down" in n}
    assert downs and _changed(fed, every) == downs, (downs, _changed(fed, every))
    settings = json.loads(every.with_suffix(".plan.json").read_text())["settings"]["gptq"]
    assert settings["plain_roles"] == [] and settings["output_error_ratio"] < 1.0, settings


def test_a_tied_embedding_is_compensated_as_the_output_head(odd_model: Path, tmp_path: Path) -> None:
    """With no output.weight, token_embd is the head: its feedback changes its values, not its type."""
    from ggufmix.io.gguf_source import open_gguf

    plain, fed = _plain_and_gptq(odd_model, tmp_path, "--budget", "5.5bpw")
    a, b = open_gguf(plain), open_gguf(fed)
    assert "output.weight" not in b.tensors
    assert a.tensors["token_embd.weight"].qtype == b.tensors["token_embd.weight"].qtype
    assert "token_embd.weight" in _changed(plain, fed)
    settings = json.loads(fed.with_suffix(".plan.json").read_text())["settings"]["gptq"]
    assert settings["output_error_ratio"] < 1.0, settings


def test_gptq_reads_32_chunks_unless_told(tiny_model: Path, tmp_path: Path) -> None:
    """Without --calib-chunks, --gptq asks for 32 chunks (lim and lieq keep 8); the plan records how many the text
    held, here fewer."""
    fed = tmp_path / "gptq.gguf"
    res = CliRunner().invoke(cli, ["-q", "build", str(tiny_model), "--rows", "32", "--no-smoke", "--calib",
                                   str(write_calib_text(tmp_path)), *SMALL_BLOCKS, "--gptq", "-o", str(fed)])
    assert res.exit_code == 0, res.output
    settings = json.loads(fed.with_suffix(".plan.json").read_text())["settings"]["gptq"]
    assert settings["chunks"] == 32 and 2 < settings["text_chunks"] < 32, settings


def test_gptq_needs_calibration_text(tiny_model: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["build", str(tiny_model), "--budget", "4.5bpw", "--gptq", "-o",
                                   str(tmp_path / "o.gguf")])
    assert res.exit_code != 0 and "--calib" in res.output and not (tmp_path / "o.gguf").exists()
    (tmp_path / "t.txt").write_text("some calibration text " * 50)
    res = CliRunner().invoke(cli, ["build", str(tiny_model), "--budget", "4.5bpw", "--gptq-all", "--calib",
                                   str(tmp_path / "t.txt"), "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code != 0 and "--gptq" in res.output and not (tmp_path / "o.gguf").exists()


def test_the_file_holds_the_columns_as_the_feedback_rounded_them(tiny_model: Path, tmp_path: Path) -> None:
    """llama.cpp's scale search would put some of Q4_K's, Q5_K's and IQ4_XS's column-rounded values on another grid
    when it quantizes the compensated copy; write_exact puts the feedback's own bytes in its place."""
    from functools import partial

    from ggufmix.engine.kernels import dequantize_rows
    from ggufmix.engine.oracle import to_float32
    from ggufmix.io.gguf_source import writable_tensors
    from ggufmix.plan.budget import parse_budget
    from ggufmix.plan.planner import make_plan
    from ggufmix.realize.build import quantize_plan
    from ggufmix.realize.compensate import GptqOptions, compensated_source, write_exact
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    scores = score_source(open_source(tiny_model, False), ScoreOptions(max_rows=32), None, progress=False)
    plan = make_plan(scores, parse_budget("4.5bpw"), types=(QuantType.Q4_K, QuantType.IQ4_XS, QuantType.Q5_K))
    opts = GptqOptions(write_calib_text(tmp_path).read_text(encoding="utf-8"), chunks=2)
    exact, plain = tmp_path / "exact.gguf", tmp_path / "plain.gguf"

    def values(path: Path, names: dict) -> dict[str, np.ndarray]:  # noqa: ANN001
        with writable_tensors(path) as tensors:
            return {n: (dequantize_rows(raw.reshape(info.nrows, -1), info.qtype, info.ncols)
                        if info.qtype == names[n] else to_float32(raw, info.qtype).reshape(info.nrows, info.ncols))
                    for n, (info, raw) in tensors.items() if n in names}
    with compensated_source(tiny_model, exact, plan, None, opts, progress=False) as (copy, done):
        quantize_plan(copy, exact, plan, None, progress=False, patch=partial(write_exact, done=done))
        quantize_plan(copy, plain, plan, None, progress=False)
        types = {n: ex.qtype for n, ex in done.exact.items()}
        rounded = values(copy, {n: None for n in types})
    assert {QuantType.Q5_K, QuantType.IQ4_XS} <= set(types.values()), types
    for name, got in values(exact, types).items():
        np.testing.assert_allclose(got, rounded[name], rtol=1e-3, atol=1e-6, err_msg=name)  # the copy is F16
    off = [n for n, got in values(plain, types).items() if not np.allclose(got, rounded[n], rtol=1e-3, atol=1e-6)]
    assert off, "llama.cpp gave every value back: write_exact would not be needed"
