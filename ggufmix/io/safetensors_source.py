"""A Hugging Face folder's safetensors as a lazy index under GGUF names, for weight-only scorers.

Like :class:`ggufmix.io.gguf_source.GGUFSource`: ``tensors`` (GGUF name -> ``TensorInfo`` in ggml's
order), ``rows(name, index)`` as float32, nothing read before a scorer asks, one tensor (or a few
rows) at a time with ``os.pread``. The safetensors header is parsed here rather than through
``safe_open(framework="numpy")`` because numpy has no bfloat16, and most checkpoints are BF16;
reading rows this way needs neither torch nor the whole tensor.

HF names become GGUF names with gguf-py's ``TensorNameMap`` for the architecture ``config.json``
names; tensors it cannot map (vision towers, per-expert MoE weights llama.cpp merges, anything
new) are kept out of ``tensors`` and listed by name in ``unmapped``.

What the converter changes and this reader does not (so numbers agree with the converted GGUF
up to these): llama-family q/k rows are reordered (the same rows, permuted), Gemma norms get +1
(1-D tensors, never quantized), and Gemma's embedding drops rows past the tokenizer's vocabulary.
"""
from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ggufmix.errors import InputError
from ggufmix.io.gguf_source import TensorInfo, read_rows
from ggufmix.io.hf import check_folder, safetensors_files
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

# safetensors dtype -> (ggml type, numpy storage); BF16 is stored as uint16 and widened by shifting.
_DTYPES: dict[str, tuple[QuantType, type]] = {"F32": (QuantType.F32, np.float32), "F16": (QuantType.F16, np.float16),
                                              "BF16": (QuantType.BF16, np.uint16)}
# config.json model_type -> gguf-py architecture, where the names differ (one line per family).
_ARCH: dict[str, str] = {
    "mistral": "LLAMA",        # Mistral 7B: llama's layout
    "gemma3_text": "GEMMA3",   # Gemma 3 text-only checkpoints (Gemma3ForCausalLM)
    "qwen2_moe": "QWEN2MOE",   # Qwen1.5/2 MoE
    "qwen3_moe": "QWEN3MOE",   # Qwen3 MoE
    "phi3": "PHI3",            # Phi-3/3.5/4 mini
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
# Bytes per element of safetensors dtypes (its Dtype enum); others are checked against the file size only.
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
             "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class _Where:
    file: Path
    offset: int  # absolute byte offset of the tensor's data
    hf_name: str


@dataclass
class SafetensorsSource:
    """A Hugging Face folder's weights: GGUF-named index, row access as float32, unmapped names."""

    path: Path
    arch: str
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    unmapped: tuple[str, ...]
    where: dict[str, _Where] = field(repr=False, default_factory=dict)

    def hf_name(self, name: str) -> str:
        """The checkpoint's name of GGUF tensor ``name``."""
        return self.where[name].hf_name

    def rows(self, name: str, index: np.ndarray | None = None) -> np.ndarray:
        """Rows of GGUF tensor ``name`` as float32, shape (len(index), ncols); all rows when index is None.

        Raises:
            InputError: the file is shorter than its header says.
        """
        info, w = self.tensors[name], self.where[name]
        storage = _DTYPES[info.qtype.name][1]
        rows = np.arange(info.nrows) if index is None else np.asarray(index, dtype=np.int64)
        out = read_rows(w.file, w.offset, info.ncols * np.dtype(storage).itemsize, rows, w.hf_name)
        data = np.frombuffer(out, dtype=storage).reshape(len(rows), info.ncols)
        if info.qtype == QuantType.BF16:
            return (data.astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32)


def open_hf_weights(folder: str | Path) -> SafetensorsSource:
    """Index a Hugging Face folder's safetensors (sharded or not) under GGUF tensor names.

    Raises:
        InputError: not a usable folder (see ``check_folder``), an architecture gguf-py does not
            know, a damaged safetensors header, or a dtype other than F32/F16/BF16.
    """
    p = Path(folder)
    check_folder(p)
    config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    arch = gguf_arch(p, str(text.get("model_type", config.get("model_type", ""))))
    n_blocks = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    name_map = gguf.TensorNameMap(arch, n_blocks)
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, _Where] = {}
    unmapped: list[str] = []
    for file in safetensors_files(p):
        for hf_name, (dtype, shape, offset) in read_header(file).items():
            if dtype not in _DTYPES:
                raise InputError(f"{file}: tensor {hf_name!r} is {dtype}; ggufmix reads F32, F16 and BF16 weights "
                                 "directly (convert the folder instead)")
            name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None or name in tensors:
                unmapped.append(hf_name)
                continue
            tensors[name] = TensorInfo(name, tuple(reversed(shape)) or (1,), _DTYPES[dtype][0])
            where[name] = _Where(file, offset, hf_name)
    if unmapped:
        logger.warning("%s: %d tensors have no GGUF name for %s: %s", p, len(unmapped), arch.name,
                       ", ".join(unmapped[:8]) + (" ..." if len(unmapped) > 8 else ""))
    return SafetensorsSource(p, gguf.MODEL_ARCH_NAMES[arch], config, tensors, tuple(unmapped), where)


def gguf_arch(folder: Path, model_type: str) -> gguf.MODEL_ARCH:
    """gguf-py's architecture for a config ``model_type``.

    Raises:
        InputError: a model type gguf-py has no tensor names for.
    """
    key = _ARCH.get(model_type, model_type.upper())
    try:
        return gguf.MODEL_ARCH[key]
    except KeyError:
        raise InputError(f"{folder}: model_type {model_type!r} has no GGUF tensor names in gguf-py "
                         f"{gguf.__version__ if hasattr(gguf, '__version__') else ''}".rstrip()) from None


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
