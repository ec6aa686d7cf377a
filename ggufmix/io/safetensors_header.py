"""A safetensors file's JSON header, checked against the file: the truncated download is named here,
not deep inside llama.cpp's converter. Parsed by hand (8-byte length + JSON) so that neither torch nor
numpy's missing bfloat16 is needed to look at a BF16 checkpoint.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.errors import InputError

_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Bytes per element of safetensors dtypes (its Dtype enum); others are checked against the file size only.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(file: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, absolute data offset) from a safetensors file's JSON header.

    Every tensor's byte range is checked against the file size (and against its shape, for the
    dtypes whose size is known), so a truncated download is caught before any conversion.

    Raises:
        InputError: a truncated or malformed header, or a tensor past the end of the file.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(_MAX_HEADER, size - 8):
            raise InputError(f"{file}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{file}: damaged safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise InputError(f"{file}: damaged safetensors header (not a JSON object)")
    return {name: _entry(file, name, t, 8 + n, size) for name, t in header.items() if name != "__metadata__"}


def _entry(file: Path, name: str, t: Any, base: int, size: int) -> tuple[str, list[int], int]:
    try:
        dtype, shape, (begin, end) = str(t["dtype"]), [int(d) for d in t["shape"]], t["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise InputError(f"{file}: tensor {name!r} has a malformed header entry") from None
    item = _ITEMSIZE.get(dtype)
    want = int(np.prod(shape, dtype=np.int64)) * item if item else end - begin
    if not 0 <= begin <= end or end - begin != want or base + end > size:
        raise InputError(f"{file}: tensor {name!r} needs bytes {base + begin}..{base + end} of {want}, "
                         f"the file has {size}; is it truncated?")
    return dtype, shape, base + begin
