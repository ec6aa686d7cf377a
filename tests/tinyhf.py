"""Tiny random Hugging Face-format models (safetensors + config.json + SentencePiece tokenizer) for tests.

``write_tiny_hf`` writes a folder that llama.cpp's ``convert_hf_to_gguf.py`` accepts: transformers
names the tensors (the model is built from the config on the meta device, so nothing is allocated),
the weights are seeded random numbers written with safetensors, optionally in shards with
``model.safetensors.index.json``, and the tokenizer is a SentencePiece model trained on the fly on a
small text (llama, qwen2 and gemma3 all take ``tokenizer.model``, which avoids the BPE pre-tokenizer
hash check). Needs torch, transformers and sentencepiece: the converter's own dependencies.
"""
from __future__ import annotations

import io
import json
import string
from pathlib import Path
from typing import Any

import numpy as np

# One line per architecture family: config.json values on top of the shared tiny sizes.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True},
    "gemma3": {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "head_dim": 64,
               "query_pre_attn_scalar": 64, "sliding_window": 64, "tie_word_embeddings": True},
    # issue 19's ten families (llama, qwen2, gemma3 above)
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": None,
                "tie_word_embeddings": False},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 64, "tie_word_embeddings": True},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 64,
               "query_pre_attn_scalar": 64, "sliding_window": 64, "tie_word_embeddings": True},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "tie_word_embeddings": False},
    "granite": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22, "attention_multiplier": 0.0156, "logits_scaling": 8.0,
                "tie_word_embeddings": True},
    # MoE (qwen3_moe's converter needs a BPE tokenizer.json whose pre-tokenizer hash it knows; mixtral's reads
    # tokenizer.model)
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 4,
                "num_experts_per_tok": 2, "sliding_window": None, "tie_word_embeddings": False},
    # an encoder (BERT family, XLM-RoBERTa: its converter reads sentencepiece.bpe.model; no pre-tokenizer hash)
    "xlm_roberta": {"architectures": ["XLMRobertaModel"], "model_type": "xlm-roberta", "max_position_embeddings": 514,
                    "type_vocab_size": 1, "layer_norm_eps": 1e-5, "hidden_act": "gelu", "pad_token_id": 1,
                    "num_key_value_heads": 4,  # no GQA in BERT: the converter would write the shared 2
                    "bos_token_id": 0, "eos_token_id": 2},
    # issue 15's MoE families
    # 4 routed experts, 2 per token; stacked by the converter into 3-D ffn_{gate,up,down}_exps
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "head_dim": 64,
                  "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 256, "decoder_sparse_step": 1,
                  "mlp_only_layers": [], "norm_topk_prob": True, "tie_word_embeddings": False},
    # DeepSeek-V2/V3 style: MLA (q/kv low-rank, kv_b split into attn_k_b/attn_v_b), a shared expert, block 0 dense
    "deepseek_v2": {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "num_key_value_heads": 4,
                    "q_lora_rank": 128, "kv_lora_rank": 256, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64,
                    "v_head_dim": 64, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 256, "first_k_dense_replace": 1, "topk_method": "greedy",
                    "norm_topk_prob": False, "tie_word_embeddings": False},
    # DeepSeek-V3 on top of that: sigmoid routing with a score-correction bias (exp_probs_b), expert groups,
    # routed scaling, YaRN rope scaling (deepseek-ai/DeepSeek-V3 config.json's keys, tiny numbers)
    "deepseek_v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "num_key_value_heads": 4,
                    "q_lora_rank": 128, "kv_lora_rank": 256, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64,
                    "v_head_dim": 64, "n_routed_experts": 4, "n_shared_experts": 1, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 256, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5,
                    "norm_topk_prob": True, "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32,
                    "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
                    "tie_word_embeddings": False},
    # OpenAI gpt-oss: attention biases and sinks, alternating sliding/full attention, 3-D experts with biases;
    # transformers builds the experts unquantized (bf16 gate_up_proj/down_proj, like a dequantized checkpoint)
    "gpt_oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "head_dim": 64,
                "intermediate_size": 256, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"], "attention_bias": True,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 64},
                "tie_word_embeddings": False},
    # Llama 3.1: llama3 rope scaling, which the converter writes as a rope_freqs tensor
    "llama31": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False,
                "max_position_embeddings": 16384,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192}},
}
_SIZES = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DTYPES = {"bfloat16", "float16", "float32"}
_SPM_TYPE = {"xlm_roberta": "unigram"}  # XLM-RoBERTa's converter asserts a UNIGRAM SentencePiece model
# Families whose converter reads only a BPE tokenizer.json with a pre-tokenizer it knows by hash
# (Qwen2MoeModel, DeepseekV2Model and GptOssModel call _set_vocab_gpt2): they get GPT-2's, rebuilt from llama.cpp's own
# models/ggml-vocab-gpt-2.gguf (``bpe_vocab``), 50257 tokens.
BPE_FAMILIES = frozenset({"qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"})


def write_tiny_hf(folder: str | Path, family: str = "llama", *, dtype: str = "bfloat16", shards: int = 1,
                  seed: int = 0, bpe_vocab: Path | None = None) -> Path:
    """Write a random ``family`` model as a Hugging Face folder.

    Args:
        folder: created if missing.
        family: a key of ``FAMILIES``.
        dtype: "bfloat16", "float16" or "float32" for every tensor (and config ``torch_dtype``).
        shards: > 1 splits the weights over ``model-0000i-of-0000n.safetensors`` plus an index.
        seed: numpy seed for the weights.
        bpe_vocab: llama.cpp's ``ggml-vocab-gpt-2.gguf``: the tokenizer of the ``BPE_FAMILIES`` (without it they
            get the SentencePiece one, which their converter refuses).

    Returns:
        The folder.

    Raises:
        ValueError: an unknown family or dtype.
    """
    if family not in FAMILIES or dtype not in _DTYPES:
        raise ValueError(f"family {family!r} / dtype {dtype!r}: one of {sorted(FAMILIES)} / {sorted(_DTYPES)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    ids: dict[str, int] = {}
    if family in BPE_FAMILIES and bpe_vocab is not None:
        n_vocab = write_bpe_tokenizer(out, bpe_vocab)
        ids = {"bos_token_id": n_vocab - 1, "eos_token_id": n_vocab - 1, "pad_token_id": None}
    else:
        n_vocab = write_tokenizer(out, model_type=_SPM_TYPE.get(family, "bpe"))
    config = {**_SIZES, **FAMILIES[family], "vocab_size": n_vocab, "torch_dtype": dtype, **ids}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    weights = random_weights(hf_shapes(config), seed)
    write_safetensors(out, weights, dtype, shards)
    return out


def hf_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the model transformers builds from ``config`` (on the meta device)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    # a bare encoder ("XLMRobertaModel") has no language-model head: AutoModel builds it
    auto = transformers.AutoModel if config["architectures"][0].endswith("Model") else transformers.AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    tied = set()
    if config.get("tie_word_embeddings"):
        tied = {"lm_head.weight"}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """Seeded float32 weights: norms around 1 (so a dropped norm shows), matrices scaled by fan-in."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            w = 1.0 + 0.25 * rng.standard_normal(shape) if "norm" in name else 0.1 * rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / (1.0 if "embed" in name else np.sqrt(shape[-1]))
        out[name] = w.astype(np.float32)
    return out


def write_safetensors(folder: Path, weights: dict[str, np.ndarray], dtype: str, shards: int = 1) -> list[Path]:
    """Save ``weights`` as ``dtype`` safetensors, in ``shards`` files with an index when more than one."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    names = list(weights)
    groups = [names[i::shards] for i in range(shards)]
    files = [folder / ("model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors")
             for i in range(shards)]
    for group, path in zip(groups, files):
        save_file({n: torch.from_numpy(weights[n]).to(tdtype) for n in group}, str(path), metadata={"format": "pt"})
    if shards > 1:
        index = {"metadata": {"total_size": sum(p.stat().st_size for p in files)},
                 "weight_map": {n: f.name for group, f in zip(groups, files) for n in group}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return files


def write_tokenizer(folder: Path, vocab_size: int = 400, model_type: str = "bpe") -> int:
    """Train a byte-fallback SentencePiece model on a small generated text; returns its vocabulary size."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_training_text()), model_writer=buf, vocab_size=vocab_size,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
                                   hard_vocab_limit=False,
                                   # llama.cpp's phi3 vocabulary loader looks this token up (llama-vocab.cpp)
                                   user_defined_symbols=["<|endoftext|>"])
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "sentencepiece.bpe.model").write_bytes(buf.getvalue())  # the name XLM-RoBERTa's converter reads
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "add_eos_token": False}))
    return spm.SentencePieceProcessor(model_proto=buf.getvalue()).vocab_size()


def _training_text() -> list[str]:
    """Deterministic sentences over every printable character, so few texts need byte fallback."""
    rng = np.random.default_rng(7)
    letters = list(string.ascii_lowercase)
    words = ["".join(rng.choice(letters, size=rng.integers(2, 8))) for _ in range(300)]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(400)]
    return lines + [string.printable.strip()] * 4


def write_bpe_tokenizer(folder: Path, vocab_gguf: Path) -> int:
    """GPT-2's byte-level BPE ``tokenizer.json`` from a llama.cpp vocab GGUF (tokens and merges); its size.

    The converter recognises it by the hash of its encoding of a fixed text ("gpt-2").
    """
    import gguf

    reader = gguf.GGUFReader(vocab_gguf)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    merges = list(reader.fields["tokenizer.ggml.merges"].contents())
    end = tokens[-1]  # <|endoftext|>
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    doc = {"version": "1.0", "truncation": None, "padding": None, "normalizer": None,
           "added_tokens": [{"id": len(tokens) - 1, "content": end, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": True, "special": True}],
           "pre_tokenizer": byte_level, "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                     "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                     "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": end, "eos_token": end, "unk_token": end,
         "add_bos_token": False}))
    return len(tokens)


def mxfp4_experts(folder: str | Path, seed: int = 0) -> Path:
    """Turn a ``gpt_oss`` folder's experts into MXFP4, as openai/gpt-oss-20b ships them.

    Each ``mlp.experts.{gate_up,down}_proj`` (experts, in, out) becomes ``*_blocks`` (experts, out, in/32, 16)
    uint8 (two 4-bit codes a byte) and ``*_scales`` (experts, out, in/32) uint8 (E8M0 exponents), random, and
    config.json gets ``quantization_config: {"quant_method": "mxfp4"}``: the converter then copies the experts
    as MXFP4 without dequantizing (``GptOssModel.repack_mxfp4``).

    Returns:
        The folder.
    """
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(folder)
    rng = np.random.default_rng(seed)
    path = out / "model.safetensors"
    tensors = load_file(str(path))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        n_exp, n_in, n_out = tensors.pop(name).shape
        blocks = rng.integers(0, 256, (n_exp, n_out, n_in // 32, 16), dtype=np.uint8)
        scales = rng.integers(120, 127, (n_exp, n_out, n_in // 32), dtype=np.uint8)  # 2**-7 .. 2**-1
        tensors[f"{name}_blocks"] = torch.from_numpy(blocks)
        tensors[f"{name}_scales"] = torch.from_numpy(scales)
    save_file(tensors, str(path), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out
