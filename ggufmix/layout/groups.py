"""What a tensor is for, in the words MoE quantization is discussed in: routed experts, shared experts,
routers, attention, dense feed-forward, embeddings, other (norms, biases ...).

ggufmix's own grouping for reports (``inspect``, the model card), coarser than llama.cpp's categories
(``rules.role``, which ``tensor_get_category`` mirrors and which puts a routed expert and a dense FFN in
the same ``ffn_up``). First matching substring wins.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

GROUP_PATTERNS: tuple[tuple[str, str], ...] = (
    ("_exps.", "experts"),              # stacked routed experts ffn_{gate,up,down}_exps (Mixtral, Qwen3-MoE, DeepSeek)
    ("_chexps.", "experts"),            # chunked experts (Qwen3-Next, GLM)
    ("_shexp.", "shared experts"),      # always-on shared experts (DeepSeek-V2/V3, Qwen2-MoE, Llama 4)
    ("ffn_gate_inp", "routers"),        # expert routers (every MoE)
    ("exp_probs_b", "routers"),         # DeepSeek-V3's router bias
    ("attn_", "attention"),             # q/k/v/output, MLA's q_a/q_b/kv_a_mqa/k_b/v_b, fused qkv
    ("ffn_", "dense ffn"),              # dense feed-forward (every dense block; DeepSeek's first_k_dense_replace)
    ("token_embd.", "embeddings"),      # input embedding
    ("per_layer_token_embd.", "embeddings"),  # Gemma 3n
    ("output.", "embeddings"),          # the output head (tied to token_embd when absent)
)
GROUPS: tuple[str, ...] = ("experts", "shared experts", "routers", "attention", "dense ffn", "embeddings", "other")


def group(name: str) -> str:
    """The report group of tensor ``name`` (``other`` for norms and anything unlisted)."""
    if name.endswith("_norm.weight") or name.endswith("_norm.bias"):
        return "other"
    for needle, g in GROUP_PATTERNS:
        if needle in name:
            return g
    return "other"


def by_group(tensors: Iterable[tuple[str, int, int, str]]) -> dict[str, dict[str, Any]]:
    """``(name, bytes, elements, type name)`` of each tensor -> per group its tensors, bytes, elements and bytes
    per type, in ``GROUPS`` order; groups the model does not have are left out."""
    out: dict[str, dict[str, Any]] = {}
    for name, nbytes, elements, qtype in tensors:
        d = out.setdefault(group(name), {"tensors": 0, "bytes": 0, "elements": 0, "types": {}})
        d["tensors"] += 1
        d["bytes"] += nbytes
        d["elements"] += elements
        d["types"][qtype] = d["types"].get(qtype, 0) + nbytes
    return {g: out[g] for g in GROUPS if g in out}


def group_lines(groups: dict[str, dict[str, Any]], total_bytes: int) -> list[str]:
    """``by_group``'s result as fixed-width lines: group, tensors, MB, share of the bytes, bpw, types by bytes."""
    lines = []
    for name, d in groups.items():
        types = ", ".join(t for t, _ in sorted(d["types"].items(), key=lambda kv: -kv[1]))
        lines.append(f"{name:<15} {d['tensors']:>4} tensors {d['bytes'] / 1e6:>12.2f} MB "
                     f"{100 * d['bytes'] / max(total_bytes, 1):5.1f}% {8 * d['bytes'] / max(d['elements'], 1):>7.3f} bpw  "
                     f"{types}")
    return lines
