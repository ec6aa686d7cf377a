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
