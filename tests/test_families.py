"""Ten architecture families end to end: tiny random HF folder -> llama.cpp's converter -> build -> validate (CPU).

Each family is a line of tests/tinyhf.FAMILIES. Three run in CI; the rest are marked slow (the converter imports
torch and transformers for every family). The table in README.md lists the families and the command.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

for _mod in ("torch", "transformers", "sentencepiece"):  # the converter's own dependencies (extra "hf")
    pytest.importorskip(_mod)

from ggufmix.cli import cli  # noqa: E402
from tinyhf import write_tiny_hf  # noqa: E402

# family -> (GGUF architecture llama.cpp's converter writes, validate's mode)
FAMILY_ARCH = {
    "llama": ("llama", "logits"),
    "mistral": ("llama", "logits"),  # llama.cpp converts Mistral to its llama graph
    "qwen2": ("qwen2", "logits"),
    "qwen3": ("qwen3", "logits"),
    "gemma2": ("gemma2", "logits"),
    "gemma3": ("gemma3", "logits"),
    "phi3": ("phi3", "logits"),
    "granite": ("granite", "logits"),
    "mixtral": ("llama", "logits"),  # MoE: llama.cpp's llama graph with experts
    "xlm_roberta": ("bert", "embeddings"),
}
IN_CI = {"llama", "gemma3", "xlm_roberta"}
# a mix of 32-block and K types that every family's row lengths take
TYPES = "Q5_0,Q5_1,Q3_K,IQ4_NL,Q2_K"




@pytest.mark.parametrize("family,expect", [pytest.param(f, v, id=f, marks=() if f in IN_CI else pytest.mark.slow)
                                           for f, v in FAMILY_ARCH.items()])
def test_family_converts_builds_and_validates(family: str, expect: tuple[str, str], converter_cache: Path, tmp_path: Path) -> None:
    arch, mode = expect
    folder = write_tiny_hf(tmp_path / family, family, seed=3)
    out = tmp_path / f"{family}.gguf"
    budget = "6.5bpw" if mode == "embeddings" else "5.0bpw"  # BERT keeps its position embeddings in F32
    res = CliRunner().invoke(cli, ["-q", "build", str(folder), "--budget", budget, "--types", TYPES, "--rows", "16",
                                   "-o", str(out), "--validate", "--ctx", "256"])
    assert res.exit_code == 0, (res.output, res.exception)
    doc = json.loads((tmp_path / f"{family}.validate.json").read_text())
    assert (doc["arch"], doc["mode"]) == (arch, mode)
    cpu = doc["rows"][0]
    assert cpu["ok"] and cpu["device"].upper().startswith("CPU"), cpu
    ref = cpu["vs_reference"]
    if mode == "embeddings":
        assert 0.5 < ref["cos_min"] <= 1.0 + 1e-6 and ref["n"] >= 8
        assert cpu["vs_cpu"]["cos_min"] == pytest.approx(1.0, abs=1e-5)
    else:
        # a random model may be so peaked that quantizing it changes nothing measurable (qwen3 here)
        assert -1e-6 <= ref["kld"] < 1.0 and ref["top1"] > 0.3 and ref["n"] > 100
        assert cpu["vs_cpu"]["kld"] == pytest.approx(0.0, abs=1e-6)
