"""Unit tests of scripts/dequantize_gguf.py: the dither step table and the F16 file it writes.

The step the script derives from each type's own dequantizer (quants set to 0 vs 1) is compared
with the closed form written out here from the block structs in ggml-common.h and the
dequantize_row_* functions in ggml-quants.c.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from scriptload import load_script
from gguf import GGMLQuantizationType as QT





dq = load_script("dequantize_gguf.py")


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(len(values), 2)


def f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    return blocks[:, offset : offset + 2].copy().view(np.float16).astype(np.float32)[:, 0]


# Byte offsets of the fp16 super-scales (d, and dmin/m where there is one) in each block struct.
F16_FIELDS: dict[QT, tuple[int, ...]] = {
    QT.Q4_0: (0,), QT.Q4_1: (0, 2), QT.Q5_0: (0,), QT.Q5_1: (0, 2), QT.Q8_0: (0,),
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
}


def random_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw blocks (every bit pattern for quants and sub-scales) with sane fp16 scales."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        sign = rng.choice([-1.0, 1.0], size=n_blocks)
        blocks[:, offset : offset + 2] = f16_bytes(sign * rng.uniform(1e-3, 0.1, size=n_blocks))
    return blocks


def scale_min_k4(scales: np.ndarray) -> np.ndarray:
    """The 8 six-bit sub-block scales of Q4_K/Q5_K (get_scale_min_k4 in ggml-quants.c)."""
    q = scales.astype(np.int32)
    low = q[:, 0:4] & 63
    high = (q[:, 8:12] & 0x0F) | ((q[:, 0:4] >> 6) << 4)
    return np.concatenate([low, high], axis=1)


def q3_k_scales(scales: np.ndarray) -> np.ndarray:
    """The 16 signed six-bit sub-block scales of Q3_K (dequantize_row_q3_K in ggml-quants.c)."""
    aux = scales.copy().view("<u4").astype(np.uint32)
    k1, k2 = np.uint32(0x03030303), np.uint32(0x0F0F0F0F)
    tmp = aux[:, 2]
    out = np.stack([
        (aux[:, 0] & k2) | (((tmp >> 0) & k1) << 4),
        (aux[:, 1] & k2) | (((tmp >> 2) & k1) << 4),
        ((aux[:, 0] >> 4) & k2) | (((tmp >> 4) & k1) << 4),
        ((aux[:, 1] >> 4) & k2) | (((tmp >> 6) & k1) << 4),
    ], axis=1)
    return out.astype("<u4").view(np.int8).astype(np.float32) - 32


def per_element(scale: np.ndarray, group: int, block_size: int) -> np.ndarray:
    """Broadcast one scale per ``group`` consecutive elements to every element of the block."""
    return np.repeat(scale.reshape(len(scale), -1), group, axis=1).reshape(len(scale), block_size)


def closed_form(qtype: QT, b: np.ndarray) -> np.ndarray:
    """The step of every element, written out per block type."""
    if qtype in (QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        return per_element(f16_at(b, 0), 32, 32)  # d
    if qtype == QT.Q2_K:
        return per_element(f16_at(b, 80)[:, None] * (b[:, 0:16] & 0x0F), 16, 256)  # d * sc
    if qtype == QT.Q3_K:
        return per_element(f16_at(b, 108)[:, None] * q3_k_scales(b[:, 96:108]), 16, 256)
    if qtype in (QT.Q4_K, QT.Q5_K):
        return per_element(f16_at(b, 0)[:, None] * scale_min_k4(b[:, 4:16]), 32, 256)
    if qtype == QT.Q6_K:
        return per_element(f16_at(b, 208)[:, None] * b[:, 192:208].view(np.int8), 16, 256)
    raise AssertionError(qtype)


@pytest.mark.parametrize("qtype", sorted(dq.QUANT_BYTES, key=int), ids=lambda t: t.name)
def test_step_table_matches_closed_form(qtype: QT) -> None:
    blocks = random_blocks(qtype, 64, np.random.default_rng(int(qtype)))
    step = dq.quant_step(blocks, qtype)
    np.testing.assert_allclose(step, closed_form(qtype, blocks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qtype", sorted(dq.QUANT_BYTES, key=int), ids=lambda t: t.name)
def test_table_ranges_fit_the_block_and_do_not_overlap(qtype: QT) -> None:
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    covered = np.zeros(type_size, dtype=int)
    for qb in dq.QUANT_BYTES[qtype]:
        assert qb.stop <= type_size
        covered[qb.start : qb.stop] += 1
    assert covered.max() == 1
    for offset in F16_FIELDS[qtype]:  # the scales are never overwritten
        assert covered[offset : offset + 2].sum() == 0


@pytest.mark.parametrize("qtype", sorted(dq.QUANT_BYTES, key=int), ids=lambda t: t.name)
def test_step_ignores_the_quants_themselves(qtype: QT) -> None:
    rng = np.random.default_rng(7)
    blocks = random_blocks(qtype, 16, rng)
    other = blocks.copy()
    for qb in dq.QUANT_BYTES[qtype]:
        other[:, qb.start : qb.stop] = rng.integers(0, 256, size=(16, qb.stop - qb.start))
    np.testing.assert_array_equal(dq.quant_step(blocks, qtype), dq.quant_step(other, qtype))


def quantized_q4_1(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    raw = gguf.quants.quantize(rng.normal(0, 0.05, (8, 64)).astype(np.float32), QT.Q4_1)
    blocks = raw.reshape(-1, 20)
    return blocks, per_element(f16_at(blocks, 0), 32, 32)  # Q4_1: d


def quantized_q8_0(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    raw = gguf.quants.quantize(rng.normal(0, 0.05, (8, 64)).astype(np.float32), QT.Q8_0)
    blocks = raw.reshape(-1, 34)
    return blocks, per_element(f16_at(blocks, 0), 32, 32)  # Q8_0: d


def crafted_q4_k(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    blocks = random_blocks(QT.Q4_K, 8, rng)  # gguf-py has no Q4_K quantizer
    return blocks, per_element(f16_at(blocks, 0)[:, None] * scale_min_k4(blocks[:, 4:16]), 32, 256)


@pytest.mark.parametrize(
    ("qtype", "make"),
    [(QT.Q4_1, quantized_q4_1), (QT.Q8_0, quantized_q8_0), (QT.Q4_K, crafted_q4_k)],
    ids=["Q4_1", "Q8_0", "Q4_K"],
)
def test_dither_stays_within_half_a_step(
    qtype: QT, make: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
) -> None:
    blocks, expected_step = make(np.random.default_rng(3))
    step = dq.quant_step(blocks, qtype)
    np.testing.assert_allclose(step, expected_step, rtol=1e-5, atol=1e-6)
    values = gguf.quants.dequantize(blocks, qtype)
    noisy = dq.dithered_blocks(blocks, qtype, np.random.default_rng(0))
    ratio = (noisy - values)[step != 0] / step[step != 0]
    assert np.abs(ratio).max() <= 0.5 + 1e-4
    assert np.abs(ratio).max() > 0.4  # the noise spans the step, it is not a no-op
    assert abs(ratio.mean()) < 0.1


def test_dither_is_deterministic_per_seed() -> None:
    blocks, _ = quantized_q4_1(np.random.default_rng(1))
    run = lambda seed: dq.dithered_blocks(blocks, QT.Q4_1, np.random.default_rng(seed))  # noqa: E731
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_unsupported_type_is_named() -> None:
    with pytest.raises(ValueError, match="IQ4_NL"):
        dq.quant_step(np.zeros((1, 18), dtype=np.uint8), QT.IQ4_NL)


def write_tiny_source(path: Path) -> dict[str, np.ndarray]:
    """A small quantized GGUF: Q8_0 embedding, Q4_1 matrix, F32 norm, assorted metadata."""
    rng = np.random.default_rng(0)
    weights = {
        "token_embd.weight": (rng.normal(0, 0.05, (16, 64)).astype(np.float32), QT.Q8_0),
        "blk.0.attn_q.weight": (rng.normal(0, 0.05, (32, 64)).astype(np.float32), QT.Q4_1),
    }
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_file_type(3)  # LLAMA_FTYPE_MOSTLY_Q4_1
    writer.add_name("tiny")
    writer.add_context_length(128)
    writer.add_token_list(["<s>", "a", "b\u00e9"])
    writer.add_token_scores([0.0, -1.5, -2.5])
    writer.add_bool("tiny.flag", True)
    raw = {}
    for name, (w, qtype) in weights.items():
        raw[name] = gguf.quants.quantize(w, qtype)
        writer.add_tensor(name, raw[name], raw_dtype=qtype)
    norm = rng.normal(1, 0.1, 64).astype(np.float32)
    writer.add_tensor("output_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return raw


def test_dequantize_file_roundtrip(tmp_path: Path) -> None:
    src, out = tmp_path / "q.gguf", tmp_path / "f16.gguf"
    write_tiny_source(src)
    dq.dequantize_file(src, out)
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)
    assert b.get_field("general.file_type").contents() == 1
    for key in ("general.architecture", "general.name", "llama.context_length",
                "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tiny.flag"):
        assert b.get_field(key).contents() == a.get_field(key).contents(), key
    assert [t.name for t in b.tensors] == [t.name for t in a.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert tb.tensor_type == (QT.F32 if ta.name == "output_norm.weight" else QT.F16)
        assert tb.shape.tolist() == ta.shape.tolist()
        want = gguf.quants.dequantize(ta.data, ta.tensor_type)
        np.testing.assert_allclose(np.asarray(tb.data, dtype=np.float32), want, rtol=1e-3, atol=1e-6)


def test_dithered_file_is_reproducible_and_close(tmp_path: Path) -> None:
    src = tmp_path / "q.gguf"
    raw = write_tiny_source(src)
    paths = [tmp_path / f"d{i}.gguf" for i in range(3)]
    for path, seed in zip(paths, (0, 0, 1)):
        dq.dequantize_file(src, path, dither=True, seed=seed)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
    out = {t.name: t for t in gguf.GGUFReader(paths[0]).tensors}
    for name, data in raw.items():
        qtype = QT.Q8_0 if name == "token_embd.weight" else QT.Q4_1
        base = gguf.quants.dequantize(data, qtype)
        step = np.abs(dq.quant_step(data.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1]), qtype))
        diff = np.abs(np.asarray(out[name].data, dtype=np.float32) - base).reshape(step.shape)
        assert (diff <= 0.5 * step + 1e-3 * np.abs(base).reshape(step.shape) + 1e-6).all(), name
        assert diff.max() > 0.25 * step.max(), name
    assert np.array_equal(out["output_norm.weight"].data, gguf.GGUFReader(src).tensors[-1].data)


def test_dither_refuses_an_untabled_type_before_writing(tmp_path: Path) -> None:
    src, out = tmp_path / "iq.gguf", tmp_path / "out.gguf"
    writer = gguf.GGUFWriter(src, "llama")
    blocks = random_blocks(QT.Q4_0, 4, np.random.default_rng(0))  # IQ4_NL has the same d[2] qs[16]
    writer.add_tensor("blk.0.ffn_up.weight", blocks.reshape(2, 36), raw_dtype=QT.IQ4_NL)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' is IQ4_NL"):
        dq.dequantize_file(src, out, dither=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iq.gguf"]
    dq.dequantize_file(src, out)  # plain dequantization handles any type gguf-py can decode
    assert gguf.GGUFReader(out).tensors[0].tensor_type == QT.F16
