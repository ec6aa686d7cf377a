"""A GGUF model as a lazy index of tensors: name -> shape, type and a row loader.

Nothing is read until a scorer asks for rows: the header is parsed by :mod:`ggufmix.io.gguf_index`
and the data section is memmapped.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.errors import InputError
from ggufmix.io.gguf_index import MAGIC, read_index
from ggufmix.types import QuantType, block_size, row_bytes, to_type

logger = logging.getLogger(__name__)


# How each unquantized type is stored; quantized blocks stay raw bytes.
_STORAGE: dict[QuantType, type] = {QuantType.F32: np.float32, QuantType.F16: np.float16, QuantType.BF16: np.uint16,
                                   QuantType.F64: np.float64, QuantType.I8: np.int8, QuantType.I16: np.int16,
                                   QuantType.I32: np.int32, QuantType.I64: np.int64}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the source, in ggml's order: ``shape[0]`` is the row length (ne[0])."""

    name: str
    shape: tuple[int, ...]
    qtype: QuantType

    @property
    def ncols(self) -> int:
        return self.shape[0]

    @property
    def nrows(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def n_elements(self) -> int:
        return self.ncols * self.nrows

    @property
    def n_dims(self) -> int:
        """Dimensions as ``ggml_n_dims`` counts them: trailing 1s do not count."""
        dims = len(self.shape)
        while dims > 1 and self.shape[dims - 1] == 1:
            dims -= 1
        return dims

    @property
    def n_bytes(self) -> int:
        return self.nrows * row_bytes(self.qtype, self.ncols)


@dataclass
class GGUFSource:
    """An opened GGUF: metadata, the tensor index, and row access as float32."""

    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    offsets: dict[str, int] = field(repr=False, default_factory=dict)  # absolute file offset of each tensor

    def rows(self, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """Rows of tensor ``name`` as float32, shape (len(index), ncols); all rows when index is None.

        Quantized tensors are dequantized with gguf-py (scoring an already-quantized source).

        Raises:
            InputError: a quantized type gguf-py cannot dequantize.
        """
        info = self.tensors[name]
        data = self._read(name, index)
        if info.qtype == QuantType.BF16:
            return (data.astype(np.uint32) << 16).view(np.float32)
        if info.qtype in _STORAGE:
            return np.asarray(data, dtype=np.float32)
        from gguf.quants import dequantize

        try:
            return dequantize(np.ascontiguousarray(data), info.qtype).astype(np.float32, copy=False)
        except NotImplementedError:
            raise InputError(f"{self.path}: tensor {name!r} is {info.qtype.name}, which gguf-py cannot dequantize; "
                             "start from an F16/BF16/F32 GGUF") from None

    def _read(self, name: str, index: np.ndarray | None) -> np.ndarray:
        """The rows' raw bytes as (n, row) of the storage dtype (uint8 blocks for quantized types).

        Read with ``os.pread``, not through a memory map: the kernel maps whole page-cache folios
        (up to the readahead size, 8 MiB here) on every fault, so sampling 16 rows of a mapped tensor
        made the whole tensor resident.

        Raises:
            InputError: the file is shorter than its index says.
        """
        info = self.tensors[name]
        rows = np.arange(info.nrows) if index is None else np.asarray(index, dtype=np.int64)
        out = read_rows(self.path, self.offsets[name], row_bytes(info.qtype, info.ncols), rows, name)
        return np.frombuffer(out, dtype=_STORAGE.get(info.qtype, np.uint8)).reshape(len(rows), -1)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows ``start:stop`` of tensor ``name`` as stored (F16 as float16, F32 as float32, quantized types
        as uint8 blocks), read into the front of ``out``, a buffer the caller reuses: the whole-tensor
        statistics read every row of a model without a fresh buffer (and its page faults) per chunk.

        Returns:
            The rows, a view of ``out``, shape (stop - start, stored values per row).

        Raises:
            ValueError: ``out`` is not a contiguous buffer of that many bytes.
            InputError: the file is shorter than its index says.
        """
        info = self.tensors[name]
        rb = row_bytes(info.qtype, info.ncols)
        raw = out.reshape(-1).view(np.uint8) if out.flags.c_contiguous else None
        if raw is None or raw.size < (stop - start) * rb:
            raise ValueError(f"{name!r}: rows {start}:{stop} need {(stop - start) * rb} bytes, the buffer has "
                             f"{out.nbytes}{'' if out.flags.c_contiguous else ' and is not contiguous'}")
        raw = raw[:(stop - start) * rb]
        read_rows(self.path, self.offsets[name], rb, np.arange(start, stop), name, out=raw)
        return raw.view(_STORAGE.get(info.qtype, np.uint8)).reshape(stop - start, -1)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def total_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())

    @property
    def data_end(self) -> int:
        """The file offset where the last tensor's data ends."""
        return max((self.offsets[n] + t.n_bytes for n, t in self.tensors.items()), default=0)

    @property
    def header_only(self) -> bool:
        """The file stops before its tensors' data (``scripts/header_models.py``; opened with ``check_data=False``)."""
        return self.path.stat().st_size < self.data_end


def read_rows(path: Path, offset: int, rb: int, rows: np.ndarray, name: str,
              out: bytearray | np.ndarray | None = None) -> bytearray | np.ndarray:
    """The raw bytes of ``rows`` (each ``rb`` bytes) of the tensor at ``offset`` in ``path``, one read per run,
    into ``out`` (bytes, ``len(rows) * rb`` of them) or a new bytearray.

    Raises:
        InputError: the file is shorter than that (names ``path`` and tensor ``name``).
    """
    if out is None:
        out = bytearray(len(rows) * rb)
    with open(path, "rb", buffering=0) as f:
        at = 0
        for first, count in _runs(rows):
            _pread_into(f.fileno(), out, at, count * rb, offset + first * rb, path, name)
            at += count * rb
    return out


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive row indices as (first, count) runs: one read per run."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(r[0]), len(r)) for r in np.split(rows, breaks)]


def _pread_into(fd: int, out: bytearray | np.ndarray, at: int, n: int, offset: int, path: Path, name: str) -> None:
    view = memoryview(out)[at:at + n]
    done = 0
    while done < n:  # a single read returns at most ~2 GiB on Linux
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise InputError(f"{path}: tensor {name!r} is cut short at byte {offset + done}; is the file truncated?")
        done += got


def open_gguf(path: str | os.PathLike[str], check_data: bool = True) -> GGUFSource:
    """Open a GGUF lazily and index its tensors.

    ``check_data=False`` reads the header only: the tensors' data may be missing (metadata-only strategies).

    Raises:
        InputError: missing, not a GGUF, truncated, a tensor outside the file, or a tensor type this
            version does not know.
    """
    p = Path(path)
    _check_header(p)
    index = read_index(p)
    tensors, offsets = {}, {}
    for t in index.tensors:
        try:
            qtype = to_type(t.type_id)
        except ValueError:
            raise InputError(f"{p}: tensor {t.name!r} has unknown ggml type id {t.type_id}; "
                             "it needs a newer ggufmix") from None
        info = TensorInfo(t.name, t.shape, qtype)
        if t.shape[0] % block_size(qtype):
            raise InputError(f"{p}: tensor {t.name!r} has rows of {t.shape[0]}, not a whole number of "
                             f"{qtype.name} blocks")
        start = index.data_offset + t.offset
        if check_data and start + info.n_bytes > index.file_size:
            raise InputError(f"{p}: tensor {t.name!r} needs bytes {start}..{start + info.n_bytes}, the file has "
                             f"{index.file_size}; is it truncated?")
        if t.name in tensors:
            raise InputError(f"{p}: tensor {t.name!r} appears twice")
        tensors[t.name], offsets[t.name] = info, start
    arch = str(index.metadata.get("general.architecture", "unknown"))
    logger.debug("%s: %s, %d tensors", p, arch, len(tensors))
    return GGUFSource(p, arch, index.metadata, tensors, offsets)


@contextmanager
def writable_tensors(path: str | os.PathLike[str]) -> Iterator[dict[str, tuple[TensorInfo, np.ndarray]]]:
    """Each tensor of the GGUF at ``path`` as its info and a writable view of its bytes (uint8, memmapped), flushed
    to the file on a clean exit. Unlike gguf-py's ``GGUFReader(path, "r+")`` it knows the ggml types gguf 0.19 does
    not (``Q2_0``), which llama.cpp writes when a plan asks for them.

    Raises:
        InputError: as open_gguf.
    """
    src = open_gguf(path)
    data = np.memmap(src.path, dtype=np.uint8, mode="r+")
    try:
        yield {name: (info, data[src.offsets[name]:src.offsets[name] + info.n_bytes])
               for name, info in src.tensors.items()}
        data.flush()
    finally:
        del data


def _check_header(p: Path) -> None:
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a .gguf file")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise InputError(f"{p}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
