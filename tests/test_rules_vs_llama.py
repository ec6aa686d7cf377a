"""Differential tests: our mirror of llama-quant.cpp against llama.cpp's own output."""
from __future__ import annotations

from pathlib import Path

import pytest

from ggufmix.engine.quantize import quantize_file
from ggufmix.io.gguf_source import open_gguf
from ggufmix.layout import rules
from ggufmix.realize.overrides import tensor_pattern
from ggufmix.types import QuantType, block_size, mix_file_type


def _llama_model_size(path: Path) -> int:
    from ggufmix.engine.llamalib import llama

    lib = llama()
    params = lib.llama_model_default_params()
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    assert model
    try:
        return int(lib.llama_model_size(model))
    finally:
        lib.llama_model_free(model)


@pytest.mark.parametrize("mix", ["Q2_K", "Q4_K_M", "Q6_K"])
def test_size_accounting_matches_llama(odd_model: Path, tmp_path: Path, mix: str) -> None:
    out = tmp_path / f"{mix}.gguf"
    quantize_file(odd_model, out, ftype=mix_file_type(mix), progress=False)
    src = open_gguf(out)
    assert src.total_bytes == _llama_model_size(out)


@pytest.mark.parametrize("target", [QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K, QuantType.Q5_K,
                                    QuantType.Q6_K, QuantType.IQ4_XS, QuantType.Q2_0])
def test_fallback_mirror(odd_model: Path, tmp_path: Path, target: QuantType) -> None:
    """Ask llama.cpp for ``target`` on every quantizable tensor; it must write what rules.fallback says."""
    src = open_gguf(odd_model)
    names = [n for n, t in src.tensors.items() if rules.allows_quantization(n, t.n_dims, src.arch)]
    out = tmp_path / "fb.gguf"
    quantize_file(odd_model, out, ftype=mix_file_type("Q8_0"), overrides=[(tensor_pattern(n), target) for n in names],
                  progress=False)
    written = open_gguf(out).tensors
    for n in names:
        assert written[n].qtype == rules.fallback(target, src.tensors[n].ncols), n
    fell_back = any(written[n].qtype != target for n in names)
    assert fell_back == (block_size(target) == 256)  # rows of 320 take 32/64 blocks, never 256


def test_allows_quantization_matches_llama(odd_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q8.gguf"
    quantize_file(odd_model, out, ftype=mix_file_type("Q8_0"), progress=False)
    src, written = open_gguf(odd_model), open_gguf(out)
    for n, t in src.tensors.items():
        assert (written.tensors[n].qtype != t.qtype) == rules.allows_quantization(n, t.n_dims, src.arch), n


def test_rule_tables() -> None:
    assert not rules.allows_quantization("blk.0.attn_norm.weight", 1)
    assert not rules.allows_quantization("blk.0.ffn_gate_inp.weight", 2)
    assert rules.allows_quantization("blk.0.ffn_down_exps.weight", 3)
    assert rules.role("blk.3.attn_v.weight") == "attn_v" and rules.layer("blk.3.attn_v.weight") == 3
    assert rules.fallback(QuantType.Q4_K, 576) == QuantType.Q5_0
    assert rules.fallback(QuantType.Q4_K, 100) == QuantType.F16
    assert rules.requires_imatrix("blk.0.ffn_up.weight", QuantType.IQ2_XS)
    assert not rules.requires_imatrix("token_embd.weight", QuantType.IQ3_XXS)  # llama.cpp exempts embeddings
    assert rules.requires_imatrix("token_embd.weight", QuantType.IQ2_XS)  # ... but ggml's kernel aborts anyway
