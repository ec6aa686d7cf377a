"""Mixture-of-experts models end to end: tiny random Qwen3-MoE, Mixtral, DeepSeek-V2 (MLA, a shared expert,
a dense first block) and gpt-oss (biases, attention sinks) folders through llama.cpp's real converter and
``ggufmix build``; the output loads and generates in llama.cpp. Stacked 3-D experts are sampled in every
expert, and ``inspect`` reports bytes per group (experts, shared experts, routers, attention, dense ffn,
embeddings).
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from ggufmix.cli import cli
from ggufmix.errors import InputError
from ggufmix.layout.groups import group


@pytest.mark.parametrize("family,arch", [("qwen3_moe", "qwen3moe"), ("mixtral", "llama"), ("deepseek_v2", "deepseek2"),
                                         # 21 s here (twice mixtral's): slow; its refusal test below runs in CI
                                         pytest.param("gpt_oss", "gpt-oss", marks=pytest.mark.slow)])
def test_moe_folder_builds_and_generates(family: str, arch: str, gpt2_vocab: Path, converter_cache: Path,
                                         tmp_path: Path) -> None:
    from tinyhf import write_tiny_hf

    folder = write_tiny_hf(tmp_path / family, family, seed=5, bpe_vocab=gpt2_vocab)
    out = tmp_path / "out.gguf"
    target = ["--bundle", str(tmp_path / "bundle")] if family == "deepseek_v2" else ["-o", str(out)]
    res = CliRunner().invoke(cli, ["-q", "build", str(folder), *target, "--budget", "5.0bpw", "--rows", "16"])
    assert res.exit_code == 0, res.output
    if family == "deepseek_v2":  # the model card gives bytes per group
        out = tmp_path / "bundle" / "model.gguf"
        card = (tmp_path / "bundle" / "README.md").read_text()
        assert "| experts | 3 |" in card and "| shared experts | 3 |" in card and "| dense ffn | 3 |" in card
    assert "smoke test:" in res.output and "tensors verified" in res.output
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    last = "blk.1."
    for w in ("gate", "up", "down"):
        assert len(shapes[f"{last}ffn_{w}_exps.weight"]) == 3 and shapes[f"{last}ffn_{w}_exps.weight"][2] == 4
    if family == "deepseek_v2":  # first_k_dense_replace=1, a shared expert, MLA's kv_b split by the converter
        assert "blk.0.ffn_up.weight" in shapes and "blk.0.ffn_up_exps.weight" not in shapes
        assert {f"{last}ffn_{w}_shexp.weight" for w in ("gate", "up", "down")} <= set(shapes)
        assert {f"{last}attn_k_b.weight", f"{last}attn_v_b.weight", f"{last}attn_kv_a_mqa.weight"} <= set(shapes)
    moe_blocks = 1 if family == "deepseek_v2" else 2
    biases = family == "gpt_oss"  # gpt-oss: every expert matrix and the router have a bias (kept F32)
    by_group = json.loads(CliRunner().invoke(cli, ["inspect", str(out), "--json"]).output)["by_group"]
    assert by_group["experts"]["tensors"] == (6 if biases else 3) * moe_blocks
    assert by_group["routers"]["tensors"] == (2 if biases else 1) * moe_blocks
    if biases:  # the biases are the experts' only F32 bytes: 3 per block, 4 experts x 256 floats
        assert by_group["experts"]["types"]["F32"] == 3 * moe_blocks * 4 * 256 * 4
        assert {f"{last}attn_sinks.weight", f"{last}ffn_gate_inp.bias"} <= set(shapes)
    assert ("shared experts" in by_group) == (family == "deepseek_v2")
    assert sum(g["bytes"] for g in by_group.values()) == sum(int(t.n_bytes) for t in reader.tensors)


def test_gpt_oss_mxfp4_experts_are_refused(gpt2_vocab: Path, converter_cache: Path, tmp_path: Path) -> None:
    """openai/gpt-oss ships MXFP4 experts, which the converter copies as they are: one line naming the file,
    the architecture and the type, non-zero exit, nothing written."""
    from tinyhf import mxfp4_experts, write_tiny_hf

    folder = mxfp4_experts(write_tiny_hf(tmp_path / "gpt_oss", "gpt_oss", seed=5, bpe_vocab=gpt2_vocab))
    out = tmp_path / "out.gguf"
    res = CliRunner().invoke(cli, ["-q", "build", str(folder), "-o", str(out), "--budget", "5.0bpw"])
    assert res.exit_code != 0 and not out.exists()
    assert isinstance(res.exception, InputError)  # the CLI's one-line "ggufmix: error:" (test_cli's requantize case)
    line = str(res.exception)
    assert "\n" not in line and ".gguf: gpt-oss tensor 'blk.0.ffn_down_exps.weight' is already MXFP4" in line
    assert "--allow-requantize" in line


def test_every_expert_is_sampled(tmp_path: Path) -> None:
    """128 rows of a tensor of more experts than that would miss experts: each expert gives at least one row."""
    from tinymodel import write_tiny_llama

    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.layout.slots import build_layout
    from ggufmix.score.stream import _job

    path = write_tiny_llama(tmp_path / "moe.gguf", n_layer=1, n_expert=8, n_expert_used=2, seed=2)
    src = open_gguf(path)
    slot = build_layout(src.arch, src.tensors.values()).by_name()["blk.0.ffn_up_exps.weight"]
    imat = np.ones((8, slot.shape[0]), np.float32)  # per-expert activations: the job then says each row's expert
    job = _job(src, slot, None, imat, 4, True)  # type: ignore[arg-type]
    assert sorted(set(job.row_groups.tolist())) == list(range(8)) and len(job.rows) == 8
    dense = build_layout(src.arch, src.tensors.values()).by_name()["blk.0.attn_q.weight"]
    assert len(_job(src, dense, None, None, 4, True).rows) == 4  # type: ignore[arg-type]


@pytest.mark.parametrize("name,expected", [
    ("blk.3.ffn_up_exps.weight", "experts"), ("blk.3.ffn_down_shexp.weight", "shared experts"),
    ("blk.3.ffn_gate_inp.weight", "routers"), ("blk.3.exp_probs_b.bias", "routers"),
    ("blk.3.attn_kv_a_mqa.weight", "attention"), ("blk.3.attn_k_b.weight", "attention"),
    ("blk.0.ffn_gate.weight", "dense ffn"), ("token_embd.weight", "embeddings"), ("output.weight", "embeddings"),
    ("blk.3.ffn_norm.weight", "other"), ("blk.3.attn_kv_a_norm.weight", "other"), ("output_norm.weight", "other"),
])
def test_report_groups(name: str, expected: str) -> None:
    assert group(name) == expected


def test_expert_usage_weights_the_measured_error() -> None:
    """With per-expert counts, an expert no token reached does not count; equal counts change nothing."""
    from ggufmix.engine import kernels
    from ggufmix.score.base import Kernels, TensorJob
    from ggufmix.score.quant_error import measured
    from ggufmix.types import QuantType

    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.standard_normal((8, 256)), 3 * rng.standard_t(2, (8, 256))]).astype(np.float32)
    groups = np.repeat([0, 1], 8)
    imat = rng.uniform(0.5, 2.0, (2, 256)).astype(np.float32)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows)
    cands = (QuantType.Q4_0, QuantType.Q8_0)

    def job(r: np.ndarray, g: np.ndarray, usage: np.ndarray | None) -> TensorJob:
        return TensorJob("blk.0.ffn_up_exps.weight", "ffn_up", 0, (256, 8, 2), cands, r, g, imat, k, usage=usage)

    plain = measured(job(rows, groups, None)).errors
    assert measured(job(rows, groups, np.array([1.0, 1.0]))).errors == plain
    only_first = measured(job(rows, groups, np.array([2.0, 0.0]))).errors
    assert only_first == pytest.approx(measured(job(rows[:8], groups[:8], None)).errors, rel=1e-12)
    assert only_first != plain


def test_usage_comes_from_the_imatrix_counts(tmp_path: Path) -> None:
    from tinymodel import write_tiny_llama

    from ggufmix.imatrix import Imatrix
    from ggufmix.io.gguf_source import open_gguf
    from ggufmix.layout.slots import build_layout
    from ggufmix.score.stream import _usage

    src = open_gguf(write_tiny_llama(tmp_path / "moe.gguf", n_layer=1, n_expert=2, n_expert_used=1, seed=2))
    slots = build_layout(src.arch, src.tensors.values()).by_name()
    im = Imatrix({"blk.0.ffn_up_exps.weight": np.ones(2 * 256), "blk.0.attn_q.weight": np.ones(256)},
                 {"blk.0.ffn_up_exps.weight": np.array([3, 1]), "blk.0.attn_q.weight": np.array([4])})
    assert _usage(im, slots["blk.0.ffn_up_exps.weight"]).tolist() == [1.5, 0.5]
    assert _usage(im, slots["blk.0.attn_q.weight"]) is None and _usage(None, slots["blk.0.ffn_up_exps.weight"]) is None
