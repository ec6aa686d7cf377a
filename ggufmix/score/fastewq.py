"""FastEWQ (arXiv 2503.04704, section on weight-free analysis): predict EWQ's block decision from
metadata alone, never reading tensor data.

The paper trains a classifier on full-EWQ decisions over many models, with features such as the block's
position and parameter counts. Ours is a logistic regression (a few features, shipped as
``ggufmix/data/fastewq.json``, trained by ``scripts/train_fastewq.py`` on ggufmix's own ``ewq`` scores)
predicting whether full EWQ ranks a block above the model's mean entropy (EWQ's "keep precision" side).
Pure numpy; the header gives everything (shapes, roles, block index), so deciding takes milliseconds
for any model size.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

# Column order of the shipped weights; every feature comes from tensor shapes, roles and block indices.
FEATURES = ("rel_depth", "rel_depth_sq", "first", "last", "edge_dist", "log10_params", "block_share", "attn_share")
ATTN_ROLES = frozenset({"attn_q", "attn_k", "attn_v", "attn_qkv", "attn_output", "attn_kv_b"})


def block_features(slots: Iterable[Any], n_layers: int) -> dict[int, list[float]]:
    """Per block: the FEATURES, from the slots' (name, role, layer, n_elements) only."""
    slots = list(slots)
    total = sum(s.n_elements for s in slots)
    params: dict[int, float] = {}
    attn: dict[int, float] = {}
    for s in slots:
        if s.layer is not None:
            params[s.layer] = params.get(s.layer, 0.0) + s.n_elements
            if s.role in ATTN_ROLES:
                attn[s.layer] = attn.get(s.layer, 0.0) + s.n_elements
    last = max(n_layers - 1, 1)
    out = {}
    for b in sorted(params):
        rel = b / last
        out[b] = [rel, rel * rel, float(b == 0), float(b == n_layers - 1), min(b, n_layers - 1 - b) / last,
                  math.log10(max(total, 1)), params[b] / max(total, 1), attn.get(b, 0.0) / params[b]]
    return out


def labels_from_entropy(block_entropy: Mapping[int, float]) -> dict[int, int]:
    """EWQ's keep side: 1 where the block's entropy is above the model's mean block entropy."""
    mu = float(np.mean(list(block_entropy.values())))
    return {b: int(h > mu) for b, h in block_entropy.items()}


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 2000) -> dict[str, list[float]]:
    """Standardised features, L2-regularised logistic regression by Newton's method (deterministic)."""
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        grad = z.T @ (p - y) + l2 * np.r_[w[:-1], 0.0]
        hess = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.diag(np.r_[np.ones(len(w) - 1), 0.0])
        step = np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"mean": mean.tolist(), "std": std.tolist(), "weights": w.tolist()}


def predict(model: Mapping[str, Sequence[float]], x: np.ndarray) -> np.ndarray:
    """Probability of the keep side for each row of ``x``."""
    z = (x - np.asarray(model["mean"])) / np.asarray(model["std"])
    w = np.asarray(model["weights"])
    return 1.0 / (1.0 + np.exp(-(z @ w[:-1] + w[-1])))


def shipped() -> dict[str, Any]:
    return json.loads(resources.files("ggufmix.data").joinpath("fastewq.json").read_text())


def predict_keep(ctx: Any) -> dict[int, float]:
    """Block -> probability that full EWQ keeps it, for the model described by ``ctx`` (a ModelContext)."""
    feats = block_features(ctx.slots, ctx.n_layers)
    if not feats:
        return {}
    blocks = sorted(feats)
    p = predict(shipped()["model"], np.array([feats[b] for b in blocks]))
    return {b: float(v) for b, v in zip(blocks, p)}
