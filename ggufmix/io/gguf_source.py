"""A GGUF model as a lazy index of tensors: name -> shape, type and a row loader.

Nothing is read until a scorer asks for rows; ``gguf.GGUFReader`` memmaps the file.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.errors import InputError
from ggufmix.types import FLOAT_TYPES, QuantType, row_bytes, to_type

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


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
    _data: dict[str, Any] = field(repr=False, default_factory=dict)

    def rows(self, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """Rows of tensor ``name`` as float32, shape (len(index), ncols); all rows when index is None.

        Raises:
            InputError: the tensor is quantized (only float sources can be read as weights).
        """
        info = self.tensors[name]
        data = self._raw(name).reshape(info.nrows, -1)
        if index is not None:
            data = data[index]
        if info.qtype not in FLOAT_TYPES:
            from gguf.quants import dequantize

            return dequantize(np.ascontiguousarray(data), info.qtype).astype(np.float32, copy=False)
        if info.qtype == QuantType.BF16:
            return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return np.asarray(data, dtype=np.float32)

    def _raw(self, name: str) -> np.ndarray:
        return self._data[name].data

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def total_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors.values())


def open_gguf(path: str | os.PathLike[str]) -> GGUFSource:
    """Open a GGUF lazily and index its tensors.

    Raises:
        InputError: missing, not a GGUF, truncated, or a tensor type this version does not know.
    """
    p = Path(path)
    _check_header(p)
    import gguf

    try:
        reader = gguf.GGUFReader(p, "r")
    except (ValueError, IndexError, OSError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise InputError(f"{p}: not a readable GGUF file ({e}); is it truncated or damaged?") from None
    tensors = {}
    for t in reader.tensors:
        try:
            qtype = to_type(int(t.tensor_type))
        except ValueError:
            raise InputError(f"{p}: tensor {t.name!r} has unknown ggml type id {int(t.tensor_type)}; "
                             "it needs a newer ggufmix") from None
        info = TensorInfo(t.name, tuple(int(x) for x in t.shape), qtype)
        if info.n_bytes != t.n_bytes:
            raise InputError(f"{p}: tensor {t.name!r} holds {t.n_bytes} bytes, its shape and type say {info.n_bytes}")
        tensors[t.name] = info
    metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = str(metadata.get("general.architecture", "unknown"))
    logger.debug("%s: %s, %d tensors", p, arch, len(tensors))
    return GGUFSource(p, arch, metadata, tensors, {t.name: t for t in reader.tensors})


def _check_header(p: Path) -> None:
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a .gguf file")
    with p.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{p}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")


def _field_value(f: Any) -> Any:
    """A reader field as a plain Python value (strings decoded, arrays as lists)."""
    try:
        return f.contents()
    except (AttributeError, IndexError, ValueError, UnicodeDecodeError):
        return None
