"""Importance matrices: llama-imatrix's per-column activation statistics, read and written.

The value itself (``Imatrix``) lives in ``ggufmix/imatrix.py``, below the engine that collects it.

Two file formats are read: llama-imatrix's GGUF (``<name>.in_sum2`` / ``<name>.counts`` tensors,
mirrors ``common/imatrix-loader.cpp`` ``common_imatrix_load``) and the legacy ``.dat`` binary
(mirrors ``common_imatrix_load_legacy``). Only GGUF is written.
"""
from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ggufmix.artifacts import temp_beside
from ggufmix.errors import InputError
from ggufmix.imatrix import Imatrix
from ggufmix.io.gguf_index import MAGIC

logger = logging.getLogger(__name__)

SUMS_SUFFIX = ".in_sum2"
COUNTS_SUFFIX = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read an importance matrix written by llama-imatrix (GGUF or legacy ``.dat``) or by ggufmix.

    Raises:
        InputError: the file is missing, unreadable, truncated or not an imatrix; the message names it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such imatrix file")
    with p.open("rb") as f:
        magic = f.read(4)
    try:
        imatrix = _read_gguf(p) if magic == MAGIC else _read_legacy(p)
    except InputError:
        raise
    except (ValueError, IndexError, KeyError, OSError, struct.error, UnicodeDecodeError) as e:
        raise InputError(f"{p}: not a readable imatrix file ({e})") from None
    if not len(imatrix):
        raise InputError(f"{p}: the imatrix holds no entries")
    logger.debug("%s: %d imatrix entries, %d chunks of %d", p, len(imatrix), imatrix.chunk_count,
                 imatrix.chunk_size)
    return imatrix


def _read_gguf(p: Path) -> Imatrix:
    """Mirrors ``common_imatrix_load``: pair ``.in_sum2`` with ``.counts``, both F32."""
    import gguf

    reader = gguf.GGUFReader(p, "r")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        for suffix, into in ((SUMS_SUFFIX, sums), (COUNTS_SUFFIX, counts)):
            if t.name.endswith(suffix):
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise InputError(f"{p}: imatrix tensor {t.name!r} is {t.tensor_type.name}, expected F32")
                into[t.name[: -len(suffix)]] = np.array(t.data, dtype=np.float32).reshape(-1)
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise InputError(f"{p}: imatrix entry {unpaired[0]!r} has sums or counts but not both")
    return Imatrix(
        sums=sums,
        counts={n: np.rint(c).astype(np.int64) for n, c in counts.items()},
        datasets=tuple(_field(reader, KEY_DATASETS) or ()),
        chunk_count=int(_field(reader, KEY_CHUNK_COUNT) or 0),
        chunk_size=int(_field(reader, KEY_CHUNK_SIZE) or 0),
    )


def _field(reader: object, key: str) -> object:
    f = reader.fields.get(key)  # type: ignore[attr-defined]
    return None if f is None else f.contents()


def _read_legacy(p: Path) -> Imatrix:
    """Mirrors ``common_imatrix_load_legacy``.

    A ``.dat`` entry stores mean * ncall with count ncall, so sums / counts is already the mean
    llama-quantize uses; an entry with ncall <= 0 is taken as stored (count 1), as llama-quantize does.
    """
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    with p.open("rb") as f:
        (n_entries,) = _unpack(f, "<i")
        if n_entries < 1:
            raise InputError(f"{p}: not an imatrix file (no GGUF magic, and {n_entries} legacy entries)")
        for i in range(n_entries):
            name, ncall, values = _legacy_entry(f, i)
            sums[name] = values
            counts[name] = np.array([ncall if ncall > 0 else 1], dtype=np.int64)
        chunk_count, datasets = _legacy_trailer(f)
    return Imatrix(sums=sums, counts=counts, datasets=datasets, chunk_count=chunk_count, chunk_size=0)


def _legacy_entry(f: BinaryIO, i: int) -> tuple[str, int, np.ndarray]:
    (name_len,) = _unpack(f, "<i")
    if not 0 < name_len < 4096:
        raise ValueError(f"entry {i}: implausible name length {name_len}")
    name = _read_exact(f, name_len).decode("utf-8")
    ncall, nval = _unpack(f, "<ii")
    if nval < 1:
        raise ValueError(f"entry {i} ({name!r}): {nval} values")
    values = np.frombuffer(_read_exact(f, 4 * nval), dtype="<f4").astype(np.float32)
    return name, ncall, values


def _legacy_trailer(f: BinaryIO) -> tuple[int, tuple[str, ...]]:
    """The optional chunk count and dataset name after the entries."""
    raw = f.read(4)
    if len(raw) < 4:
        return 0, ()
    (chunk_count,) = struct.unpack("<i", raw)
    raw = f.read(4)
    if len(raw) < 4:
        return chunk_count, ()
    (length,) = struct.unpack("<i", raw)
    dataset = f.read(length) if length > 0 else b""
    if length > 0 and len(dataset) == length:
        return chunk_count, (dataset.decode("utf-8", errors="replace"),)
    return chunk_count, ()


def _unpack(f: BinaryIO, fmt: str) -> tuple[int, ...]:
    return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt)))


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError(f"truncated at byte {f.tell()}")
    return data


def write_imatrix_gguf(path: str | os.PathLike[str], imatrix: Imatrix) -> Path:
    """Write ``imatrix`` in llama-imatrix's GGUF format, atomically (temp file, then rename).

    Mirrors ``IMatrixCollector::save_imatrix``: per entry ``<name>.in_sum2`` F32 [ncols, n_mat] and
    ``<name>.counts`` F32 [1, n_mat]; ``general.type`` = "imatrix" and the three ``imatrix.*`` keys
    llama-quantize requires.

    Returns:
        The written path.

    Raises:
        InputError: the target folder does not exist or cannot be written.
    """
    import gguf

    p = Path(path)
    if not p.parent.is_dir():
        raise InputError(f"{p}: folder {p.parent} does not exist")
    tmp = str(temp_beside(p))
    try:
        writer = gguf.GGUFWriter(tmp, arch="imatrix")
        # llama-imatrix writes no architecture key; the writer adds one unconditionally.
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        _add_metadata(writer, imatrix)
        for name in imatrix.names:
            n_mat = imatrix.n_mat(name)
            writer.add_tensor(name + SUMS_SUFFIX, np.asarray(imatrix.sums[name]).reshape(n_mat, -1))
            writer.add_tensor(name + COUNTS_SUFFIX, imatrix.counts[name].astype(np.float32).reshape(n_mat, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, p)
    except OSError as e:
        raise InputError(f"{p}: cannot write the imatrix ({e})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("%s: wrote %d imatrix entries (%d chunks)", p, len(imatrix), imatrix.chunk_count)
    return p


def _add_metadata(writer: object, imatrix: Imatrix) -> None:
    datasets = list(imatrix.datasets)
    if not datasets:
        # gguf-py cannot write an empty array, and llama-quantize refuses a file without the key.
        logger.warning("imatrix has no dataset name; recording 'unknown'")
        datasets = ["unknown"]
    writer.add_type("imatrix")  # type: ignore[attr-defined]
    writer.add_array(KEY_DATASETS, datasets)  # type: ignore[attr-defined]
    writer.add_uint32(KEY_CHUNK_COUNT, int(imatrix.chunk_count))  # type: ignore[attr-defined]
    writer.add_uint32(KEY_CHUNK_SIZE, int(imatrix.chunk_size))  # type: ignore[attr-defined]


def check_against(imatrix: Imatrix, tensors: Mapping[str, int | Sequence[int]]) -> None:
    """Check that every imatrix entry fits the weight it is for.

    Mirrors the size check in ``src/llama-quant.cpp`` ``llama_model_quantize_impl``: the entry must
    hold ``ne[0] * ne[2]`` values (row length times experts); ``token_embd`` is exempt there too.

    Args:
        imatrix: the importance matrix.
        tensors: weight name -> row length (ne[0]) or the ggml-order shape (ne[0], ne[1], n_expert).
            Names absent from either side are not checked.

    Raises:
        InputError: names the first (sorted) weight whose imatrix size does not match.
    """
    for name in sorted(set(imatrix.names) & set(tensors)):
        if name.startswith("token_embd."):
            continue
        ncols, n_expert = _expected(tensors[name])
        have = imatrix.sums[name].size
        if have != ncols * n_expert:
            raise InputError(
                f"{name!r}: the imatrix has {have} values ({imatrix.n_mat(name)} x {imatrix.ncols(name)}), "
                f"the weight needs {ncols * n_expert} ({n_expert} x {ncols} columns); "
                "was the imatrix computed for another model?")


def _expected(shape: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(shape, (int, np.integer)):
        return int(shape), 1
    dims = [int(x) for x in shape]
    return dims[0], (dims[2] if len(dims) > 2 else 1)
