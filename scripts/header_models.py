"""Header-only GGUFs of the largest open models, for planning without their weights.

Each file holds the real config keys and every tensor's info (name, shape, type) as llama.cpp's
``convert_hf_to_gguf.py`` would write it for that model, and no tensor data: what ``ggufmix score
--strategy fastewq|uniform`` and ``ggufmix plan --fit`` need, nothing else can read it. The shapes come
from the published config.json of each model (numbers below); the names mirror the converter's
``DeepseekV2Model``/``Qwen3MoeModel``/``LlamaModel`` (MLA's kv_b split into attn_k_b/attn_v_b, stacked
3-D experts ``ffn_*_exps``, shared experts ``ffn_*_shexp``, routers ``ffn_gate_inp`` in F32).

    python scripts/header_models.py OUT_DIR [--models deepseek-v3,qwen3-235b,llama-405b] [--layers N]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class HeaderModel:
    """One model's config.json numbers (the fields the GGUF header and the tensor shapes need)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv: int
    n_vocab: int
    head_dim: int = 128
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_shared: int = 0
    n_dense: int = 0
    mla: dict[str, int] = field(default_factory=dict)  # q_lora, kv_lora, rope, nope, v

    def __post_init__(self) -> None:
        if self.n_layer < 1 or self.n_dense > self.n_layer or (self.arch == "deepseek2") != bool(self.mla):
            raise ValueError(f"{self.arch}: inconsistent header config {self}")


MODELS: dict[str, HeaderModel] = {
    # deepseek-ai/DeepSeek-V3 config.json: 61 layers, first_k_dense_replace 3, 256 routed + 1 shared expert.
    "deepseek-v3": HeaderModel("deepseek2", 61, 7168, 18432, 128, 128, 129280, n_expert=256, n_expert_used=8,
                               n_ff_exp=2048, n_shared=1, n_dense=3,
                               mla={"q_lora": 1536, "kv_lora": 512, "rope": 64, "nope": 128, "v": 128}),
    # Qwen/Qwen3-235B-A22B config.json: 94 layers, 128 experts, 8 active, GQA 64/4, head_dim 128.
    "qwen3-235b": HeaderModel("qwen3moe", 94, 4096, 12288, 64, 4, 151936, n_expert=128, n_expert_used=8,
                              n_ff_exp=1536),
    # meta-llama/Llama-3.1-405B config.json: 126 layers, GQA 128/8.
    "llama-405b": HeaderModel("llama", 126, 16384, 53248, 128, 8, 128256),
}


def attention(m: HeaderModel) -> Shapes:
    """One block's attention tensors (numpy order: rows, columns), as the converter names them."""
    e = m.n_embd
    if m.mla:  # DeepseekV2Model.modify_tensors: kv_b split into k_b (transposed) and v_b
        a = m.mla
        return {"attn_q_a": (a["q_lora"], e), "attn_q_a_norm": (a["q_lora"],),
                "attn_q_b": (m.n_head * (a["nope"] + a["rope"]), a["q_lora"]),
                "attn_kv_a_mqa": (a["kv_lora"] + a["rope"], e), "attn_kv_a_norm": (a["kv_lora"],),
                "attn_k_b": (m.n_head, a["kv_lora"], a["nope"]), "attn_v_b": (m.n_head, a["v"], a["kv_lora"]),
                "attn_output": (e, m.n_head * a["v"])}
    q, kv = m.n_head * m.head_dim, m.n_kv * m.head_dim
    out: Shapes = {"attn_q": (q, e), "attn_k": (kv, e), "attn_v": (kv, e), "attn_output": (e, q)}
    if m.arch == "qwen3moe":
        out |= {"attn_q_norm": (m.head_dim,), "attn_k_norm": (m.head_dim,)}
    return out


def feed_forward(m: HeaderModel, block: int) -> Shapes:
    """One block's FFN: dense below ``n_dense`` (and for dense models), else router + stacked experts."""
    e = m.n_embd
    if not m.n_expert or block < m.n_dense:
        return {"ffn_gate": (m.n_ff, e), "ffn_up": (m.n_ff, e), "ffn_down": (e, m.n_ff)}
    x, f = m.n_expert, m.n_ff_exp
    out: Shapes = {"ffn_gate_inp": (x, e), "ffn_gate_exps": (x, f, e), "ffn_up_exps": (x, f, e),
                   "ffn_down_exps": (x, e, f)}
    if m.n_shared:
        s = m.n_shared * f
        out |= {"ffn_gate_shexp": (s, e), "ffn_up_shexp": (s, e), "ffn_down_shexp": (e, s)}
    return out


def tensor_shapes(m: HeaderModel) -> Shapes:
    """Every tensor name -> numpy shape, in the converter's order."""
    shapes: Shapes = {"token_embd.weight": (m.n_vocab, m.n_embd)}
    for b in range(m.n_layer):
        block = {"attn_norm": (m.n_embd,), **attention(m), "ffn_norm": (m.n_embd,), **feed_forward(m, b)}
        shapes |= {f"blk.{b}.{k}.weight": v for k, v in block.items()}
        if m.mla and b >= m.n_dense:  # noaux_tc routing's score-correction bias
            shapes[f"blk.{b}.exp_probs_b.bias"] = (m.n_expert,)
    return shapes | {"output_norm.weight": (m.n_embd,), "output.weight": (m.n_vocab, m.n_embd)}


def write_header(path: Path, m: HeaderModel) -> int:
    """Write ``m`` as a header-only GGUF at ``path``; returns its parameter count."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), m.arch)
    w.add_block_count(m.n_layer)
    w.add_context_length(163840 if m.mla else 131072 if m.arch == "llama" else 40960)
    w.add_embedding_length(m.n_embd)
    w.add_feed_forward_length(m.n_ff)
    w.add_head_count(m.n_head)
    w.add_head_count_kv(m.n_kv)
    w.add_layer_norm_rms_eps(1e-6 if m.arch != "llama" else 1e-5)
    w.add_vocab_size(m.n_vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    if m.n_expert:
        w.add_expert_count(m.n_expert)
        w.add_expert_used_count(m.n_expert_used)
        w.add_expert_feed_forward_length(m.n_ff_exp)
    if m.mla:
        a = m.mla
        w.add_leading_dense_block_count(m.n_dense)
        w.add_expert_shared_count(m.n_shared)
        w.add_q_lora_rank(a["q_lora"])
        w.add_kv_lora_rank(a["kv_lora"])
        w.add_rope_dimension_count(a["rope"])
        # DeepseekV2Model.set_gguf_parameters: MQA over the compressed kv (head_count_kv 1 in the file)
        w.add_key_length(a["kv_lora"] + a["rope"])
        w.add_value_length(a["kv_lora"])
        w.add_key_length_mla(a["nope"] + a["rope"])
        w.add_value_length_mla(a["v"])
        w.add_expert_weights_scale(2.5)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    else:
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
        w.add_rope_dimension_count(m.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(m.n_vocab)])
    total = 0
    for name, shape in tensor_shapes(m).items():
        keep = len(shape) == 1 or "ffn_gate_inp" in name
        qt = gguf.GGMLQuantizationType.F32 if keep else gguf.GGMLQuantizationType.BF16
        n = int(np.prod(shape))
        total += n
        w.add_tensor_info(name, shape, np.dtype(np.float32 if keep else np.float16), n * (4 if keep else 2),
                          raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--layers", type=int, help="fewer blocks (tests); the dense-layer count is kept when it fits")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.models.split(","):
        m = MODELS[key]
        if args.layers:
            m = replace(m, n_layer=args.layers, n_dense=min(m.n_dense, args.layers - 1) if m.n_dense else 0)
        path = args.out / f"{key}.gguf"
        n = write_header(path, m)
        print(f"{path}: {m.arch}, {m.n_layer} blocks, {n / 1e9:.1f} B parameters, {path.stat().st_size / 1e6:.1f} MB header")


if __name__ == "__main__":
    main()
