"""The Plan: every tensor's type and bytes, the budget, and the scores behind each choice."""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from ggufmix.artifacts import read_artifact, write_artifact
from ggufmix.errors import InputError
from ggufmix.layout.groups import by_group
from ggufmix.layout.rules import requires_imatrix
from ggufmix.plan.budget import bpw
from ggufmix.types import QuantType


@dataclass(frozen=True)
class PlanEntry:
    name: str
    shape: tuple[int, ...]
    qtype: QuantType
    bytes: int
    role: str
    layer: int | None
    error: float | None = None      # the scorer's error at the chosen type (None: not quantized)
    cost: float | None = None       # error x role gain x importance: what the solver minimised

    @property
    def quantized(self) -> bool:
        return self.error is not None


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    budget: str
    budget_bytes: int
    total_elements: int
    strategy: str
    source: dict[str, Any]
    settings: dict[str, Any]
    arch: str
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries)

    @property
    def bpw(self) -> float:
        return bpw(self.total_bytes, self.total_elements)

    def types(self) -> dict[str, QuantType]:
        return {e.name: e.qtype for e in self.entries}

    def quantized(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.quantized]

    def needing_imatrix(self, have: Collection[str] = ()) -> list[PlanEntry]:
        """Tensors planned at a type llama.cpp writes only with an importance matrix (``rules.requires_imatrix``)
        and missing from ``have`` (the imatrix's tensor names): scores made with ``--assume-imatrix`` allow them."""
        return [e for e in self.quantized() if e.name not in have and requires_imatrix(e.name, e.qtype)]

    def type_histogram(self) -> dict[str, int]:
        """Bytes per chosen type, largest first."""
        c: Counter[str] = Counter()
        for e in self.entries:
            c[e.qtype.name] += e.bytes
        return dict(c.most_common())

    def by_group(self) -> dict[str, dict[str, Any]]:
        """Tensors, bytes, elements and bytes per type of each report group (experts, shared experts, attention ...)."""
        return by_group((e.name, e.bytes, prod(e.shape), e.qtype.name) for e in self.entries)

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_artifact(path, "plan", {
            "arch": self.arch, "budget": self.budget, "budget_bytes": self.budget_bytes,
            "strategy": self.strategy, "source": self.source, "settings": self.settings,
            "versions": self.versions,
            "totals": {"bytes": self.total_bytes, "elements": self.total_elements, "bpw": round(self.bpw, 6)},
            "tensors": [{"name": e.name, "shape": list(e.shape), "type": e.qtype.name, "bytes": e.bytes,
                         "role": e.role, "layer": e.layer, "error": e.error, "cost": e.cost}
                        for e in self.entries]})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        doc = read_artifact(path, "plan")
        try:
            entries = tuple(PlanEntry(t["name"], tuple(t["shape"]), QuantType[t["type"]], int(t["bytes"]),
                                      t["role"], t["layer"], t["error"], t["cost"]) for t in doc["tensors"])
            return cls(entries, doc["budget"], int(doc["budget_bytes"]), int(doc["totals"]["elements"]),
                       doc["strategy"], doc["source"], doc["settings"], doc["arch"], doc.get("versions", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: malformed plan file ({e!r})") from None

    def with_versions(self, versions: dict[str, str]) -> Plan:
        return Plan(self.entries, self.budget, self.budget_bytes, self.total_elements, self.strategy,
                    self.source, self.settings, self.arch, dict(versions))
