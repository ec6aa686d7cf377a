"""Quantization types, file types, their exact sizes and the ladders the planner chooses from.

``QuantType`` and ``FileType`` are gguf's ``GGMLQuantizationType`` and ``LlamaFileType`` with the ids
that gguf 0.19 does not know yet (llama.cpp 0.3.36 writes ``Q2_0`` = 42, ``LLAMA_FTYPE_MOSTLY_Q2_0`` =
41). They are ggufmix's own ``IntEnum``s rather than patches of gguf's: their members compare and hash
as the same integers, so gguf's tables and writer take them as they are.
"""
from __future__ import annotations

import enum

import gguf

from ggufmix.errors import UsageError

# (id, block size, bytes per block) of ggml types newer than the pinned gguf package.
_NEWER_TYPES: dict[str, tuple[int, int, int]] = {
    "Q2_0": (42, 64, 18),  # ggml-common.h block_q2_0: fp16 scale + 64 x 2 bits (llama.cpp 0.3.36)
}
# llama_ftype values newer than the pinned gguf package (include/llama.h, llama.cpp 0.3.36).
_NEWER_FTYPES: dict[str, int] = {"MOSTLY_Q2_0": 41}

QuantType = enum.IntEnum("QuantType", [*((m.name, m.value) for m in gguf.GGMLQuantizationType),
                                       *((name, v[0]) for name, v in _NEWER_TYPES.items())])
FileType = enum.IntEnum("FileType", [*((m.name, m.value) for m in gguf.LlamaFileType), *_NEWER_FTYPES.items()])
_SIZES: dict[int, tuple[int, int]] = {**{int(k): v for k, v in gguf.GGML_QUANT_SIZES.items()},
                                      **{v[0]: v[1:] for v in _NEWER_TYPES.values()}}

FLOAT_TYPES = frozenset({QuantType.F32, QuantType.F16, QuantType.BF16})
# What llama.cpp's CPU backend rounds a weight's input to before the dot products (ggml-cpu.c type_traits_cpu
# ``vec_dot_type``, llama-cpp-python 0.3.36): Q8_K (blocks of 256) for the K and IQ types, Q8_0 or Q8_1 (blocks of
# 32) for these; float weights take their input in their own type.
_CPU_INPUT_32 = {QuantType.Q4_0: QuantType.Q8_0, QuantType.Q5_0: QuantType.Q8_0, QuantType.Q8_0: QuantType.Q8_0,
                 QuantType.IQ4_NL: QuantType.Q8_0, QuantType.Q2_0: QuantType.Q8_0, QuantType.MXFP4: QuantType.Q8_0,
                 QuantType.Q4_1: QuantType.Q8_1, QuantType.Q5_1: QuantType.Q8_1}


def cpu_input_type(qtype: QuantType) -> QuantType:
    """The type the CPU backend rounds a ``qtype`` weight's input to (the weight's own for float types)."""
    if qtype in FLOAT_TYPES:
        return qtype
    return _CPU_INPUT_32.get(qtype, QuantType.Q8_K)

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
# The 1-bit types (1.5625 and 1.75 bpw), which llama.cpp writes only with an imatrix: candidates when scoring
# on the promise of one (score --assume-imatrix), so that a 671B model's plan can go below 2 bpw.
ONE_BIT_TYPES: tuple[QuantType, ...] = (QuantType.IQ1_S, QuantType.IQ1_M)


def mix_name(ftype: int) -> str:
    """A llama_ftype as llama-quantize names its mix: 15 -> ``'Q4_K_M'`` (unknown ids as their number)."""
    try:
        return FileType(int(ftype)).name.removeprefix("MOSTLY_")
    except ValueError:
        return str(ftype)


def mix_file_type(name: str) -> FileType:
    """A llama-quantize mix name -> its llama_ftype: ``'q4_k_m'`` -> ``FileType.MOSTLY_Q4_K_M``.

    Raises:
        UsageError: not a mix llama.cpp 0.3.36 knows.
    """
    try:
        return FileType[f"MOSTLY_{name.strip().upper()}"]
    except KeyError:
        known = ", ".join(mix_name(f) for f in FileType if f.name.startswith("MOSTLY_"))
        raise UsageError(f"unknown llama-quantize mix {name!r}; known: {known}") from None


def default_file_type(qtype: QuantType) -> FileType | None:
    """The llama_ftype whose default tensor type is ``qtype`` (``llama_ftype_get_default_type`` in
    llama-quant.cpp, read backwards; of Q3_K/Q4_K/Q5_K's S/M/L mixes, the _M one), or None."""
    for name in (f"MOSTLY_{qtype.name}", f"MOSTLY_{qtype.name}_M"):
        if name in FileType.__members__:
            return FileType[name]
    return None
