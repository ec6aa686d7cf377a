"""Header-only GGUFs of the largest open models, for planning without their weights.

Each file holds the ``{arch}.*`` keys and every tensor's info (name, shape, type) as llama.cpp's
``convert_hf_to_gguf.py`` writes them for that model's config.json with ``--outtype bf16``, and no tensor
data: what ``ggufmix score --strategy fastewq|uniform`` and ``ggufmix plan --fit`` need. The configs below
are the published config.json values the converter reads; :func:`HeaderModel.from_config` mirrors the
converter's ``TextModel``/``LlamaModel``/``Qwen2MoeModel``/``DeepseekV2Model`` (MLA's kv_b split into
attn_k_b/attn_v_b, stacked 3-D experts ``ffn_*_exps``, shared experts ``ffn_*_shexp``, routers
``ffn_gate_inp`` and the noaux_tc score-correction bias ``exp_probs_b`` in F32, Llama 3.1's
``rope_freqs``). ``tests/test_header_models.py`` runs it on tiny configs of each architecture and compares
with what the converter writes for the same folders. The tokenizer is a stand-in of ``vocab_size`` tokens
(and one merge) that llama.cpp loads, so that ``--fit`` can have llama.cpp size its buffers.

    python scripts/header_models.py OUT_DIR [--models deepseek-v3,qwen3-235b,llama-405b] [--layers N]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np

Shapes = dict[str, tuple[int, ...]]

CONFIGS: dict[str, dict[str, Any]] = {
    # deepseek-ai/DeepSeek-V3 config.json (the keys the converter reads). Its 62nd layer (MTP,
    # num_nextn_predict_layers 1) is dropped by the converter (DeepseekV2Model.skip_mtp).
    "deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                    "hidden_size": 7168, "intermediate_size": 18432,
                    "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
                    "vocab_size": 129280, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6,
                    "rope_theta": 10000, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                    "qk_nope_head_dim": 128, "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8, "moe_intermediate_size": 2048, "first_k_dense_replace": 3,
                    "moe_layer_freq": 1, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
                    "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
                    "tie_word_embeddings": False},
    # Qwen/Qwen3-235B-A22B config.json: 94 layers, 128 experts (8 active), GQA 64/4, head_dim 128.
    "qwen3-235b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                   "hidden_size": 4096, "intermediate_size": 12288,
                   "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
                   "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
                   "rope_theta": 1000000.0, "num_experts": 128, "num_experts_per_tok": 8,
                   "moe_intermediate_size": 1536, "decoder_sparse_step": 1, "mlp_only_layers": [],
                   "norm_topk_prob": True, "tie_word_embeddings": False},
    # meta-llama/Llama-3.1-405B config.json: 126 layers, GQA 128/8, llama3 rope scaling.
    "llama-405b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                   "hidden_size": 16384, "intermediate_size": 53248,
                   "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8,
                   "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                   "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                            "original_max_position_embeddings": 8192},
                   "tie_word_embeddings": False},
}

# config.json "architectures" -> the GGUF architecture the converter writes
ARCHES = {"LlamaForCausalLM": "llama", "Qwen3MoeForCausalLM": "qwen3moe", "DeepseekV2ForCausalLM": "deepseek2",
          "DeepseekV3ForCausalLM": "deepseek2"}
GATING = {"softmax": gguf.ExpertGatingFuncType.SOFTMAX, "sigmoid": gguf.ExpertGatingFuncType.SIGMOID}
F32_NAMES = ("ffn_gate_inp", "exp_probs_b", "rope_freqs")  # kept in F32 by the converter whatever --outtype


@dataclass(frozen=True)
class HeaderModel:
    """A config.json, as the converter reads it for one of ``ARCHES``."""

    arch: str
    cfg: dict[str, Any]

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> HeaderModel:
        """Raises: ValueError: an architecture the generator does not mirror."""
        name = (cfg.get("architectures") or [""])[0]
        if name not in ARCHES:
            raise ValueError(f"architecture {name!r}: the generator mirrors only {', '.join(ARCHES)}")
        return cls(ARCHES[name], converter_view(cfg))

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    @property
    def n_layer(self) -> int:
        return int(self.cfg["num_hidden_layers"])

    @property
    def head_dim(self) -> int:
        return int(self.get("head_dim") or self.cfg["hidden_size"] // self.cfg["num_attention_heads"])

    @property
    def n_expert(self) -> int:
        return int(self.get("num_experts") or self.get("n_routed_experts") or 0)

    @property
    def rope_scaling(self) -> dict[str, Any]:
        rs = dict(self.get("rope_scaling") or {})
        return rs | {"rope_type": rs.get("rope_type", rs.get("type"))} if rs else {}

    def is_moe(self, block: int) -> bool:
        """Mirrors the HF modelling code the converter reads the experts from."""
        if not self.n_expert:
            return False
        if self.arch == "qwen3moe":  # Qwen3MoeDecoderLayer
            return block not in self.get("mlp_only_layers", []) and (block + 1) % self.get("decoder_sparse_step", 1) == 0
        return block >= self.get("first_k_dense_replace", 0) and block % self.get("moe_layer_freq", 1) == 0


def converter_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json as the converter reads it: ``ModelBase.load_hparams`` fills transformers' defaults in
    (``AutoConfig(...).to_dict()``, e.g. DeepSeek-V2's ``routed_scaling_factor`` 1.0); the dict as given when
    transformers is not installed."""
    try:
        import transformers
    except ImportError:
        return dict(cfg)
    return transformers.AutoConfig.for_model(**cfg).to_dict()


def base_keys(m: HeaderModel) -> list[tuple[str, Any]]:
    """``TextModel.set_gguf_parameters``: (GGUFWriter method, value), in the converter's order."""
    c = m.cfg
    keys = [("add_block_count", m.n_layer), ("add_context_length", c["max_position_embeddings"]),
            ("add_embedding_length", c["hidden_size"]), ("add_feed_forward_length", c["intermediate_size"]),
            ("add_head_count", c["num_attention_heads"]),
            ("add_head_count_kv", 1 if m.arch == "deepseek2" else c.get("num_key_value_heads", c["num_attention_heads"]))]
    rs = m.rope_scaling
    if rs.get("rope_type") == "yarn":
        keys += [("add_rope_scaling_type", gguf.RopeScalingType.YARN), ("add_rope_scaling_factor", rs["factor"]),
                 ("add_rope_scaling_orig_ctx_len", rs["original_max_position_embeddings"])]
        keys += [(f"add_rope_scaling_yarn_{k}", rs[k]) for k in ("beta_fast", "beta_slow") if k in rs]
    keys += [("add_rope_freq_base", c.get("rope_theta", 10000.0)), ("add_layer_norm_rms_eps", c["rms_norm_eps"])]
    if m.n_expert:
        keys += [("add_expert_count", m.n_expert), ("add_expert_used_count", c["num_experts_per_tok"])]
    keys += [(f, c[k]) for f, k in (("add_expert_group_count", "n_group"), ("add_expert_group_used_count", "topk_group"))
             if c.get(k) is not None]
    if c.get("scoring_func") is not None:
        keys.append(("add_expert_gating_func", GATING[c["scoring_func"]]))
    return keys + [("add_key_length", m.head_dim), ("add_value_length", m.head_dim)]


def arch_keys(m: HeaderModel) -> list[tuple[str, Any]]:
    """Each architecture's own ``set_gguf_parameters`` on top of the base (a later key replaces an earlier one)."""
    c = m.cfg
    if m.arch == "llama":  # LlamaModel
        return [("add_vocab_size", c["vocab_size"]), ("add_rope_dimension_count", m.head_dim)]
    if m.arch == "qwen3moe":  # Qwen2MoeModel
        return [("add_expert_feed_forward_length", c["moe_intermediate_size"])]
    kv_lora, rope = c.get("kv_lora_rank", 512), c["qk_rope_head_dim"]  # DeepseekV2Model: MLA as MQA, head_count_kv 1
    keys = [("add_leading_dense_block_count", c.get("first_k_dense_replace", 0)), ("add_vocab_size", c["vocab_size"])]
    if c.get("q_lora_rank") is not None:
        keys.append(("add_q_lora_rank", c["q_lora_rank"]))
    keys += [("add_kv_lora_rank", kv_lora), ("add_key_length", kv_lora + rope), ("add_value_length", kv_lora),
             ("add_key_length_mla", c["qk_nope_head_dim"] + rope), ("add_value_length_mla", c["v_head_dim"]),
             ("add_expert_feed_forward_length", c.get("moe_intermediate_size", c["intermediate_size"])),
             ("add_expert_shared_count", c.get("n_shared_experts", 0))]
    if c.get("routed_scaling_factor") is not None:
        keys.append(("add_expert_weights_scale", c["routed_scaling_factor"]))
    if c.get("norm_topk_prob"):
        keys.append(("add_expert_weights_norm", True))
    keys.append(("add_rope_dimension_count", rope))
    if m.rope_scaling.get("mscale_all_dim") is not None:
        keys.append(("add_rope_scaling_yarn_log_mul", 0.1 * m.rope_scaling["mscale_all_dim"]))
    return keys


def attention(m: HeaderModel) -> Shapes:
    """One block's attention tensors (numpy order: rows, columns), as the converter names them."""
    c, e = m.cfg, m.cfg["hidden_size"]
    n_head = c["num_attention_heads"]
    if m.arch == "deepseek2":  # DeepseekV2Model.modify_tensors: kv_b split into k_b (transposed) and v_b
        kv_lora, rope, nope, v = c.get("kv_lora_rank", 512), c["qk_rope_head_dim"], c["qk_nope_head_dim"], c["v_head_dim"]
        q_lora = c.get("q_lora_rank")
        q: Shapes = ({"attn_q_a": (q_lora, e), "attn_q_a_norm": (q_lora,), "attn_q_b": (n_head * (nope + rope), q_lora)}
                     if q_lora else {"attn_q": (n_head * (nope + rope), e)})
        return q | {"attn_kv_a_mqa": (kv_lora + rope, e), "attn_kv_a_norm": (kv_lora,),
                    "attn_k_b": (n_head, kv_lora, nope), "attn_v_b": (n_head, v, kv_lora),
                    "attn_output": (e, n_head * v)}
    hd, n_kv = m.head_dim, c.get("num_key_value_heads", n_head)
    out: Shapes = {"attn_q": (n_head * hd, e), "attn_k": (n_kv * hd, e), "attn_v": (n_kv * hd, e),
                   "attn_output": (e, n_head * hd)}
    if m.arch == "qwen3moe":
        out |= {"attn_q_norm": (hd,), "attn_k_norm": (hd,)}
    return out


def feed_forward(m: HeaderModel, block: int) -> Shapes:
    """One block's FFN: dense, or router + stacked experts (+ shared experts, + the noaux_tc bias)."""
    c, e = m.cfg, m.cfg["hidden_size"]
    if not m.is_moe(block):
        f = c["intermediate_size"]
        return {"ffn_gate": (f, e), "ffn_up": (f, e), "ffn_down": (e, f)}
    x, f = m.n_expert, c["moe_intermediate_size"]
    out: Shapes = {"ffn_gate_inp": (x, e), "ffn_gate_exps": (x, f, e), "ffn_up_exps": (x, f, e),
                   "ffn_down_exps": (x, e, f)}
    if c.get("n_shared_experts"):
        s = c["n_shared_experts"] * f
        out |= {"ffn_gate_shexp": (s, e), "ffn_up_shexp": (s, e), "ffn_down_shexp": (e, s)}
    return out


def tensor_shapes(m: HeaderModel) -> Shapes:
    """Every tensor name -> numpy shape."""
    e = m.cfg["hidden_size"]
    shapes: Shapes = {"token_embd.weight": (m.cfg["vocab_size"], e)}
    if m.arch == "llama" and m.rope_scaling.get("rope_type") == "llama3":  # LlamaModel.generate_extra_tensors
        shapes["rope_freqs.weight"] = (m.head_dim // 2,)
    for b in range(m.n_layer):
        block = {"attn_norm": (e,), **attention(m), "ffn_norm": (e,), **feed_forward(m, b)}
        shapes |= {f"blk.{b}.{k}.weight": v for k, v in block.items()}
        if m.is_moe(b) and m.get("topk_method") == "noaux_tc":  # the router's e_score_correction_bias
            shapes[f"blk.{b}.exp_probs_b.bias"] = (m.n_expert,)
    if not m.get("tie_word_embeddings", False):
        shapes["output.weight"] = (m.cfg["vocab_size"], e)
    return shapes | {"output_norm.weight": (e,)}


def keeps_f32(name: str, shape: tuple[int, ...]) -> bool:
    """The converter's float types for ``--outtype bf16``: 1-D tensors and the routers stay F32."""
    return len(shape) == 1 or any(k in name for k in F32_NAMES)


def write_header(path: Path, m: HeaderModel) -> int:
    """Write ``m`` as a header-only GGUF at ``path``; returns its parameter count."""
    w = gguf.GGUFWriter(str(path), m.arch)
    for method, value in dict(base_keys(m) + arch_keys(m)).items():  # a later call replaces an earlier one
        getattr(w, method)(value)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    w.add_tokenizer_model("gpt2")  # a stand-in vocabulary of the right size, which llama.cpp loads
    w.add_token_list([f"t{i}" for i in range(m.cfg["vocab_size"])])
    w.add_token_merges(["t 0"])
    total = 0
    for name, shape in tensor_shapes(m).items():
        keep = keeps_f32(name, shape)
        n = int(np.prod(shape))
        total += n
        w.add_tensor_info(name, shape, np.dtype(np.float32 if keep else np.float16), n * (4 if keep else 2),
                          raw_dtype=gguf.GGMLQuantizationType.F32 if keep else gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--models", default=",".join(CONFIGS))
    ap.add_argument("--layers", type=int, help="fewer blocks (tests); the dense-layer count is kept when it fits")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for key in args.models.split(","):
        cfg = dict(CONFIGS[key])
        if args.layers:
            dense = min(cfg.get("first_k_dense_replace", 0), args.layers - 1)
            cfg |= {"num_hidden_layers": args.layers} | ({"first_k_dense_replace": dense} if dense else {})
        m = HeaderModel.from_config(cfg)
        path = args.out / f"{key}.gguf"
        n = write_header(path, m)
        print(f"{path}: {m.arch}, {m.n_layer} blocks, {n / 1e9:.1f} B parameters, {path.stat().st_size / 1e6:.1f} MB header")


if __name__ == "__main__":
    main()
