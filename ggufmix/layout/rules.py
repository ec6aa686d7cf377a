"""llama.cpp's quantization rules, mirrored from ``src/llama-quant.cpp`` (llama-cpp-python 0.3.36).

Each function names the C++ function it mirrors. Model knowledge is kept as tables.
"""
from __future__ import annotations

import re

from ggufmix.types import QuantType, block_size

# tensor_allows_quantization(): substrings that keep a tensor in its source type.
# Each line: the substring, and the models it is for.
KEEP_SUBSTRINGS: tuple[str, ...] = (
    "_norm.weight",              # every architecture: norms
    "ffn_gate_inp.weight",       # MoE expert routers
    "ffn_gate_tid2eid.weight",   # DeepSeek-V4 token-id -> expert-id table
    "altup", "laurel",           # Gemma 3n: tiny 4x4 matrices
    "per_layer_model_proj",      # Gemma 3n: small, kept as is
    "ssm_conv1d",                # Mamba: small conv1d weights
    "shortconv.conv.weight",     # Kimi/LFM2 short convolutions
    "indexer.k_proj.weight", "indexer.q_proj.weight",  # MiniMax indexer projections
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",  # RWKV
    "attn_rel_b.weight",         # T5 relative position bias
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd",
    ".patch_merger",             # multimodal projectors
    "a.rvq.codebook", "mm.a.code_embd",  # audio codebooks
)
# tensor_allows_quantization(): exact names kept (LLM_TENSOR_POS_EMBD / TOKEN_TYPES, BERT).
KEEP_NAMES: frozenset[str] = frozenset({"position_embd.weight", "token_types.weight"})
# tensor_allows_quantization(): extra substrings for LLM_ARCH_GLM5_NEXT.
KEEP_SUBSTRINGS_BY_ARCH: dict[str, tuple[str, ...]] = {
    "glm5-next": ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight",
                  "ssm_g_b.weight", "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight",
                  "attn_v_b.weight"),
}

# tensor_get_category(): first matching substring wins, in this order.
ROLE_PATTERNS: tuple[tuple[str, str], ...] = (
    ("attn_qkv.weight", "attn_qkv"),
    ("attn_kv_b.weight", "attn_kv_b"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)

# tensor_type_fallback(): the type llama.cpp writes when rows are not a whole number of blocks.
FALLBACK: dict[QuantType, QuantType] = {
    **{t: QuantType.IQ4_NL for t in (QuantType.IQ1_S, QuantType.IQ1_M, QuantType.IQ2_XXS, QuantType.IQ2_XS,
                                     QuantType.IQ2_S, QuantType.IQ3_XXS, QuantType.IQ3_S, QuantType.IQ4_XS)},
    **{t: QuantType.Q4_0 for t in (QuantType.Q2_0, QuantType.Q2_K, QuantType.Q3_K, QuantType.TQ1_0,
                                   QuantType.TQ2_0)},
    QuantType.Q4_K: QuantType.Q5_0,
    QuantType.Q5_K: QuantType.Q5_1,
    QuantType.Q6_K: QuantType.Q8_0,
}

# tensor_requires_imatrix(): types llama.cpp refuses to write without an importance matrix.
NEEDS_IMATRIX: frozenset[QuantType] = frozenset({QuantType.IQ3_XXS, QuantType.IQ2_XXS, QuantType.IQ2_XS,
                                                 QuantType.IQ2_S, QuantType.IQ1_M, QuantType.IQ1_S})

# ggml_quantize_requires_imatrix() (ggml.c): the kernel itself aborts without one, for any tensor.
KERNEL_NEEDS_IMATRIX: frozenset[QuantType] = frozenset({QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ1_S})

_LAYER = re.compile(r"blk\.(\d+)\.")


def collected_by_imatrix(name: str) -> bool:
    """Mirrors llama-imatrix's filter (tools/imatrix/imatrix.cpp, ``IMatrixCollector::collect_imatrix``): it records
    the ``blk.*`` weights only (``output.weight`` too with ``--process-output``, which is off by default)."""
    return name.startswith("blk.")


def allows_quantization(name: str, n_dims: int, arch: str = "", quantize_output: bool = True) -> bool:
    """Mirrors ``tensor_allows_quantization()``: only 2-D/3-D ``*weight`` tensors outside the keep lists."""
    if n_dims < 2 or not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    if name in KEEP_NAMES:
        return False
    keep = KEEP_SUBSTRINGS + KEEP_SUBSTRINGS_BY_ARCH.get(arch, ())
    return not any(s in name for s in keep)


def role(name: str) -> str:
    """Mirrors ``tensor_get_category()``; ``other`` where llama.cpp has no category."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, cat in ROLE_PATTERNS:
        if needle in name:
            return cat
    return "other"


def layer(name: str) -> int | None:
    """Block index of ``blk.N.*`` tensors, None for the others."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def fallback(qtype: QuantType, ncols: int) -> QuantType:
    """Mirrors ``tensor_type_fallback()``: the type llama.cpp actually writes for rows of ``ncols``."""
    if ncols % block_size(qtype) == 0:
        return qtype
    out = FALLBACK.get(qtype, qtype)
    return out if ncols % block_size(out) == 0 else QuantType.F16


def requires_imatrix(name: str, qtype: QuantType) -> bool:
    """Mirrors ``tensor_requires_imatrix()`` (files other than Q2_K_S) and ``ggml_quantize_requires_imatrix()``:
    llama.cpp exempts token_embd/output, but ggml's kernel still aborts for IQ2_XXS/IQ2_XS/IQ1_S."""
    if qtype in KERNEL_NEEDS_IMATRIX:
        return True
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    return qtype in NEEDS_IMATRIX
