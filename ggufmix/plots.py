"""Pictures of a bench: size against KLD for every file, and each ggufmix plan layer by layer (matplotlib)."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ggufmix.artifacts import temp_beside  # noqa: E402
from ggufmix.types import bits_per_weight, parse_type  # noqa: E402


def _save(fig: Any, path: Path) -> None:
    tmp = temp_beside(path)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)


def pareto(results: dict[str, Any], path: Path) -> None:
    """Tensor MB against mean KLD (log): stock mixes as labelled points, each strategy x imatrix as a line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in results["rows"]:
        x, y = r["tensor_bytes"] / 1e6, max(r["kld"], 1e-6)
        if r["kind"] == "stock":
            ax.scatter([x], [y], marker="x" if r["imatrix"] == "none" else "+", color="black", zorder=3)
            ax.annotate(f"{r['target']} ({r['imatrix']})", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            lines[(r["kind"], r["imatrix"])].append((x, y))
    for (kind, imatrix), pts in sorted(lines.items()):
        xs, ys = zip(*sorted(pts))
        ax.plot(xs, ys, marker="o", ms=3, linestyle="-" if imatrix == "none" else "--", label=f"ggufmix {kind} ({imatrix})")
    ax.set_yscale("log")
    ax.set_xlabel("tensor data, MB")
    ax.set_ylabel("mean KL-divergence vs source")
    ax.set_title(results["model"])
    ax.grid(True, which="both", alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    _save(fig, path)


def layers(plan_path: Path, path: Path) -> None:
    """Which type each tensor got, block by block (colour: bits per weight), and the solver's cost behind it."""
    import json

    doc = json.loads(Path(plan_path).read_text())
    entries = [t for t in doc["tensors"] if t.get("error") is not None]
    blocks = [t for t in entries if t["layer"] is not None]
    roles = sorted({t["role"] for t in blocks})
    n_layers = 1 + max((t["layer"] for t in blocks), default=-1)
    bits = np.full((len(roles), n_layers), np.nan)
    cost = np.full((len(roles), n_layers), np.nan)
    names = {}
    for t in blocks:
        i, j = roles.index(t["role"]), t["layer"]
        bits[i, j] = bits_per_weight(parse_type(t["type"]))
        cost[i, j] = np.log10(max(t["cost"] or 0.0, 1e-12))
        names[(i, j)] = t["type"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.42 * n_layers + 2), 2 + 0.8 * len(roles)), sharex=True)
    im1 = a1.imshow(bits, aspect="auto", cmap="viridis")
    for (i, j), name in names.items():
        dark = bits[i, j] < 0.5 * (np.nanmin(bits) + np.nanmax(bits))
        a1.text(j, i, name.replace("_", "\n", 1), ha="center", va="center", fontsize=5,
                color="white" if dark else "black")
    im2 = a2.imshow(cost, aspect="auto", cmap="magma")
    for ax, title in ((a1, "type (bits per weight)"), (a2, "log10 solver cost (gain x error) at that type")):
        ax.set_yticks(range(len(roles)), roles, fontsize=7)
        ax.set_title(title, fontsize=8)
    a2.set_xlabel("block")
    fig.colorbar(im1, ax=a1, fraction=0.02)
    fig.colorbar(im2, ax=a2, fraction=0.02)
    others = ", ".join(f"{t['name']} {t['type']}" for t in entries if t["layer"] is None)
    fig.suptitle(f"{Path(plan_path).name}: {doc['totals']['bpw']:.3f} bpw" + (f"; {others}" if others else ""), fontsize=8)
    _save(fig, path)
