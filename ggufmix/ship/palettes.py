"""Named type palettes for ``--palette``: the types a runtime or a llama.cpp backend is known to run.

``cuda``, ``metal``, ``vulkan``, ``adreno`` (llama.cpp's OpenCL backend, written for Qualcomm Adreno GPUs):
the types that backend's ``supports_op`` accepts for MUL_MAT, read off the pinned llama.cpp by
``scripts/gen_backends.py`` into data/backends.json (llama.cpp keeps ``token_embd`` on the CPU, so GET_ROWS
does not narrow a palette; it is recorded there). ``cpu-arm``: the CPU runs every type; the line says which
ARM repacks (their buffers are what ``--fit`` measures). A device profile (devices.json) names its palette.

``ollama``: Ollama runs some architectures on its own Go engine and the rest on a vendored llama.cpp
(data/ollama.json says which, read from Ollama's source). For an engine architecture only the types Ollama's
engine names as supported (no IQ types); for any architecture no ggml type newer than Ollama knows (Q2_0 ...).
"""
from __future__ import annotations

import functools
import json
from importlib import resources
from collections.abc import Sequence
from typing import Any

from ggufmix.errors import UsageError
from ggufmix.types import DEFAULT_TYPES, QuantType

PALETTES = ("ollama", "cuda", "metal", "vulkan", "adreno", "cpu-arm")


@functools.cache
def _backends() -> dict[str, Any]:
    return dict(json.loads(resources.files("ggufmix.data").joinpath("backends.json").read_text()))


def backend_palette(name: str) -> tuple[tuple[QuantType, ...], str]:
    """The planner's types for llama.cpp backend ``name`` and a line saying why (see the module docstring).

    Raises:
        UsageError: not a backend palette.
    """
    doc = _backends()
    if name == "cpu-arm":
        repack = ", ".join(doc["cpu_repack"]["arm"])
        return tuple(DEFAULT_TYPES), f"the ARM CPU runs every type; it repacks {repack} into interleaved layouts"
    if name not in doc["backends"]:
        raise UsageError(f"--palette {name!r}: known palettes are {', '.join(PALETTES)}")
    allowed = doc["backends"][name]["mul_mat"]
    types = tuple(t for t in DEFAULT_TYPES if t.name in allowed)
    return types, (f"llama.cpp {doc['llama_cpp_python']}'s {name} backend multiplies {', '.join(t.name for t in types)} "
                   "(its supports_op, data/backends.json)")


def check_within(palette: str, allowed: Sequence[QuantType], why: str, *, types: Sequence[QuantType] | None = None,
                 pins: Sequence[Any] = ()) -> None:
    """Refuse ``--types`` or ``--pin`` types outside ``--palette``: a plan must never hold one.

    Raises:
        UsageError: one line naming the types and the palette.
    """
    ok = set(allowed)
    outside = sorted({t.name for t in types or () if t not in ok} | {p.qtype.name for p in pins if p.qtype not in ok})
    if outside:
        raise UsageError(f"{', '.join(outside)}: not in --palette {palette} ({why})")


def palette_types(chosen: Sequence[QuantType] | None, palette: str | None, arch: str,
                  pins: Sequence[Any] = ()) -> tuple[Sequence[QuantType] | None, str]:
    """The planner's types for ``--types`` (``chosen``) within ``--palette`` for architecture ``arch``, and the
    palette's reason ("" without one); None = the planner's default types.

    Raises:
        UsageError: the palette is unknown, or a type of ``--types`` or ``--pin`` is outside it.
    """
    if palette is None:
        return chosen, ""
    allowed, why = named_palette(palette, arch)
    if chosen is not None and not any(t in allowed for t in chosen):
        raise UsageError(f"--types {','.join(t.name for t in chosen)}: none of them is in --palette {palette} ({why})")
    check_within(palette, allowed, why, types=chosen, pins=pins)
    return chosen or allowed, why


@functools.cache
def _ollama() -> dict[str, Any]:
    return dict(json.loads(resources.files("ggufmix.data").joinpath("ollama.json").read_text()))


def named_palette(name: str, arch: str) -> tuple[tuple[QuantType, ...], str]:
    """The planner's types for runtime ``name`` and model architecture ``arch``, and a line saying why.

    Raises:
        UsageError: an unknown palette name.
    """
    if name != "ollama":
        return backend_palette(name)
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
