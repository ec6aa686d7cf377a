"""Importance matrices: file formats (GGUF and legacy .dat), the ggml_tensor mirror, and collection
through llama.cpp's eval callback on tiny random models checked against numpy."""
from __future__ import annotations

import ctypes
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufmix.errors import EngineError, InputError
from ggufmix.imatrix import Imatrix
from ggufmix.io.imatrix import check_against, read_imatrix, write_imatrix_gguf

from tinymodel import RMS_EPS, read_tiny_weights, write_tiny_llama


def _sample_imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    return Imatrix(
        sums={"blk.0.attn_q.weight": rng.random(256, dtype=np.float32) * 100,
              "blk.0.ffn_down_exps.weight": rng.random(3 * 512, dtype=np.float32) * 10},
        counts={"blk.0.attn_q.weight": np.array([640]), "blk.0.ffn_down_exps.weight": np.array([5, 0, 7])},
        datasets=("c4.utf8",), chunk_count=5, chunk_size=128)


# --------------------------------------------------------------------------------------------- formats


def test_values_divide_per_expert_and_fill_unseen_experts_with_one() -> None:
    im = _sample_imatrix()
    v = im.values("blk.0.ffn_down_exps.weight").reshape(3, 512)
    sums = im.sums["blk.0.ffn_down_exps.weight"].reshape(3, 512)
    np.testing.assert_allclose(v[0], sums[0] / 5, rtol=1e-6)
    assert (v[1] == 1.0).all()  # llama-quantize's rule for an expert no token reached
    np.testing.assert_allclose(v[2], sums[2] / 7, rtol=1e-6)
    assert im.n_mat("blk.0.ffn_down_exps.weight") == 3 and im.ncols("blk.0.ffn_down_exps.weight") == 512
    assert v.dtype == np.float32


def test_imatrix_is_read_only_and_validated() -> None:
    im = _sample_imatrix()
    with pytest.raises(ValueError):
        im.sums["blk.0.attn_q.weight"][0] = 1.0
    with pytest.raises(ValueError, match="blk.0.x"):
        Imatrix(sums={"blk.0.x": np.ones(10)}, counts={"blk.0.x": np.ones(3)})
    with pytest.raises(ValueError, match="both"):
        Imatrix(sums={"a": np.ones(4)}, counts={})


def test_gguf_round_trip(tmp_path: Path) -> None:
    im = _sample_imatrix()
    path = write_imatrix_gguf(tmp_path / "im.gguf", im)
    back = read_imatrix(path)
    assert back.names == im.names
    for name in im.names:
        np.testing.assert_array_equal(back.sums[name], im.sums[name])
        np.testing.assert_array_equal(back.counts[name], im.counts[name])
    assert (back.datasets, back.chunk_count, back.chunk_size) == (("c4.utf8",), 5, 128)
    assert [p.name for p in tmp_path.iterdir()] == ["im.gguf"]  # the temp file is gone


def test_gguf_layout_matches_llama_imatrix(tmp_path: Path) -> None:
    """IMatrixCollector::save_imatrix: in_sum2 [ncols, n_mat], counts [1, n_mat], F32, keys present."""
    reader = gguf.GGUFReader(write_imatrix_gguf(tmp_path / "im.gguf", _sample_imatrix()))
    tensors = {t.name: t for t in reader.tensors}
    assert list(tensors["blk.0.ffn_down_exps.weight.in_sum2"].shape) == [512, 3]
    assert list(tensors["blk.0.ffn_down_exps.weight.counts"].shape) == [1, 3]
    assert list(tensors["blk.0.attn_q.weight.in_sum2"].shape) == [256, 1]
    assert {t.tensor_type for t in tensors.values()} == {gguf.GGMLQuantizationType.F32}
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.datasets"].contents() == ["c4.utf8"]
    assert reader.fields["imatrix.chunk_count"].contents() == 5


def _write_dat(path: Path, entries: list[tuple[str, int, np.ndarray]], trailer: tuple[int, str] | None) -> None:
    """IMatrixCollector::save_imatrix_legacy's layout, written by hand."""
    out = struct.pack("<i", len(entries))
    for name, ncall, values in entries:
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += values.astype("<f4").tobytes()
    if trailer is not None:
        out += struct.pack("<i", trailer[0]) + struct.pack("<i", len(trailer[1])) + trailer[1].encode()
    path.write_bytes(out)


def test_legacy_dat(tmp_path: Path) -> None:
    mean = np.linspace(0.5, 2.0, 256, dtype=np.float32)
    stale = np.full(64, 3.0, dtype=np.float32)
    _write_dat(tmp_path / "im.dat", [("blk.0.attn_q.weight", 10, mean * 10), ("blk.0.ffn_up.weight", 0, stale)],
               (12, "wiki.train.raw"))
    im = read_imatrix(tmp_path / "im.dat")
    np.testing.assert_allclose(im.values("blk.0.attn_q.weight"), mean, rtol=1e-6)
    np.testing.assert_array_equal(im.values("blk.0.ffn_up.weight"), stale)  # ncall 0: taken as stored
    assert (im.datasets, im.chunk_count, im.chunk_size) == (("wiki.train.raw",), 12, 0)
    # a .dat converts to a GGUF llama-quantize reads to the same values
    back = read_imatrix(write_imatrix_gguf(tmp_path / "im.gguf", im))
    np.testing.assert_allclose(back.values("blk.0.attn_q.weight"), mean, rtol=1e-6)


def test_legacy_dat_without_trailer(tmp_path: Path) -> None:
    _write_dat(tmp_path / "im.dat", [("blk.1.attn_k.weight", 4, np.full(32, 8.0, np.float32))], None)
    im = read_imatrix(tmp_path / "im.dat")
    assert im.chunk_count == 0 and im.datasets == ()
    np.testing.assert_array_equal(im.values("blk.1.attn_k.weight"), np.full(32, 2.0, np.float32))


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x00", b"\x02\x00\x00\x00\x05\x00\x00\x00blk", b"GGUF\x03junk"])
def test_malformed_files_name_the_file(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.imatrix"
    bad.write_bytes(content)
    with pytest.raises(InputError, match="bad.imatrix"):
        read_imatrix(bad)


def test_missing_file_and_unpaired_entry(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope.gguf"):
        read_imatrix(tmp_path / "nope.gguf")
    w = gguf.GGUFWriter(tmp_path / "half.gguf", arch="imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 256), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(InputError, match=r"half.gguf.*blk.0.attn_q.weight"):
        read_imatrix(tmp_path / "half.gguf")


def test_check_against_names_first_mismatch() -> None:
    im = _sample_imatrix()
    check_against(im, {"blk.0.attn_q.weight": 256, "blk.0.ffn_down_exps.weight": (512, 576, 3), "other": 7})
    with pytest.raises(InputError, match="blk.0.attn_q.weight"):
        check_against(im, {"blk.0.attn_q.weight": 576})
    with pytest.raises(InputError, match="ffn_down_exps"):
        check_against(im, {"blk.0.ffn_down_exps.weight": (512, 576, 4)})


def test_modules_stay_lean() -> None:
    code = ("import sys, ggufmix.io.imatrix, ggufmix.engine.activations; "
            "assert 'llama_cpp' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------- ggml mirror


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _ggml_for_tests() -> ctypes.CDLL:
    pytest.importorskip("llama_cpp")
    from ggufmix.engine.activations import _ggml

    lib = _ggml()
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for name, args in (("ggml_init", [_InitParams]), ("ggml_new_tensor_2d", [p, ctypes.c_int, i64, i64]),
                       ("ggml_new_tensor_3d", [p, ctypes.c_int, i64, i64, i64]), ("ggml_mul_mat", [p, p, p]),
                       ("ggml_mul_mat_id", [p, p, p, p]), ("ggml_view_2d", [p, p, i64, i64, ctypes.c_size_t,
                                                                          ctypes.c_size_t]),
                       ("ggml_set_name", [p, ctypes.c_char_p]), ("ggml_get_data", [p]), ("ggml_set_input", [p]),
                       ("ggml_free", [p])):
        getattr(lib, name).argtypes, getattr(lib, name).restype = args, p
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    return lib


def test_ggml_tensor_mirror_matches_libggml() -> None:
    """Tensors made by libggml itself, read through the ctypes mirror, field by field."""
    from ggufmix.engine.activations import (GGML_OP_MUL_MAT, GGML_OP_MUL_MAT_ID, GGML_TYPE_F16, GGML_TYPE_F32,
                                            GGML_TYPE_I32, GgmlTensor)

    lib = _ggml_for_tests()
    ctx = lib.ggml_init(_InitParams(1 << 20, None, False))
    try:
        w = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 256, 8)
        x = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 256, 16)
        lib.ggml_set_name(w, b"blk.0.attn_q.weight" + b"x" * 40)
        lib.ggml_set_input(x)
        mm = GgmlTensor.from_address(lib.ggml_mul_mat(ctx, w, x))
        W, X = GgmlTensor.from_address(w), GgmlTensor.from_address(x)
        assert (W.type, list(W.ne), list(W.nb)) == (GGML_TYPE_F16, [256, 8, 1, 1], [2, 512, 4096, 4096])
        assert W.name == b"blk.0.attn_q.weight" + b"x" * 40 and W.data == lib.ggml_get_data(w)
        assert X.flags == 1 and W.flags == 0  # GGML_TENSOR_FLAG_INPUT
        assert mm.op == GGML_OP_MUL_MAT and mm.src[0] == w and mm.src[1] == x and mm.src[2] is None
        assert list(mm.ne) == [8, 16, 1, 1] and mm.extra is None and lib.ggml_nbytes(x) == 256 * 16 * 4
        v = GgmlTensor.from_address(lib.ggml_view_2d(ctx, x, 128, 16, X.nb[1], 256))
        assert v.view_src == x and v.view_offs == 256 and v.data == X.data + 256 and v.op_params[0] == 256
        experts = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 256, 8, 4)
        x3 = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F32, 256, 2, 16)
        ids = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_I32, 2, 16)
        mid = GgmlTensor.from_address(lib.ggml_mul_mat_id(ctx, experts, x3, ids))
        assert mid.op == GGML_OP_MUL_MAT_ID and (mid.src[0], mid.src[1], mid.src[2]) == (experts, x3, ids)
        assert lib.ggml_tensor_overhead() == ctypes.sizeof(GgmlTensor) + 32  # + sizeof(struct ggml_object)
    finally:
        lib.ggml_free(ctx)


def test_unreadable_activations_are_refused_not_crashed() -> None:
    from ggufmix.engine.activations import GGML_OP_MUL_MAT, GgmlTensor, _Collector

    collector = _Collector(_ggml_for_tests(), weights=True, blocks=False, include_output=False)
    q = GgmlTensor(type=2, ne=(32, 16, 1, 1), nb=(18, 18, 288, 288))  # Q4_0 activations
    with pytest.raises(EngineError, match="Q4_0"):
        collector._read(ctypes.addressof(q), "blk.0.attn_q.weight")
    strided = GgmlTensor(type=0, ne=(32, 16, 1, 1), nb=(8, 256, 4096, 4096))
    with pytest.raises(EngineError, match="not contiguous"):
        collector._read(ctypes.addressof(strided), "blk.0.attn_q.weight")
    orphan = GgmlTensor(op=GGML_OP_MUL_MAT, name=b"Qcur-0")  # no sources: must not reach C as an exception
    assert collector(ctypes.addressof(orphan), False, None) is False
    assert isinstance(collector.error, EngineError)


# --------------------------------------------------------------------------------------------- collection


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _attn_norm_sumsq(weights: dict[str, np.ndarray], chunks: list[list[int]], layer: int = 0) -> np.ndarray:
    """Per-column sum over tokens of RMSNorm(embedding)^2 * attn_norm^2: blk.0's Q/K/V input."""
    h = weights["token_embd.weight"][np.concatenate(chunks)].astype(np.float64)
    normed = h / np.sqrt((h * h).mean(axis=1, keepdims=True) + RMS_EPS)
    normed *= weights[f"blk.{layer}.attn_norm.weight"]
    return (normed * normed).sum(axis=0)


def test_collect_imatrix_matches_numpy(tiny: Path, tmp_path: Path) -> None:
    from ggufmix.engine.activations import collect_imatrix

    rng = np.random.default_rng(1)
    tokens = rng.integers(3, 384, size=3 * 64 + 10).tolist()  # 3 chunks; the 10 left over are dropped
    im = collect_imatrix(tiny, tokens, n_ctx=64, progress=False, n_threads=2)

    chunks = [[1] + tokens[i * 64 + 1:(i + 1) * 64] for i in range(3)]  # BOS replaces each chunk's first
    expected = _attn_norm_sumsq(read_tiny_weights(tiny), chunks)
    for proj in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(im.sums[f"blk.0.{proj}.weight"], expected, rtol=2e-5)
        assert im.counts[f"blk.0.{proj}.weight"].tolist() == [192]
    np.testing.assert_allclose(im.values("blk.0.attn_q.weight"), expected / 192, rtol=2e-5)
    per_block = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    assert set(im.names) == {f"blk.{b}.{t}.weight" for b in range(2) for t in per_block}
    assert im.ncols("blk.1.ffn_down.weight") == 512 and (im.chunk_count, im.chunk_size) == (3, 64)
    back = read_imatrix(write_imatrix_gguf(tmp_path / "tiny.imatrix.gguf", im))
    np.testing.assert_array_equal(back.sums["blk.1.ffn_down.weight"], im.sums["blk.1.ffn_down.weight"])


def test_collect_from_text_and_limits(tiny: Path) -> None:
    from ggufmix.engine.activations import collect_imatrix

    text = "The quick brown fox jumps over the lazy dog, again and again. " * 40
    im = collect_imatrix(tiny, text, n_ctx=64, n_chunks=2, progress=False, dataset="fox.txt")
    assert im.counts["blk.1.attn_q.weight"].tolist() == [128] and im.datasets == ("fox.txt",)
    with pytest.raises(InputError, match="fewer than one chunk"):
        collect_imatrix(tiny, "too short", n_ctx=64, progress=False)
    with pytest.raises(InputError, match="vocabulary"):
        collect_imatrix(tiny, [5] * 63 + [10_000], n_ctx=64, progress=False)
    with pytest.raises(InputError, match="no such model"):
        collect_imatrix(tiny.with_name("missing.gguf"), text, progress=False)


def test_moe_statistics_are_per_expert(tmp_path: Path) -> None:
    """The router (dense) and the experts see the same input: the experts' sums add up to n_used times it."""
    from ggufmix.engine.activations import collect_imatrix

    model = write_tiny_llama(tmp_path / "moe.gguf", n_expert=4, n_expert_used=2, seed=3)
    tokens = np.random.default_rng(2).integers(3, 384, size=128).tolist()
    im = collect_imatrix(model, tokens, n_ctx=64, progress=False)
    router = im.sums["blk.0.ffn_gate_inp.weight"].astype(np.float64)
    for name in ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"):
        assert im.n_mat(name) == 4 and im.ncols(name) == 256
        assert im.counts[name].sum() == 2 * 128
        np.testing.assert_allclose(im.sums[name].reshape(4, 256).sum(axis=0), 2 * router, rtol=1e-4)
    assert im.n_mat("blk.1.ffn_down_exps.weight") == 4 and im.ncols("blk.1.ffn_down_exps.weight") == 512
    check_against(im, {"blk.0.ffn_down_exps.weight": (512, 256, 4)})


def test_block_io_distances(tiny: Path) -> None:
    from ggufmix.engine.activations import capture_block_io, collect_activations

    tokens = np.random.default_rng(4).integers(3, 384, size=128).tolist()
    dist = capture_block_io(tiny, tokens, n_ctx=64, progress=False)
    assert sorted(dist) == [0, 1] and all(0.0 < d < 2.0 for d in dist.values())
    both = collect_activations(tiny, tokens, n_ctx=64, progress=False)
    assert both.block_distance == pytest.approx(dist) and len(both.imatrix) == 14


def test_collected_imatrix_unlocks_iq2_quantization(tiny: Path, tmp_path: Path) -> None:
    """llama_model_quantize refuses IQ2_XXS without an imatrix and accepts ours."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggufmix.engine.activations import collect_imatrix

    im = read_imatrix(write_imatrix_gguf(tmp_path / "im.gguf", collect_imatrix(
        tiny, np.random.default_rng(5).integers(3, 384, size=128).tolist(), n_ctx=64, progress=False)))

    def quantize(entries: Imatrix | None) -> int:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = 19  # LLAMA_FTYPE_MOSTLY_IQ2_XXS
        keep = []
        if entries is not None:
            arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
            for i, name in enumerate(entries.names):
                values = np.ascontiguousarray(entries.values(name))
                keep.append(values)
                arr[i].name, arr[i].size = name.encode(), values.size
                arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            params.imatrix = arr
        out = tmp_path / "iq2.gguf"
        return llama_cpp.llama_model_quantize(str(tiny).encode(), str(out).encode(), ctypes.byref(params))

    assert quantize(None) != 0
    assert quantize(im) == 0
