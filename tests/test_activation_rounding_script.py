"""scripts/bench_activation_rounding.py on a tiny model: a Q8_0 file against its own weights in F16."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scriptload import load_script

ar = load_script("bench_activation_rounding.py")
WORDS = "the of and to in is was for on that with as by at from river city music north station".split()


def test_input_rounding_adds_to_the_weights_kld(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    tinymodel = pytest.importorskip("tinymodel")
    from ggufmix.engine.quantize import quantize_file
    from ggufmix.types import FileType

    base = tinymodel.write_tiny_llama(tmp_path / "base.gguf", seed=0)
    quant = tmp_path / "q8.gguf"
    quantize_file(base, quant, ftype=FileType.MOSTLY_Q8_0, progress=False)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(np.random.default_rng(0).choice(WORDS, size=1500)) + ".")

    assert ar.main([str(base), str(quant), "--text", str(text), "--ctx", "64", "--chunks", "4",
                    "--tmp", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| q8.gguf |" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "q8.gguf", "text.txt"]  # the copy is gone

    row = ar.measure(base, quant, text.read_text(), chunks=4, ctx=64, tmp=tmp_path)
    # On this model Q8_0's weights alone lose next to nothing (the KLD estimate is 0 within its sampling); the
    # CPU's rounding of their inputs to Q8_0 is what the file loses (measured: 9.6e-5 against -2.4e-6)
    assert row.file_kld > 1e-5
    assert abs(row.f16_kld) < 0.1 * row.file_kld
    assert row.rounding_share > 0.9
    assert row.difference == pytest.approx(row.f16_kld - row.file_kld, abs=1e-9)


def test_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("some words")
    assert ar.main([str(tmp_path / "base.gguf"), str(tmp_path / "none.gguf"), "--text", str(text)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "none.gguf" in err and "\n" not in err


def test_a_file_with_types_gguf_py_lacks_is_copied_into_the_base(tmp_path: Path) -> None:
    """gguf-py 0.19 refuses a file holding Q2_0 (which plans may take); the F16 copy reads it through ggml: each
    tensor's values are the quantized file's, stored in the base's own types."""
    pytest.importorskip("llama_cpp")
    tinymodel = pytest.importorskip("tinymodel")
    from ggufmix.engine.kernels import dequantize_rows
    from ggufmix.engine.quantize import quantize_file
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.types import FileType, QuantType

    base = tinymodel.write_tiny_llama(tmp_path / "base.gguf", seed=0)
    quant = tmp_path / "q2.gguf"
    quantize_file(base, quant, ftype=FileType.MOSTLY_Q8_0, overrides=[(r"^blk\.0\.ffn_up\.weight$", QuantType.Q2_0)],
                  progress=False)
    q = open_gguf(quant)
    assert q.tensors["blk.0.ffn_up.weight"].qtype == QuantType.Q2_0
    copy = tmp_path / "copy.gguf"
    ar.weights_in_float(base, quant, copy)
    c, b = open_gguf(copy), open_gguf(base)
    assert {n: t.qtype for n, t in c.tensors.items()} == {n: t.qtype for n, t in b.tensors.items()}
    for name in ("blk.0.ffn_up.weight", "blk.0.attn_q.weight"):
        info = q.tensors[name]
        want = dequantize_rows(q.read_into(name, 0, info.nrows, np.empty(info.n_bytes, np.uint8)), info.qtype,
                               info.ncols)
        np.testing.assert_allclose(c.rows(name), want, rtol=1e-3, atol=1e-6)  # stored in F16
        assert not np.allclose(c.rows(name), b.rows(name), rtol=1e-3, atol=1e-6)


def test_a_file_from_another_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("llama_cpp")
    tinymodel = pytest.importorskip("tinymodel")
    base = tinymodel.write_tiny_llama(tmp_path / "base.gguf", seed=0)
    other = tinymodel.write_tiny_llama(tmp_path / "other.gguf", seed=0, n_embd=64)
    text = tmp_path / "text.txt"
    text.write_text("some words " * 100)
    assert ar.main([str(base), str(other), "--text", str(text), "--tmp", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "other.gguf" in err and "base.gguf" in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf", "other.gguf", "text.txt"]
