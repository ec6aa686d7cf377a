"""A fast reader of a GGUF file's header: metadata and the tensor index, without touching tensor data.

``gguf.GGUFReader`` builds a numpy view for every element of every array, so a file whose tokenizer
holds 49k-262k strings takes seconds to open (SmolLM2-135M: 2.6 s, more than llama.cpp needs to
quantize it). This parser walks the same layout (gguf-py's ``GGUFReader``, ggml's ``gguf.cpp``):
scalars and strings are decoded, long arrays are skipped and kept as (type, length) summaries, and
every length and offset is checked against the file size, so a damaged file is an ``InputError``
that names it, never an exception from deep inside numpy.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggufmix.errors import InputError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_KEPT_ARRAY = 64  # arrays up to this length are decoded; longer ones are summarised

# gguf_type (ggml gguf.h): id -> struct format of one item; 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArraySummary:
    """A long metadata array that was skipped, not decoded (e.g. ``tokenizer.ggml.tokens``)."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]   # ne[0] first, as ggml
    type_id: int
    offset: int              # from the start of the data section


@dataclass(frozen=True)
class GGUFIndex:
    version: int
    metadata: dict[str, Any]
    tensors: tuple[TensorEntry, ...]
    tensors_offset: int      # where the tensor index starts (after the metadata)
    data_offset: int
    file_size: int


_U64 = struct.Struct("<Q")


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise InputError(f"{self.path}: truncated GGUF ({what} needs {n} bytes at offset {self.pos}, "
                             f"the file has {self.size})")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: {what} is not valid UTF-8 (offset {self.pos - n})") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` length-prefixed strings without copying them (a vocabulary: 150k of them)."""
        pos, size, length = self.pos, self.size, _U64.unpack_from
        for _ in range(count):
            if pos + 8 > size or (pos := pos + 8 + length(self.buf, pos)[0]) > size:
                raise InputError(f"{self.path}: truncated GGUF ({what} run past the end of the file, "
                                 f"{self.size} bytes)")
        self.pos = pos

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"value of {key!r}")
        if vtype == _STRING:
            return self.string(f"value of {key!r}")
        if vtype == _ARRAY:
            itype = self.unpack("<I", f"array type of {key!r}")
            n = self.unpack("<Q", f"array length of {key!r}")
            if itype not in _SCALARS and itype != _STRING:
                raise InputError(f"{self.path}: metadata {key!r} is an array of unknown type {itype}")
            if n <= MAX_KEPT_ARRAY:
                return [self.value(itype, key) for _ in range(n)]
            if itype == _STRING:
                self.skip_strings(n, f"strings of {key!r}")
            else:
                self.take(n * struct.calcsize(_SCALARS[itype]), f"items of {key!r}")
            return ArraySummary(itype, n)
        raise InputError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")


GGML_MAX_NAME = 64  # ggml.h


def read_index(path: Path) -> GGUFIndex:
    """Metadata and tensor index of the GGUF at ``path``.

    Raises:
        InputError: missing, not a GGUF, an unsupported version or byte order, or any part cut short.
    """
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise InputError(f"{path}: truncated GGUF header ({size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), size)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse(c: _Cursor, size: int) -> GGUFIndex:
    if c.take(4, "magic") != MAGIC:
        raise InputError(f"{c.path}: not a GGUF file (bad magic)")
    version = c.unpack("<I", "version")
    if version not in (2, 3):
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        kind = "big-endian GGUF" if swapped in (2, 3) else f"GGUF version {version}"
        raise InputError(f"{c.path}: {kind} is not supported (llama.cpp writes little-endian version 3)")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:  # each entry takes at least that many bytes
        raise InputError(f"{c.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                         f"more than {size} bytes can hold")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        if key in metadata:  # gguf.cpp refuses these too
            raise InputError(f"{c.path}: metadata key {key!r} appears twice")
        metadata[key] = c.value(c.unpack("<I", f"type of {key!r}"), key)
    tensors_offset = c.pos
    tensors = tuple(_tensor_entry(c) for _ in range(n_tensors))
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            raise InputError(f"{c.path}: tensor {t.name!r} appears twice in the tensor index")
        seen.add(t.name)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{c.path}: general.alignment {alignment!r} is not a power of two")
    data_offset = -(-c.pos // alignment) * alignment
    return GGUFIndex(version, metadata, tensors, tensors_offset, data_offset, size)


def _tensor_entry(c: _Cursor) -> TensorEntry:
    name = c.string("tensor name")
    # ggml keeps names as C strings of at most GGML_MAX_NAME - 1 bytes: a NUL would cut the name llama.cpp
    # sees short of ours, and gguf.cpp refuses longer ones
    if "\x00" in name or len(name.encode()) >= GGML_MAX_NAME:
        raise InputError(f"{c.path}: tensor name {name!r} is not a valid ggml name (NUL byte or {GGML_MAX_NAME}+ bytes)")
    n_dims = c.unpack("<I", f"dimensions of {name!r}")
    if not 1 <= n_dims <= 4:
        raise InputError(f"{c.path}: tensor {name!r} has {n_dims} dimensions (ggml allows 1 to 4)")
    shape = tuple(c.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
    n = 1
    for d in shape:
        n *= d
    if n == 0 or n >= 1 << 63:  # ggml counts elements in int64; an empty weight is no model's
        raise InputError(f"{c.path}: tensor {name!r} has shape {list(shape)}: {'no' if n == 0 else 'too many'} elements")
    type_id = c.unpack("<I", f"type of {name!r}")
    offset = c.unpack("<Q", f"offset of {name!r}")
    return TensorEntry(name, shape, type_id, offset)
