"""The erased-column guard: a quiet column beside a loud one, rounded by llama.cpp's real quantizers, and a build
whose file keeps that column."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
from click.testing import CliRunner

from ggufmix.cli import cli
from ggufmix.engine.oracle import quant_roundtrip
from ggufmix.realize.guard import ERASED, column_errors, raise_factors
from ggufmix.types import QuantType

QUIET, LOUD = 5, 0  # columns of one 32-column block


def _quiet_beside_loud(rng: np.random.Generator, rows: int = 64, cols: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Weights whose column QUIET is 10x smaller than its neighbours, importances with column LOUD 1000x the rest
    (Qwen2.5-Coder-1.5B's blk.2.ffn_down, columns 8317 and 8300)."""
    w = rng.normal(scale=0.02, size=(rows, cols)).astype(np.float32)
    w[:, QUIET] *= 0.1
    w[:, LOUD] = rng.normal(scale=0.06, size=rows)
    v = np.ones(cols, np.float32)
    v[LOUD] = 1000.0
    return w, v


def _rounder(w: np.ndarray, qtype: QuantType):  # noqa: ANN202
    return lambda values: quant_roundtrip(w, qtype, values.reshape(1, -1))


def test_column_errors_are_relative_per_column() -> None:
    w = np.array([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]], np.float32)
    rounded = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]], np.float32)
    np.testing.assert_allclose(column_errors(w, rounded), [np.sqrt(0.5), 0.0, 1.0])


def test_q4_k_erases_a_quiet_column_beside_a_loud_one_and_the_raise_brings_it_back() -> None:
    w, v = _quiet_beside_loud(np.random.default_rng(0))
    round_q4 = _rounder(w, QuantType.Q4_K)
    assert column_errors(w, round_q4(v))[QUIET] > ERASED  # the imatrix-weighted scale/min search drops it
    assert column_errors(w, quant_roundtrip(w, QuantType.Q4_K, None))[QUIET] < column_errors(w, round_q4(v))[QUIET]
    factors = raise_factors(w, v, round_q4)
    assert factors is not None and list(np.flatnonzero(factors != 1)) == [QUIET]
    raised = v * factors
    assert (column_errors(w, round_q4(raised)) <= ERASED).all()
    # what the raise costs the rest, weighted as the imatrix weighs it: little
    weighted = [float(((round_q4(x) - w) ** 2 * v).sum()) for x in (v, raised)]
    assert weighted[1] < 1.1 * weighted[0], weighted


def test_a_raise_that_pushes_a_neighbour_over_is_followed_by_its_raise() -> None:
    """Quiet columns of all sizes beside a loud one: raising the erased one alone (30x) pushes another of its block
    over, as with Qwen2.5-Coder-1.5B's column 8317 and its neighbours 8290 and 8310; every column is checked again."""
    rng = np.random.default_rng(40)
    w = rng.normal(scale=0.02, size=(64, 256)).astype(np.float32)
    w[:, 1:32] *= rng.uniform(0.05, 0.6, size=31)
    w[:, LOUD] = rng.normal(scale=0.06, size=64)
    v = np.ones(256, np.float32)
    v[LOUD] = 1000.0
    round_q4 = _rounder(w, QuantType.Q4_K)
    erased = column_errors(w, round_q4(v)) > ERASED
    once = np.where(erased, v * 30, v)
    pushed = (column_errors(w, round_q4(once)) > ERASED) & ~erased
    assert erased.any() and pushed.any()
    factors = raise_factors(w, v, round_q4)
    assert factors is not None and (factors[pushed] > 1).all()
    assert (column_errors(w, round_q4(v * factors)) <= ERASED).all()


def test_nothing_is_raised_where_nothing_is_erased_nothing_helps_or_the_column_is_dead() -> None:
    rng = np.random.default_rng(1)
    even = rng.normal(scale=0.02, size=(64, 256)).astype(np.float32)
    assert raise_factors(even, np.ones(256, np.float32), _rounder(even, QuantType.Q4_K)) is None  # none erased
    w, v = _quiet_beside_loud(rng)
    assert raise_factors(w, v, _rounder(w, QuantType.Q8_0)) is None                # Q8_0 erases nothing
    assert raise_factors(w, v, _rounder(w, QuantType.Q3_K)) is None                # erased whatever the raise
    w[:, QUIET] *= 0.9  # weights under a tenth of the median column's (Qwen2.5-Coder-1.5B's blk.1.attn_v)
    round_q4 = _rounder(w, QuantType.Q4_K)
    quiet, dead = v.copy(), v.copy()
    quiet[QUIET], dead[QUIET] = 0.2, 0.09
    assert raise_factors(w, quiet, round_q4) is not None                 # its input still a fifth of the median's
    assert column_errors(w, round_q4(dead))[QUIET] > ERASED
    assert raise_factors(w, dead, round_q4) is None                      # a tenth too: dead, left alone


def _quiet_column_copy(model: Path, folder: Path, name: str) -> Path:
    out = folder / "quiet.f16.gguf"
    shutil.copyfile(model, out)
    reader = gguf.GGUFReader(out, "r+")
    data = np.asarray(next(t for t in reader.tensors if t.name == name).data)
    data[:, QUIET] *= 0.1  # (rows, cols) as numpy sees a GGUF matrix
    reader.data.flush()
    return out


def test_build_keeps_the_column_the_imatrix_would_erase(tiny_model: Path, tmp_path: Path) -> None:
    from ggufmix.engine.activations import collect_imatrix
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.io.imatrix import write_imatrix_gguf

    name = "blk.1.ffn_down.weight"
    model = _quiet_column_copy(tiny_model, tmp_path, name)
    im = collect_imatrix(model, list(range(3, 259)), n_ctx=64, progress=False)
    sums = dict(im.sums)
    loud = np.array(sums[name])
    loud[LOUD] = 1000.0 * np.median(loud)
    sums[name] = loud
    im_path = write_imatrix_gguf(tmp_path / "im.gguf", replace(im, sums=sums))
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["build", str(model), "--budget", "5bpw", "--types", "Q4_K,Q6_K", "--pin",
                                   rf"{name.replace('.', '[.]')}=Q4_K", "--imatrix", str(im_path), "--no-smoke",
                                   "--rows", "64", "-o", str(out)])
    assert res.exit_code == 0, res.output
    guard = json.loads(out.with_suffix(".plan.json").read_text())["settings"]["guard"]
    assert list(guard["columns"].get(name, {})) == [str(QUIET)], guard
    w = open_gguf(model).rows(name)
    t = next(t for t in gguf.GGUFReader(out).tensors if t.name == name)
    written = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert column_errors(w, written)[QUIET] <= ERASED  # in the file llama.cpp wrote
    plain = quant_roundtrip(w, QuantType.Q4_K, (loud / im.counts[name][0]).reshape(1, -1).astype(np.float32))
    assert column_errors(w, plain)[QUIET] > ERASED     # what the imatrix alone would have written
