"""``ggufmix inspect``: per tensor name, shape, type, bytes, bpw; totals."""
from __future__ import annotations

import os
from typing import Any

from ggufmix.io.gguf_source import open_gguf
from ggufmix.layout.groups import by_group, group_lines
from ggufmix.plan.budget import bpw
from ggufmix.types import bits_per_weight


def inspect_gguf(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    src = open_gguf(path)
    tensors = [{"name": t.name, "shape": list(t.shape), "type": t.qtype.name, "bytes": t.n_bytes,
                "bpw": round(bits_per_weight(t.qtype), 4)} for t in src.tensors.values()]
    by_type: dict[str, dict[str, int]] = {}
    for t in src.tensors.values():
        d = by_type.setdefault(t.qtype.name, {"tensors": 0, "bytes": 0, "elements": 0})
        d["tensors"] += 1
        d["bytes"] += t.n_bytes
        d["elements"] += t.n_elements
    return {"file": str(src.path), "arch": src.arch, "file_bytes": os.path.getsize(src.path),
            "tensors": tensors, "by_type": by_type, "by_group": by_group((t.name, t.n_bytes, t.n_elements, t.qtype.name)
                                                         for t in src.tensors.values()),
            "totals": {"tensors": len(tensors), "bytes": src.total_bytes, "elements": src.total_elements,
                       "bpw": round(bpw(src.total_bytes, src.total_elements), 6)}}


def format_inspect(info: dict[str, Any]) -> str:
    """A fixed-width table for people."""
    w = max((len(t["name"]) for t in info["tensors"]), default=4)
    lines = [f"{'name':<{w}}  {'shape':<20} {'type':<8} {'bytes':>12} {'bpw':>7}"]
    for t in info["tensors"]:
        shape = "x".join(str(x) for x in t["shape"])
        lines.append(f"{t['name']:<{w}}  {shape:<20} {t['type']:<8} {t['bytes']:>12} {t['bpw']:>7.3f}")
    tot = info["totals"]
    lines.append("")
    lines += group_lines(info.get("by_group", {}), tot["bytes"])
    lines.append("")
    for name, d in sorted(info["by_type"].items(), key=lambda kv: -kv[1]["bytes"]):
        lines.append(f"{name:<8} {d['tensors']:>4} tensors {d['bytes'] / 1e6:>10.2f} MB "
                     f"{bpw(d['bytes'], d['elements']):>7.3f} bpw")
    lines.append(f"total: {tot['tensors']} tensors, {tot['bytes'] / 1e6:.2f} MB of tensor data "
                 f"({info['file_bytes'] / 1e6:.2f} MB file), {tot['elements'] / 1e6:.2f} M elements, "
                 f"{tot['bpw']:.4f} bpw  [{info['arch']}]")
    return "\n".join(lines)
