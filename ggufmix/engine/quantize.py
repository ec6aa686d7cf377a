"""``llama_model_quantize`` with per-tensor overrides and an importance matrix."""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm import tqdm

from ggufmix.engine.llamalib import LogProgress, last_error, llama
from ggufmix.errors import EngineError, UsageError
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

# llama-quantize's named mixes -> llama_ftype (include/llama.h)
STOCK_FTYPES: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ2_XXS": 19,
    "IQ2_XS": 20, "Q2_K_S": 21, "IQ3_XS": 22, "IQ3_XXS": 23, "IQ1_S": 24, "IQ4_NL": 25, "IQ3_S": 26,
    "IQ3_M": 27, "IQ2_S": 28, "IQ2_M": 29, "IQ4_XS": 30, "IQ1_M": 31, "BF16": 32, "F16": 1,
}


def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, ftype: int,
                  overrides: Sequence[tuple[str, QuantType]] = (),
                  imatrix: Mapping[str, np.ndarray] | None = None, nthread: int = 0,
                  allow_requantize: bool = False, progress: bool = True) -> None:
    """Run llama.cpp's quantizer from ``src`` to ``dst``.

    Args:
        ftype: the llama_ftype; it must be a quantized one for the overrides to apply.
        overrides: (regex, type) pairs; llama.cpp regex_searches them in order, first match wins.
        imatrix: tensor name -> per-column importance (n_experts * ncols floats).

    Raises:
        EngineError: llama.cpp refused (its last error line is in the message).
    """
    lib = llama()
    params = lib.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread
    params.allow_requantize = allow_requantize
    keep: list[object] = []  # every buffer the C side points to must outlive the call
    if overrides:
        params.tt_overrides = _override_array(lib, overrides, keep)
    if imatrix:
        params.imatrix = _imatrix_array(lib, imatrix, keep)
    bar = tqdm(total=None, desc="quantizing", unit="tensor", disable=not progress, leave=False)

    def step(i: int, n: int) -> None:
        bar.total = n
        bar.update(i - bar.n)

    with LogProgress(step):
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    bar.close()
    if rc != 0:
        raise EngineError(f"{src}: llama.cpp failed to quantize: {last_error()}")


def _override_array(lib, overrides: Sequence[tuple[str, QuantType]], keep: list[object]):  # noqa: ANN001
    arr = (lib.llama_model_tensor_override * (len(overrides) + 1))()
    for i, (pattern, qtype) in enumerate(overrides):
        b = pattern.encode()
        keep.append(b)
        arr[i].pattern = b
        arr[i].type = int(qtype)
    arr[len(overrides)].pattern = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(lib.llama_model_tensor_override))


def _imatrix_array(lib, imatrix: Mapping[str, np.ndarray], keep: list[object]):  # noqa: ANN001
    arr = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, (name, values) in enumerate(sorted(imatrix.items())):
        v = np.ascontiguousarray(values, dtype=np.float32)
        b = name.encode()
        keep.extend((v, b))
        arr[i].name = b
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(imatrix)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))


def stock_ftype(name: str) -> int:
    """``'Q4_K_M'`` -> its llama_ftype.

    Raises:
        UsageError: not a llama-quantize mix name.
    """
    try:
        return STOCK_FTYPES[name.upper()]
    except KeyError:
        raise UsageError(f"unknown llama-quantize mix {name!r}; known: {', '.join(STOCK_FTYPES)}") from None
