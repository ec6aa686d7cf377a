"""Named type palettes for ``--palette``: the types a runtime is known to load.

``ollama``: Ollama runs some architectures on its own Go engine and the rest on a vendored llama.cpp
(data/ollama.json says which, read from Ollama's source). For an engine architecture only the types Ollama's
engine names as supported (no IQ types); for any architecture no ggml type newer than Ollama knows (Q2_0 ...).
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from ggufmix.errors import UsageError
from ggufmix.types import DEFAULT_TYPES, QuantType

PALETTES = ("ollama",)


@functools.cache
def _ollama() -> dict[str, Any]:
    return dict(json.loads(resources.files("ggufmix.data").joinpath("ollama.json").read_text()))


def named_palette(name: str, arch: str) -> tuple[tuple[QuantType, ...], str]:
    """The planner's types for runtime ``name`` and model architecture ``arch``, and a line saying why.

    Raises:
        UsageError: an unknown palette name.
    """
    if name != "ollama":
        raise UsageError(f"--palette {name!r}: known palettes are {', '.join(PALETTES)}")
    info = _ollama()
    known = [t for t in DEFAULT_TYPES if int(t) <= info["max_type_id"]]
    if arch in info["engine_architectures"]:
        allowed = set(info["engine_types"])
        types = tuple(t for t in known if t.name in allowed)
        why = f"Ollama runs {arch} on its own engine: {', '.join(t.name for t in types)}"
    else:
        types = tuple(known)
        why = f"Ollama runs {arch} through its llama.cpp: every type it knows ({len(types)} of {len(DEFAULT_TYPES)})"
    return types, why


def ollama_engine_misfits(arch: str, types: set[str]) -> list[str]:
    """Types in ``types`` that Ollama would not load for ``arch`` (empty when all load)."""
    ok = {t.name for t in named_palette("ollama", arch)[0]} | {"F32", "F16", "BF16"}
    return sorted(types - ok)
