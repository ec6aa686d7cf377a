from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from ggufmix.engine.kernels import dequantize_rows, quantize_rows
from ggufmix.types import DEFAULT_TYPES, QuantType

RNG = np.random.default_rng(0)
ROWS = RNG.standard_normal((8, 512)).astype(np.float32)
IMATRIX = RNG.uniform(0.1, 10.0, 512).astype(np.float32)


@pytest.mark.parametrize("qtype", [t for t in DEFAULT_TYPES if t != QuantType.Q2_0])
def test_ggml_dequantize_is_bit_identical_to_gguf_quants(qtype: QuantType) -> None:
    blocks = quantize_rows(ROWS, qtype, IMATRIX)
    ours = dequantize_rows(blocks, qtype, 512)
    ref = dequantize(blocks, qtype).reshape(8, 512)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("qtype", DEFAULT_TYPES)
def test_roundtrip_error_shrinks_with_bits(qtype: QuantType) -> None:
    deq = dequantize_rows(quantize_rows(ROWS, qtype, IMATRIX), qtype, 512)
    rel = float(np.mean((deq - ROWS) ** 2) / np.mean(ROWS ** 2))
    assert 0 < rel < 0.7
    if qtype == QuantType.Q8_0:
        assert rel < 1e-4


def test_imatrix_steers_the_quantizer() -> None:
    """With an imatrix, llama.cpp's Q4_K search minimises weighted error: it must beat the plain one."""
    w = np.ones(512, np.float32)
    w[:64] = 1000.0
    plain = dequantize_rows(quantize_rows(ROWS, QuantType.Q4_K, None), QuantType.Q4_K, 512)
    steered = dequantize_rows(quantize_rows(ROWS, QuantType.Q4_K, w), QuantType.Q4_K, 512)
    werr = lambda d: float(np.sum(w * (d - ROWS) ** 2))  # noqa: E731
    assert werr(steered) < werr(plain)
