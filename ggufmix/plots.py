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


def _type_grid(blocks: list[dict[str, Any]]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Roles (columns), types (by bits per weight), and per block x role the type's index and log10 cost."""
    roles = sorted({t["role"] for t in blocks})
    types = sorted({t["type"] for t in blocks}, key=lambda n: (bits_per_weight(parse_type(n)), n))
    n_layers = 1 + max((t["layer"] for t in blocks), default=-1)
    kind = np.full((n_layers, len(roles)), np.nan)
    cost = np.full((n_layers, len(roles)), np.nan)
    for t in blocks:
        i, j = t["layer"], roles.index(t["role"])
        kind[i, j] = types.index(t["type"])
        cost[i, j] = np.log10(max(t["cost"] or 0.0, 1e-12))
    return roles, types, kind, cost


def layers(plan_path: Path, path: Path) -> None:
    """The layer map of a plan: one row per block, one column per tensor role, colour = the type it got
    (ordered by bits per weight, named in each cell), and beside it the solver's cost at that type."""
    import json

    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    doc = json.loads(Path(plan_path).read_text())
    entries = [t for t in doc["tensors"] if t.get("error") is not None]
    roles, types, kind, cost = _type_grid([t for t in entries if t["layer"] is not None])
    colours = plt.get_cmap("viridis")(np.linspace(0.0, 1.0, max(len(types), 2)))[: len(types)]
    n_layers = kind.shape[0]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(2 + 1.1 * len(roles), 1.8 + 0.17 * n_layers), sharey=True,
                                 layout="constrained")
    a1.imshow(kind, aspect="auto", cmap=ListedColormap(colours), norm=BoundaryNorm(np.arange(len(types) + 1) - 0.5,
                                                                                  max(len(types), 1)))
    for (i, j), k in np.ndenumerate(kind):
        if not np.isnan(k):
            a1.text(j, i, types[int(k)], ha="center", va="center", fontsize=5,
                    color="white" if k < (len(types) - 1) / 2 else "black")
    im2 = a2.imshow(cost, aspect="auto", cmap="magma")
    for ax, title in ((a1, "type (colour by bits per weight)"), (a2, "log10 solver cost (gain x error) at that type")):
        ax.set_xticks(range(len(roles)), roles, fontsize=7, rotation=45, ha="right")
        ax.set_title(title, fontsize=8)
    a1.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    a1.set_ylabel("block")
    fig.legend(handles=[Patch(color=c, label=f"{n} ({bits_per_weight(parse_type(n)):.2f} bpw)")
                        for n, c in zip(types, colours)], fontsize=7, loc="outside lower center",
               ncol=min(len(types), 6), frameon=False)
    fig.colorbar(im2, ax=a2, fraction=0.04)
    others = ", ".join(f"{t['name']} {t['type']}" for t in entries if t["layer"] is None)
    fig.suptitle(f"{Path(plan_path).name}: {doc['totals']['bpw']:.3f} bpw" + (f"; {others}" if others else ""), fontsize=8)
    _save(fig, path)
