"""Quantization types, their exact sizes and the ladders the planner chooses from.

``QuantType`` is gguf's ``GGMLQuantizationType``. gguf 0.19 does not know every type llama.cpp
0.3.36 writes (``Q2_0`` = 42), so the missing ids are registered into gguf's enum and size table
here, once, at import: GGUFReader then opens files that use them.
"""
from __future__ import annotations

import gguf

from ggufmix.errors import UsageError

# (id, block size, bytes per block) of ggml types newer than the pinned gguf package.
_EXTRA_TYPES: dict[str, tuple[int, int, int]] = {
    "Q2_0": (42, 64, 18),  # ggml-common.h block_q2_0: fp16 scale + 64 x 2 bits (llama.cpp 0.3.36)
}


def _register_extra_types() -> None:
    """Teach gguf's enum and size table the types it does not know, so GGUFReader opens such files."""
    enum_cls = gguf.GGMLQuantizationType
    for name, (value, blck, size) in _EXTRA_TYPES.items():
        if value in enum_cls._value2member_map_:
            continue
        member = int.__new__(enum_cls, value)
        member._name_, member._value_ = name, value
        member.__objclass__ = enum_cls
        enum_cls._member_map_[name] = member
        enum_cls._value2member_map_[value] = member
        enum_cls._member_names_.append(name)
        gguf.GGML_QUANT_SIZES[member] = (blck, size)


_register_extra_types()

QuantType = gguf.GGMLQuantizationType
_SIZES: dict[int, tuple[int, int]] = {int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()}

FLOAT_TYPES = frozenset({QuantType.F32, QuantType.F16, QuantType.BF16})

# Types the planner may choose by default, by row-block family. IQ1_*, TQ* and Q1_0 are left out:
# they are ternary/1-bit formats that need models trained for them.
LADDER_256 = (QuantType.IQ2_XXS, QuantType.IQ2_XS, QuantType.IQ2_S, QuantType.Q2_K,
              QuantType.IQ3_XXS, QuantType.IQ3_S, QuantType.Q3_K, QuantType.IQ4_XS,
              QuantType.Q4_K, QuantType.Q5_K, QuantType.Q6_K, QuantType.Q8_0)
LADDER_32 = (QuantType.Q2_0, QuantType.Q4_0, QuantType.IQ4_NL, QuantType.Q4_1,
             QuantType.Q5_0, QuantType.Q5_1, QuantType.Q8_0)


def block_size(qtype: int) -> int:
    """Elements per block of ``qtype`` (1 for float types)."""
    return _sizes(qtype)[0]


def type_size(qtype: int) -> int:
    """Bytes per block of ``qtype``."""
    return _sizes(qtype)[1]


def bits_per_weight(qtype: int) -> float:
    """Bits per element of ``qtype``, scales included (Q4_K: 4.5)."""
    bs, ts = _sizes(qtype)
    return ts * 8.0 / bs


def row_bytes(qtype: int, ncols: int) -> int:
    """Bytes of one row of ``ncols`` elements, as ``ggml_row_size`` computes it."""
    bs, ts = _sizes(qtype)
    return ts * (ncols // bs)


def fits(qtype: int, ncols: int) -> bool:
    """Whether rows of ``ncols`` elements are a whole number of ``qtype`` blocks."""
    return ncols % block_size(qtype) == 0


def parse_type(text: str) -> QuantType:
    """``'q4_k'`` or ``'Q4_K'`` -> ``QuantType.Q4_K``.

    Raises:
        UsageError: the name is not a ggml type.
    """
    key = text.strip().upper()
    try:
        return QuantType[key]
    except KeyError:
        known = ", ".join(t.name for t in DEFAULT_TYPES)
        raise UsageError(f"unknown quantization type {text!r}; known: {known}, F16, BF16, F32") from None


def to_type(value: int) -> QuantType:
    """A raw ggml type id as read from a file -> ``QuantType``.

    Raises:
        ValueError: the id is not a ggml type this version knows.
    """
    try:
        return QuantType(int(value))
    except ValueError:
        raise ValueError(f"unknown ggml type id {value}") from None


def _sizes(qtype: int) -> tuple[int, int]:
    try:
        return _SIZES[int(qtype)]
    except KeyError:
        raise ValueError(f"no size known for ggml type id {int(qtype)}") from None


# Every type the planner may pick by default, cheapest first.
DEFAULT_TYPES: tuple[QuantType, ...] = tuple(
    sorted(set(LADDER_256) | set(LADDER_32), key=lambda t: (bits_per_weight(t), int(t))))
