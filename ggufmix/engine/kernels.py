"""ggml's own quantize/dequantize kernels, called through ctypes on the libggml that llama-cpp-python ships.

``quantize_rows`` runs ``ggml_quantize_chunk`` (the exact code ``llama_model_quantize`` runs, imatrix
included); ``dequantize_rows`` runs the type's ``to_float`` trait; ``f16_to_f32`` converts F16 weights
with ggml-cpu's SIMD converter.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gguf.quants import IQ4_NL

from ggufmix.engine.llamalib import lib_dir, loaded_once
from ggufmix.errors import EngineError
from ggufmix.numerics import lattice_codes
from ggufmix.types import QuantType, block_size, fits, row_bytes, type_size

logger = logging.getLogger(__name__)

_to_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)
_from_float_t = ctypes.CFUNCTYPE(None, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits, ggml.h (llama-cpp-python 0.3.36)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@loaded_once
def ggml() -> ctypes.CDLL:
    """libggml-base with the signatures ggufmix uses."""
    path = next(iter(sorted(lib_dir().glob("libggml-base.*"))), None)
    if path is None:
        raise EngineError(f"{lib_dir()}: libggml-base not found in the llama-cpp-python install")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.POINTER(ctypes.c_float)]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


@loaded_once
def _f16_converter() -> Callable[[int, int, int], None] | None:
    """``ggml_cpu_fp16_to_fp32`` (F16C/AVX-512 on x86), or None where libggml-cpu does not export it.

    Only the plain ``libggml-cpu``: a build with one library per CPU level (GGML_BACKEND_DL) names them
    ``libggml-cpu-<level>``, and loading the wrong level would die on an illegal instruction.
    """
    ggml()  # libggml-base first: libggml-cpu links against it
    path = next((p for p in sorted(lib_dir().glob("libggml-cpu.*")) if p.suffix in (".so", ".dylib", ".dll")), None)
    try:
        lib = ctypes.CDLL(str(path)) if path is not None else None
        fn = lib.ggml_cpu_fp16_to_fp32 if lib is not None else None
    except (OSError, AttributeError):
        fn = None
    if fn is None:
        logger.debug("%s: no ggml_cpu_fp16_to_fp32; F16 weights convert with numpy", lib_dir())
        return None
    lib.ggml_cpu_init.restype = None
    lib.ggml_cpu_init()  # the scalar tail reads ggml's F16 table where the CPU lacks F16C
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return fn


def f16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    """F16 weights (their uint16 bits, or float16) into the float32 array ``out`` of the same size.

    ggml-cpu converts 8-16 values per instruction where numpy converts one at a time (~8x faster on
    4M values); the values are the same for every one of the 65536 F16 bit patterns (tests/test_kernels.py),
    only a NaN's payload may come back quieted. Without the library, numpy converts.

    Raises:
        ValueError: the arrays differ in size, are not contiguous, or ``out`` is not float32.
    """
    if src.size != out.size or out.dtype != np.float32 or src.itemsize != 2:
        raise ValueError(f"f16_to_f32: {src.size} {src.dtype} values into {out.size} {out.dtype}")
    if not (src.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("f16_to_f32: the arrays must be contiguous")
    fn = _f16_converter()
    if fn is None:
        np.copyto(out, src.view(np.float16).reshape(out.shape))
    else:
        fn(src.ctypes.data, out.ctypes.data, src.size)


def ggml_row_size(qtype: QuantType, ncols: int) -> int:
    """``ggml_row_size`` from the library itself (tests compare our accounting with it)."""
    return int(ggml().ggml_row_size(int(qtype), ncols))


def quantize_rows(rows: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None = None,
                  threads: int = 1) -> np.ndarray:
    """Quantize float32 rows with ``ggml_quantize_chunk``; returns uint8 blocks, shape (nrows, row bytes).

    Args:
        rows: float32 array (nrows, ncols); ncols must be a whole number of ``qtype`` blocks.
        qtype: target type.
        imatrix: per-column importance (ncols,), as llama-quantize passes it, or None.
        threads: row ranges quantized at once (ctypes lets go of the GIL; llama-quantize's workers do the same).
            The bytes do not depend on it: rows are quantized independently.
    """
    x = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, ncols = x.shape
    if not fits(qtype, ncols):  # ggml would still write whole blocks past the buffer: heap corruption
        raise EngineError(f"{qtype.name} does not fit rows of {ncols} (blocks of {block_size(qtype)})")
    if imatrix is None and ggml().ggml_quantize_requires_imatrix(int(qtype)):
        raise EngineError(f"{qtype.name} needs an importance matrix (ggml aborts without one)")
    out = np.empty((nrows, row_bytes(qtype, ncols)), dtype=np.uint8)
    imat = None
    if imatrix is not None:
        w = np.ascontiguousarray(imatrix, dtype=np.float32)
        imat = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    src, dst = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.ctypes.data_as(ctypes.c_void_p)

    def chunk(bounds: tuple[int, int]) -> int:  # ggml offsets src and dst by the start element itself
        r0, r1 = bounds
        return int(ggml().ggml_quantize_chunk(int(qtype), src, dst, r0 * ncols, r1 - r0, ncols, imat))
    edges = np.linspace(0, nrows, max(1, min(threads, nrows)) + 1).astype(int)
    parts = list(zip(edges[:-1].tolist(), edges[1:].tolist()))
    if len(parts) == 1:
        n = chunk(parts[0])
    else:
        with ThreadPoolExecutor(len(parts)) as pool:
            n = sum(pool.map(chunk, parts))
    if n != out.size:
        raise EngineError(f"ggml_quantize_chunk wrote {n} bytes for {qtype.name}, expected {out.size}")
    return out


def reference_roundtrip(rows: np.ndarray, qtype: QuantType) -> np.ndarray:
    """``dequantize_row_X(quantize_row_X_ref(rows))`` of libggml-base, for the 8-bit types the CPU backend rounds a
    quantized weight's input to (ggml-cpu.c ``vec_dot_type``: Q8_K for K and IQ types, Q8_0 or Q8_1 for
    Q4_0..Q8_0), which ``ggml_quantize_chunk`` does not take and whose type traits carry no converters in ggml-base.

    Args:
        rows: float32 (nrows, ncols); ncols a whole number of the type's blocks.
    """
    x = np.ascontiguousarray(rows, dtype=np.float32)
    nrows, ncols = x.shape
    name = ggml().ggml_get_type_traits(int(qtype)).contents.type_name.decode()
    try:
        quantize = _from_float_t(("quantize_row_" + name + "_ref", ggml()))
    except AttributeError:
        raise EngineError(f"libggml-base exports no reference quantizer for {qtype.name}") from None
    if not fits(qtype, ncols):
        raise EngineError(f"{qtype.name} does not fit rows of {ncols} (blocks of {block_size(qtype)})")
    blocks = np.empty((nrows, ggml_row_size(qtype, ncols)), dtype=np.uint8)  # gguf-py has Q8_1's old 40-byte block
    quantize(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), blocks.ctypes.data_as(ctypes.c_void_p), x.size)
    if qtype == QuantType.Q8_1:  # an input type only: ggml has no dequantizer for it
        return _q8_1_values(blocks).reshape(nrows, ncols)
    out = np.empty_like(x)
    dequantize = _to_float_t(("dequantize_row_" + name, ggml()))
    dequantize(blocks.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.size)
    return out


def _q8_1_values(blocks: np.ndarray) -> np.ndarray:
    """ggml-common.h ``block_q8_1``: a half scale ``d``, a half sum, 32 int8 ``qs``; value = d * q."""
    b = blocks.reshape(-1, 36)
    d = np.ascontiguousarray(b[:, :2]).view(np.float16).astype(np.float32)
    return (d * b[:, 4:].view(np.int8).astype(np.float32)).reshape(-1)


@dataclass(frozen=True)
class QuantBytes:
    """Bytes ``[start, stop)`` of a block that hold quant bits.

    ``zero`` / ``one`` are the byte values that make every quant in the range read as 0 / 1.
    Where the range holds high bits (qh), both are 0x00 so "quant 1" stays 1, not 1 + 16.
    """

    start: int
    stop: int
    zero: int
    one: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"bad byte range [{self.start}, {self.stop})")


# Quant-bit byte ranges of each block struct in ggml/src/ggml-common.h. The fields that are not
# listed (d, dmin, m, scales) are left alone, so one_minus_zero is exactly one step.
QUANT_BYTES: dict[QuantType, tuple[QuantBytes, ...]] = {
    # block_q4_0: d[2] qs[16]; two 4-bit quants per byte, so 0x11 = both nibbles 1
    QuantType.Q4_0: (QuantBytes(2, 18, 0x00, 0x11),),
    # block_q4_1: d[2] m[2] qs[16]
    QuantType.Q4_1: (QuantBytes(4, 20, 0x00, 0x11),),
    # block_q5_0: d[2] qh[4] qs[16]; qh holds the 5th bit of each quant
    QuantType.Q5_0: (QuantBytes(2, 6, 0x00, 0x00), QuantBytes(6, 22, 0x00, 0x11)),
    # block_q5_1: d[2] m[2] qh[4] qs[16]
    QuantType.Q5_1: (QuantBytes(4, 8, 0x00, 0x00), QuantBytes(8, 24, 0x00, 0x11)),
    # block_q8_0: d[2] qs[32] (int8)
    QuantType.Q8_0: (QuantBytes(2, 34, 0x00, 0x01),),
    # block_q2_K: scales[16] qs[64] d[2] dmin[2]; four 2-bit quants per byte, 0x55 = all four 1
    QuantType.Q2_K: (QuantBytes(16, 80, 0x00, 0x55),),
    # block_q3_K: hmask[32] qs[64] scales[12] d[2]; a set hmask bit means "no -4 offset", so it
    # stays 0xFF in both copies and the low 2 bits carry the quant
    QuantType.Q3_K: (QuantBytes(0, 32, 0xFF, 0xFF), QuantBytes(32, 96, 0x00, 0x55)),
    # block_q4_K: d[2] dmin[2] scales[12] qs[128]
    QuantType.Q4_K: (QuantBytes(16, 144, 0x00, 0x11),),
    # block_q5_K: d[2] dmin[2] scales[12] qh[32] qs[128]
    QuantType.Q5_K: (QuantBytes(16, 48, 0x00, 0x00), QuantBytes(48, 176, 0x00, 0x11)),
    # block_q6_K: ql[128] qh[64] scales[16] d[2]; qh holds the upper 2 bits
    QuantType.Q6_K: (QuantBytes(0, 128, 0x00, 0x11), QuantBytes(128, 192, 0x00, 0x00)),
}


def with_header(blocks: np.ndarray, qtype: QuantType, d: np.ndarray, m: np.ndarray,
                scales: np.ndarray | None = None, mins: np.ndarray | None = None) -> np.ndarray:
    """A copy of raw blocks (nrows, row bytes) with each block's header set, its quant bits kept: Q4_1 / Q5_1 ``d``
    and ``m`` (one per block, F16); Q4_K / Q5_K ``d`` and ``dmin`` and the eight sub-blocks' 6-bit ``scales`` and
    ``mins`` (blocks, 8), packed as ggml-quants.c's ``quantize_row_q4_K_impl`` packs them (``get_scale_min_k4``
    reads them back).

    Raises:
        EngineError: ``qtype`` is none of the four.
    """
    size = type_size(qtype)
    out = np.array(blocks, dtype=np.uint8, copy=True)
    flat = out.reshape(-1, size)
    k_type = qtype in (QuantType.Q4_K, QuantType.Q5_K)
    if not k_type and qtype not in (QuantType.Q4_1, QuantType.Q5_1):
        raise EngineError(f"no header layout for {qtype.name}")
    flat[:, 0:2] = np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8)
    flat[:, 2:4] = np.asarray(m, np.float16).reshape(-1, 1).view(np.uint8)
    if k_type:
        sc, mn = np.asarray(scales, np.uint8), np.asarray(mins, np.uint8)
        flat[:, 4:8] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        flat[:, 8:12] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
        flat[:, 12:16] = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return out


def with_quants(blocks: np.ndarray, qtype: QuantType, one: bool) -> np.ndarray:
    """A copy of raw blocks (any shape, whole blocks per row) with every quant set to 0, or to 1 (``one``),
    the scales untouched.

    Raises:
        EngineError: ``qtype`` has no entry in QUANT_BYTES.
    """
    layout = QUANT_BYTES.get(qtype)
    if layout is None:
        raise EngineError(f"no quant-bit table for {qtype.name}; known: {', '.join(t.name for t in QUANT_BYTES)}")
    return _with_pattern(blocks, qtype, layout, one)


def quant_grid(blocks: np.ndarray, qtype: QuantType, ncols: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid of each value of raw blocks (nrows, row bytes), with the blocks' own scales: ``(step, zero)``,
    float32 (nrows, ncols), the value with its quant 0 and what one more step adds (negative where the scale
    is). Every value of the blocks is ``zero + code * step`` for an integer code."""
    zero = dequantize_rows(with_quants(blocks, qtype, one=False), qtype, ncols)
    return dequantize_rows(with_quants(blocks, qtype, one=True), qtype, ncols) - zero, zero


# Index-coded types: 4-bit indices into ggml's kvalues_iq4nl (gguf-py's IQ4_NL.kvalues), two to a byte. ``one``
# sets every index to the level 1, so that what it dequantizes to is each value's scale.
INDEX_BYTES: dict[QuantType, QuantBytes] = {
    # block_iq4_nl: d[2] qs[16]
    QuantType.IQ4_NL: QuantBytes(2, 18, 0x00, 0x88),
    # block_iq4_xs: d[2] scales_h[2] scales_l[4] qs[128]
    QuantType.IQ4_XS: QuantBytes(8, 136, 0x00, 0x88),
}
IQ4_LEVELS = np.asarray(IQ4_NL.kvalues, dtype=np.float32)
# Blocks packed at once (pack_codes holds a byte per quant bit of each).
PACK_BLOCKS = 8192


def block_lattice(blocks: np.ndarray, qtype: QuantType, ncols: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """What the blocks' own scales let each value be: ``(step, zero, levels)``, float32 (nrows, ncols) but the
    levels: ``zero + step * code`` (QUANT_BYTES' types, ``levels`` None) or ``step * levels[code]`` (INDEX_BYTES')."""
    if qtype in INDEX_BYTES:
        scale = dequantize_rows(_with_pattern(blocks, qtype, (INDEX_BYTES[qtype],), one=True), qtype, ncols)
        return scale, np.zeros_like(scale), IQ4_LEVELS
    return (*quant_grid(blocks, qtype, ncols), None)


@dataclass(frozen=True)
class CodeBits:
    """Where a block type keeps its values' codes, one entry per quant bit: its byte and bit in the block, the value
    (index in the block) it belongs to, what setting it against its state in ``zero`` adds to that value's code
    (a power of two; negative for Q8_0's sign bit and Q3_K's hmask), and that state."""

    byte: np.ndarray
    bit: np.ndarray
    element: np.ndarray
    weight: np.ndarray
    zero: np.ndarray

    @property
    def codes(self) -> tuple[int, int]:
        """The lowest and highest code a value can hold."""
        w = self.weight[self.element == 0]
        return int(w[w < 0].sum()), int(w[w > 0].sum())


@functools.cache
def code_bits(qtype: QuantType) -> CodeBits:
    """Found by setting each quant bit of a block llama.cpp quantized and reading which value's code it moves (ggml's
    dequantizer is the layout's definition), so ``pack_codes`` needs no copy of ggml-common.h's bit layouts.

    Raises:
        EngineError: ``qtype`` has no quant-bit table, or a bit moves other than one value's code by a power of two.
    """
    ranges = _quant_ranges(qtype)
    n = block_size(qtype)
    rows = np.random.default_rng(0).normal(size=(1, n)).astype(np.float32)
    probe = _with_pattern(quantize_rows(rows, qtype, np.ones(n, np.float32)), qtype, ranges, one=False)
    step, zero, levels = block_lattice(probe, qtype, n)
    base = lattice_codes(dequantize_rows(probe, qtype, n), step, zero, levels)
    byte = np.repeat(np.concatenate([np.arange(r.start, r.stop) for r in ranges]), 8)
    bit = np.tile(np.arange(8), len(byte) // 8)
    flipped = np.repeat(probe, len(byte), axis=0)
    flipped[np.arange(len(byte)), byte] ^= (1 << bit).astype(np.uint8)
    moved = lattice_codes(dequantize_rows(flipped, qtype, n), step, zero, levels) - base
    element = np.argmax(moved != 0, axis=1)
    weight = moved[np.arange(len(byte)), element]
    power = np.abs(weight)
    if np.any(np.count_nonzero(moved, axis=1) != 1) or np.any(power & (power - 1)):
        raise EngineError(f"{qtype.name}: a quant bit moves other than one value's code by a power of two")
    return CodeBits(byte, bit, element, weight, (probe[0, byte] >> bit) & 1)


def pack_codes(blocks: np.ndarray, qtype: QuantType, codes: np.ndarray) -> np.ndarray:
    """Raw blocks (nrows, row bytes) with each value's quant bits set to its code (ints (nrows, ncols) within
    ``code_bits(qtype).codes``, on block_lattice's grid), the blocks' scales kept.

    Raises:
        ValueError: a code outside the type's range, or codes and blocks of different shapes.
    """
    cb = code_bits(qtype)
    n, size = block_size(qtype), type_size(qtype)
    lo, hi = cb.codes
    nrows = blocks.shape[0]
    if codes.shape != (nrows, blocks.shape[1] // size * n):
        raise ValueError(f"codes {codes.shape} do not fill blocks {blocks.shape} of {qtype.name}")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{qtype.name} codes lie in {lo}..{hi}, not {codes.min()}..{codes.max()}")
    out = np.array(blocks, dtype=np.uint8, copy=True)
    order = np.argsort(cb.byte, kind="stable")
    byte, starts = np.unique(cb.byte[order], return_index=True)
    shift = np.log2(np.abs(cb.weight[order])).astype(np.int32)
    negative = cb.weight[order] < 0
    keep = np.full(size, 0xFF, dtype=np.uint8)
    keep[byte] = 0
    every_block, every_code = out.reshape(-1, size), codes.reshape(-1, n)
    for b0 in range(0, len(every_block), PACK_BLOCKS):
        view = every_block[b0:b0 + PACK_BLOCKS]
        above = every_code[b0:b0 + PACK_BLOCKS].astype(np.int32) - lo
        t = (above[:, cb.element[order]] >> shift) & 1
        bits = (np.where(negative, 1 - t, t) ^ cb.zero[order]).astype(np.uint8) << cb.bit[order].astype(np.uint8)
        view &= keep
        view[:, byte] |= np.add.reduceat(bits, starts, axis=1).astype(np.uint8)
    return out


def _quant_ranges(qtype: QuantType) -> tuple[QuantBytes, ...]:
    if qtype in INDEX_BYTES:
        return (INDEX_BYTES[qtype],)
    layout = QUANT_BYTES.get(qtype)
    if layout is None:
        known = ", ".join(t.name for t in (*QUANT_BYTES, *INDEX_BYTES))
        raise EngineError(f"no quant-bit table for {qtype.name}; known: {known}")
    return layout


def _with_pattern(blocks: np.ndarray, qtype: QuantType, ranges: tuple[QuantBytes, ...], one: bool) -> np.ndarray:
    out = np.array(blocks, dtype=np.uint8, copy=True)
    view = out.reshape(-1, type_size(qtype))
    for qb in ranges:
        view[:, qb.start:qb.stop] = qb.one if one else qb.zero
    return out


def dequantize_rows(blocks: np.ndarray, qtype: QuantType, ncols: int) -> np.ndarray:
    """uint8 blocks (nrows, row bytes) -> float32 (nrows, ncols), with ggml's own ``to_float``.

    Bit-identical to ``gguf.quants.dequantize`` (tests/test_kernels.py checks every type) and ~10x
    faster, which keeps scoring near the speed of a plain quantize; it also covers types gguf lacks.
    """
    return ggml_to_float(blocks, qtype, ncols)


def ggml_to_float(blocks: np.ndarray, qtype: QuantType, ncols: int) -> np.ndarray:
    traits = ggml().ggml_get_type_traits(int(qtype)).contents
    if not traits.to_float:
        raise EngineError(f"ggml has no dequantizer for {qtype.name}")
    fn = _to_float_t(traits.to_float)
    src = np.ascontiguousarray(blocks)
    out = np.empty((src.shape[0], ncols), dtype=np.float32)
    fn(src.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out
