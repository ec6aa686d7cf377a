"""Scores: what was measured once per model, so that planning any budget is instant.

The artifact between the two stages: ``score/`` makes it, ``plan/`` reads it, neither imports the other.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ggufmix.artifacts import read_artifact, write_artifact
from ggufmix.errors import InputError
from ggufmix.layout.slots import Layout, Slot
from ggufmix.types import QuantType


@dataclass(frozen=True)
class TensorScores:
    errors: dict[QuantType, float]
    importance: float = 1.0
    stats: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scores:
    source: dict[str, Any]
    strategy: str
    settings: dict[str, Any]
    layout: Layout
    tensors: dict[str, TensorScores]
    # Whether the errors are in the units role_gains.json was measured in (noise-to-signal ratios): the
    # planner then weights them by the role/depth gains; the pure paper strategies and uniform are not.
    calibrated: bool = True

    def save(self, path: str | os.PathLike[str]) -> Path:
        return write_artifact(path, "scores", {
            "source": self.source, "strategy": self.strategy, "calibrated": self.calibrated,
            "settings": self.settings,
            "arch": self.layout.arch,
            "tensors": [_slot_json(s, self.tensors.get(s.name)) for s in self.layout.slots]})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        doc = read_artifact(path, "scores")
        try:
            slots, tensors = [], {}
            for t in doc["tensors"]:
                slots.append(_slot_from_json(t))
                if "errors" in t:
                    tensors[t["name"]] = TensorScores({QuantType[k]: float(v) for k, v in t["errors"].items()},
                                                      float(t["importance"]), dict(t.get("stats", {})))
            return cls(doc["source"], doc["strategy"], doc["settings"], Layout(doc["arch"], tuple(slots)), tensors,
                       calibrated=bool(doc["calibrated"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: malformed scores file ({e!r})") from None


def _slot_json(s: Slot, ts: TensorScores | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": s.name, "shape": list(s.shape), "source_type": s.source_type.name,
                           "role": s.role, "layer": s.layer, "n_elements": s.n_elements}
    if not s.quantized:
        out["fixed_bytes"] = s.fixed_bytes
        return out
    out["bytes"] = {t.name: b for t, b in s.candidates.items()}
    if ts is not None:
        out["errors"] = {t.name: e for t, e in ts.errors.items()}
        out["importance"] = ts.importance
        out["stats"] = dict(ts.stats)
    return out


def _slot_from_json(t: dict[str, Any]) -> Slot:
    return Slot(name=t["name"], shape=tuple(t["shape"]), source_type=QuantType[t["source_type"]],
                role=t["role"], layer=t["layer"], n_elements=int(t["n_elements"]),
                candidates={QuantType[k]: int(v) for k, v in t.get("bytes", {}).items()},
                fixed_bytes=int(t.get("fixed_bytes", 0)))
