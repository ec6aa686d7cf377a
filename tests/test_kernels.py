from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import dequantize

from ggufmix.engine.kernels import (
    INDEX_BYTES,
    QUANT_BYTES,
    block_lattice,
    code_bits,
    dequantize_rows,
    f16_to_f32,
    pack_codes,
    quant_grid,
    quantize_rows,
)
from ggufmix.errors import EngineError
from ggufmix.numerics import lattice_codes
from ggufmix.types import DEFAULT_TYPES, QuantType, type_size

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


@pytest.mark.parametrize("qtype", [QuantType.IQ4_XS, QuantType.Q4_K, QuantType.IQ2_XXS, QuantType.Q8_0])
def test_threads_give_the_same_bytes(qtype: QuantType) -> None:
    rows = RNG.standard_normal((37, 512)).astype(np.float32)  # rows that do not split evenly
    one = quantize_rows(rows, qtype, IMATRIX)
    for threads in (2, 3, 64):
        np.testing.assert_array_equal(quantize_rows(rows, qtype, IMATRIX, threads=threads), one)


def test_imatrix_steers_the_quantizer() -> None:
    """With an imatrix, llama.cpp's Q4_K search minimises weighted error: it must beat the plain one."""
    w = np.ones(512, np.float32)
    w[:64] = 1000.0
    plain = dequantize_rows(quantize_rows(ROWS, QuantType.Q4_K, None), QuantType.Q4_K, 512)
    steered = dequantize_rows(quantize_rows(ROWS, QuantType.Q4_K, w), QuantType.Q4_K, 512)
    werr = lambda d: float(np.sum(w * (d - ROWS) ** 2))  # noqa: E731
    assert werr(steered) < werr(plain)


def test_a_loader_runs_once_when_threads_race_for_it() -> None:
    """The scorers' threads reach llama.cpp's loaders together on the first tensors; two loads at once
    corrupted the heap now and then (test_fuzz_build's signal-6 builds). ``loaded_once`` lets one thread load
    while the others wait for its result."""
    import threading
    import time

    from ggufmix.engine.llamalib import loaded_once

    calls: list[int] = []

    @loaded_once
    def slow_load() -> object:
        calls.append(1)
        time.sleep(0.05)  # plain functools.cache lets every waiting thread in during this window
        return object()

    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(slow_load())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(g) for g in got}) == 1


def test_quantize_rows_refuses_rows_that_are_not_whole_blocks() -> None:
    """ggml writes whole blocks whatever the buffer: a row narrower than the type's block must never reach it."""
    with pytest.raises(EngineError, match="Q4_K does not fit rows of 64"):
        quantize_rows(np.ones((64, 64), np.float32), QuantType.Q4_K)


def test_f16_to_f32_gives_numpy_s_value_for_every_f16_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.size, np.float32)
    f16_to_f32(bits, out)
    ref = bits.view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    finite = ~np.isnan(ref)  # a NaN's payload may come back quieted
    np.testing.assert_array_equal(out.view(np.uint32)[finite], ref.view(np.uint32)[finite])
    with pytest.raises(ValueError, match="into 3"):
        f16_to_f32(bits[:4], out[:3])


def test_reference_roundtrip_rounds_like_the_cpu_backends_input() -> None:
    """Q8_K: one step of max|x| / 127 per block of 256 (ggml-quants.c quantize_row_q8_K_ref); Q8_0 and Q8_1 (Q4_1
    and Q5_1's input, no ggml dequantizer) the same per 32, the step stored in F16 (up to max|x| / 1024 more). A loud
    value coarsens only its own block."""
    from ggufmix.engine.kernels import reference_roundtrip

    x = np.random.default_rng(3).standard_normal((2, 512)).astype(np.float32)
    x[0, 5] = 60.0
    for qtype, block in ((QuantType.Q8_K, 256), (QuantType.Q8_0, 32), (QuantType.Q8_1, 32)):
        err = np.abs(reference_roundtrip(x, qtype) - x).reshape(2, -1, block)
        amax = np.abs(x).reshape(2, -1, block).max(axis=2)
        assert np.all(err.max(axis=2) <= 0.5 * amax / 127 + amax / 1024)
        assert err[0, 0].max() > 10 * err[0, 1].max()  # the loud block's step, not the next one's
    with pytest.raises(EngineError):
        reference_roundtrip(x[:, :100], QuantType.Q8_K)


@pytest.mark.parametrize("qtype", sorted(QUANT_BYTES), ids=lambda t: t.name)
def test_every_value_sits_on_the_grid_its_blocks_read_as(qtype: QuantType) -> None:
    """quant_grid's (step, zero) from the blocks' own scales: each dequantized value is zero + code * step, the
    codes whole numbers that reach past one (the step is one quant, not the block's range)."""
    rng = np.random.default_rng(int(qtype))
    blocks = quantize_rows(rng.normal(size=(8, 512)).astype(np.float32), qtype, rng.uniform(0.1, 2, 512))
    step, zero = quant_grid(blocks, qtype, 512)
    code = (dequantize_rows(blocks, qtype, 512) - zero) / step
    np.testing.assert_allclose(code, np.rint(code), atol=1e-3)
    assert np.ptp(np.rint(code)) >= 3


def test_quant_grid_names_a_type_it_has_no_table_for() -> None:
    blocks = quantize_rows(np.ones((1, 256), np.float32), QuantType.IQ4_XS, np.ones(256, np.float32))
    with pytest.raises(EngineError, match="IQ4_XS"):
        quant_grid(blocks, QuantType.IQ4_XS, 256)


@pytest.mark.parametrize("qtype", sorted({*QUANT_BYTES, *INDEX_BYTES}), ids=lambda t: t.name)
def test_packing_each_values_code_gives_llama_cpps_bytes_back(qtype: QuantType) -> None:
    """code_bits reads the bit layout off ggml's dequantizer; packing the codes of llama.cpp's own blocks into them
    must give its bytes back, byte for byte."""
    rng = np.random.default_rng(int(qtype))
    x = rng.normal(size=(16, 512)).astype(np.float32) * rng.uniform(0.1, 3, size=(1, 512)).astype(np.float32)
    blocks = quantize_rows(x, qtype, rng.uniform(0.1, 3, 512).astype(np.float32))
    step, zero, levels = block_lattice(blocks, qtype, 512)
    codes = lattice_codes(dequantize_rows(blocks, qtype, 512), step, zero, levels)
    scrambled = blocks.copy()
    view = scrambled.reshape(-1, type_size(qtype))
    for r in (INDEX_BYTES[qtype],) if qtype in INDEX_BYTES else QUANT_BYTES[qtype]:
        view[:, r.start:r.stop] = rng.integers(0, 256, size=(view.shape[0], r.stop - r.start))
    assert not np.array_equal(scrambled, blocks)
    np.testing.assert_array_equal(pack_codes(scrambled, qtype, codes), blocks)
    assert np.ptp(codes) >= 3


def test_code_ranges_follow_the_layouts() -> None:
    assert code_bits(QuantType.Q8_0).codes == (-128, 127)  # int8: the top bit weighs -128
    assert code_bits(QuantType.Q3_K).codes == (-4, 3)       # a clear hmask bit takes 4 off
    assert code_bits(QuantType.Q6_K).codes == (0, 63)
    assert code_bits(QuantType.IQ4_XS).codes == (0, 15)     # an index into 16 levels


def test_pack_codes_refuses_codes_the_type_cannot_hold() -> None:
    blocks = quantize_rows(np.ones((2, 256), np.float32), QuantType.Q4_K)
    with pytest.raises(ValueError, match="0..15"):
        pack_codes(blocks, QuantType.Q4_K, np.full((2, 256), 16))
    with pytest.raises(ValueError, match="do not fill"):
        pack_codes(blocks, QuantType.Q4_K, np.zeros((2, 255), np.int32))
