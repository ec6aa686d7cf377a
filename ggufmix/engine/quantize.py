"""``llama_model_quantize`` with per-tensor overrides and an importance matrix."""
from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence

import numpy as np
from tqdm import tqdm

from ggufmix.engine.llamalib import LogProgress, last_error, llama, raise_pending_interrupt
from ggufmix.errors import EngineError
from ggufmix.imatrix import Imatrix
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

def quantize_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, ftype: int,
                  overrides: Sequence[tuple[str, QuantType]] = (),
                  imatrix: Imatrix | None = None, nthread: int = 0,
                  allow_requantize: bool = False, progress: bool = True) -> None:
    """Run llama.cpp's quantizer from ``src`` to ``dst``.

    Args:
        ftype: the llama_ftype; it must be a quantized one for the overrides to apply.
        overrides: (regex, type) pairs; llama.cpp regex_searches them in order, first match wins.
        imatrix: the importance matrix; llama.cpp takes each weight's per-column mean squares (``Imatrix.values``).

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
    raise_pending_interrupt()
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


def _imatrix_array(lib, imatrix: Imatrix, keep: list[object]):  # noqa: ANN001
    arr = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()
    for i, name in enumerate(imatrix.names):
        v = np.ascontiguousarray(imatrix.values(name), dtype=np.float32)
        b = name.encode()
        keep.extend((v, b))
        arr[i].name = b
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(imatrix)].name = None
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))


