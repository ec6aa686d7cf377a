from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufmix.engine.kernels import dequantize_rows, f16_to_f32, quantize_rows
from ggufmix.io.gguf_source import GGUFSource, open_gguf
from ggufmix.layout.slots import build_layout
from ggufmix.score import layerwise, quant_error, stats
from ggufmix.score.base import Kernels, TensorJob, scorers
from ggufmix.score.quant_error import typical_power, window_starts
from ggufmix.score.stream import _job
from ggufmix.types import DEFAULT_TYPES, QuantType

RNG = np.random.default_rng(3)
ROWS = RNG.standard_normal((64, 512)).astype(np.float32)
TYPES = (QuantType.Q2_K, QuantType.Q4_K, QuantType.Q6_K)


def _measure(imatrix: np.ndarray | None) -> dict[QuantType, float]:
    job = TensorJob("blk.0.ffn_down.weight", "ffn_down", 0, (512, 64), TYPES, ROWS, np.zeros(64, np.int64),
                    None if imatrix is None else imatrix[None, :], Kernels(quantize_rows, dequantize_rows))
    return scorers()["measured"].fn(job).errors


def test_typical_power_ignores_the_top_percent() -> None:
    a = np.ones((1, 1000))
    a[0, :10] = 1e6
    assert typical_power(a)[0, 0] == 1.0
    assert typical_power(np.full((2, 300), 4.0)).tolist() == [[4.0], [4.0]]


def test_measured_error_is_scale_free_and_ordered() -> None:
    a = RNG.uniform(0.5, 2.0, 512).astype(np.float32)
    e1, e2 = _measure(a), _measure(a * 1000)
    for t in TYPES:
        assert abs(e1[t] - e2[t]) <= 1e-4 * e1[t]  # the quantizer itself rounds a scaled imatrix differently
    assert e1[QuantType.Q2_K] > e1[QuantType.Q4_K] > e1[QuantType.Q6_K] > 0


def test_one_outlier_column_does_not_make_a_tensor_look_lossless() -> None:
    """A column with 90% of the activation power (SmolLM2's blk.11.ffn_down) leaves the other columns' error
    as large as without it; normalising by the outlier-dominated output power hid it ~1000x."""
    a = np.ones(512, np.float32)
    a[7] = 0.9 / 0.1 * 511  # 90% of the total
    plain, outlier = _measure(None), _measure(a)
    for t in TYPES:
        assert outlier[t] > 0.5 * plain[t], (t, outlier[t], plain[t])


# --- measuring wide rows on rotating windows of whole blocks ------------------------------------------------

WINDOW_TYPES = (QuantType.Q4_0, QuantType.Q5_1, QuantType.Q2_0, QuantType.Q2_K, QuantType.Q3_K, QuantType.Q4_K,
                QuantType.Q6_K, QuantType.IQ4_XS, QuantType.IQ4_NL, QuantType.Q8_0)


def test_a_window_of_whole_blocks_quantizes_to_the_bits_of_the_whole_row() -> None:
    # (not the legacy 32-block types with an imatrix: they weight by the whole row's mean square, and are
    # measured on whole rows; the next test fails if that stops being so)
    rng = np.random.default_rng(3)
    rows = (rng.standard_t(4, (6, 1024)) * rng.uniform(0.01, 1.0, (6, 1))).astype(np.float32)
    imatrix = rng.lognormal(0.0, 1.5, 1024).astype(np.float32)
    for qtype in WINDOW_TYPES:
        for imat in (None,) if qtype in quant_error.ROW_STAT_TYPES else (None, imatrix):
            whole = dequantize_rows(quantize_rows(rows, qtype, imat), qtype, 1024)
            part = dequantize_rows(quantize_rows(rows[:, 256:768], qtype, None if imat is None else imat[256:768]),
                                   qtype, 512)
            assert np.array_equal(part, whole[:, 256:768]), qtype.name


def test_legacy_types_with_an_imatrix_need_the_whole_row() -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_t(4, (6, 1024)).astype(np.float32)
    imatrix = rng.lognormal(0.0, 1.5, 1024).astype(np.float32)
    for qtype in quant_error.ROW_STAT_TYPES:
        whole = dequantize_rows(quantize_rows(rows, qtype, imatrix), qtype, 1024)
        part = dequantize_rows(quantize_rows(rows[:, 256:768], qtype, imatrix[256:768]), qtype, 512)
        assert not np.array_equal(part, whole[:, 256:768]), qtype.name


def test_window_starts_tile_the_row_in_whole_blocks() -> None:
    starts, width = window_starts((128, 8960), (QuantType.Q4_0, QuantType.Q4_K), 128 * 512)
    assert width == 512 and starts[0] == 0 and starts[1] == 512 and np.all(starts % 256 == 0)
    assert np.all(starts + width <= 8960) and starts[17] == 8960 - 512 and starts[18] == 256
    covered = np.zeros(8960, bool)
    for c in starts[:18]:
        covered[c:c + width] = True
    assert covered.all()
    assert window_starts((128, 576), (QuantType.Q4_0,), 128 * 512) is None    # under 2x less: whole rows
    assert window_starts((128, 1024), (QuantType.Q4_K,), 128 * 1024) is None  # fits: whole rows


def test_windowed_estimate_stays_within_eight_percent_of_whole_rows(monkeypatch) -> None:  # noqa: ANN001
    # Tolerance of the windowed estimate: 128 rows of 4096 (8x fewer values quantized per type), heavy-tailed
    # weights with uneven row scales and an uneven imatrix; every type's error within 8% of whole rows (3% here;
    # 5.4% at worst over three seeds, with and without an imatrix).
    rng = np.random.default_rng(11)
    rows = (rng.standard_t(5, (128, 4096)) * rng.lognormal(0.0, 0.5, (128, 1))).astype(np.float32)
    imatrix = rng.lognormal(0.0, 1.0, 4096).astype(np.float32)[None, :]
    job = TensorJob("blk.0.ffn_down.weight", "ffn_down", 0, (4096, 4096), WINDOW_TYPES, rows, np.zeros(128, np.int64),
                    imatrix, Kernels(quantize_rows, dequantize_rows))
    windowed = scorers()["measured"].fn(job).errors
    monkeypatch.setattr(quant_error, "WINDOW_VALUES", 1 << 40)
    whole = scorers()["measured"].fn(job).errors
    assert windowed != whole
    for qtype in WINDOW_TYPES:
        assert abs(windowed[qtype] / whole[qtype] - 1) < 0.08, (qtype.name, windowed[qtype], whole[qtype])


# -- ewq and zd read every weight: the same scores as before they read F16 in pieces (issue 15) -----------

def _reference_entropy(chunks: Iterable[np.ndarray]) -> dict[str, float]:
    """ewq's per-tensor statistics as computed before pieces and F16 reads (f56aa74, score/stats.py), kept
    as the reference the new code must match to the last bit."""
    m, s0, s1, n = -math.inf, 0.0, 0.0, 0
    for chunk in chunks:
        x = np.asarray(chunk).astype(np.float32, copy=False).ravel()
        top = max(m, float(x.max()))
        scale = math.exp(m - top) if n else 0.0
        e = np.exp(x - x.dtype.type(top))
        s0 = s0 * scale + float(e.sum(dtype=np.float64))
        s1 = s1 * scale + float(np.multiply(e, x).sum(dtype=np.float64))
        m, n = top, n + x.size
    h = m + math.log(s0) - s1 / s0
    return {"entropy": h, "entropy_excess": math.log(n) - h, "n": float(n)}


def _reference_zd(chunks: Callable[[], Iterable[np.ndarray]]) -> dict[str, float]:
    """zd's per-tensor statistics before issue 15, likewise: two passes of float32 chunks."""
    n, s1, s2 = 0, 0.0, 0.0
    for chunk in chunks():
        x = np.asarray(chunk).astype(np.float32, copy=False).ravel()
        n, s1, s2 = n + x.size, s1 + float(x.sum(dtype=np.float64)), s2 + float(np.multiply(x, x).sum(dtype=np.float64))
    mean = s1 / n
    std = math.sqrt(max(s2 / n - mean ** 2, 0.0))
    above = 0 if std == 0.0 else sum(int(np.count_nonzero(np.ravel(c) > mean + std)) for c in chunks())
    return {"z_share": above / n, "n": float(n)}


def _reference_chunks(src: GGUFSource, name: str, chunk_values: int) -> Iterator[np.ndarray]:
    info = src.tensors[name]
    step = max(1, chunk_values // info.ncols)
    for start in range(0, info.nrows, step):
        yield src.rows(name, np.arange(start, min(info.nrows, start + step)))


def _wide_model(path: Path, dtype: str) -> Path:
    """A few tensors whose magnitudes span ~6 decades (N(0,1) x e^(1.5 N(0,1)) / 20), stored as ``dtype``:
    float64 sums of such weights depend on their order (those of plain Gaussian ones are often exact), so a
    piece boundary off numpy's 8192-value buffers changes the last bits and this test fails."""
    rng = np.random.default_rng(7)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    for name, shape in (("token_embd.weight", (300, 320)), ("blk.0.ffn_down.weight", (256, 1024)),
                        ("blk.0.attn_q.weight", (320, 320))):
        x = (rng.standard_normal(shape) * np.exp(1.5 * rng.standard_normal(shape)) / 20).astype(np.float32)
        if dtype == "bf16":
            w.add_tensor(name, (x.view(np.uint32) >> 16).astype(np.uint16), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, x.astype(np.float16 if dtype == "f16" else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize(("chunk", "piece"), [(layerwise.CHUNK_VALUES, stats.PIECE), (50_000, 8192),
                                              (1 << 16, 16384)])
def test_whole_tensor_stats_are_the_old_ones_to_the_bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        dtype: str, chunk: int, piece: int) -> None:
    """Every tensor's entropy, excess and z-share equal the pre-issue-15 code's exactly: F16 through the
    engine's converter and through numpy, BF16 and F32 through float32 rows; in one chunk, and in chunks of
    many pieces with a short last one (50,000 values of 320-wide rows: 6 pieces of 8192 and one of 768), and
    with two threads scoring at once."""
    monkeypatch.setattr(layerwise, "CHUNK_VALUES", chunk)
    monkeypatch.setattr(stats, "PIECE", piece)
    src = open_gguf(_wide_model(tmp_path / f"wide.{dtype}.gguf", dtype))
    slots = [s for s in build_layout(src.arch, src.tensors.values(), DEFAULT_TYPES).slots if s.quantized]
    assert len(slots) == 3
    ref = {s.name: (_reference_entropy(_reference_chunks(src, s.name, chunk)),
                    _reference_zd(lambda n=s.name: _reference_chunks(src, n, chunk))) for s in slots}
    for convert in (f16_to_f32, None):
        k = Kernels(quantize_rows, dequantize_rows, convert)
        jobs = [_job(src, s, k, None, 16, False) for s in slots]
        assert all((j.read_f16 is not None) == (dtype == "f16") for j in jobs)
        with ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda j: (layerwise.entropy_stats(j), layerwise.zd_stats(j)), jobs))
        assert {s.name: g for s, g in zip(slots, got)} == ref, convert


@pytest.mark.parametrize("strategy", ["ewq", "zd"])
def test_forked_workers_score_like_one_thread(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              strategy: str) -> None:
    """With 2 workers ewq and zd run in forked processes, the tensors sent in batches (here of ~2 tensors):
    the same scores to the bit as one thread."""
    from ggufmix.score import stream
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stream, "BATCH_VALUES", 200_000)
    forked: list[int] = []
    real_map = stream.ForkRunner.map
    monkeypatch.setattr(stream.ForkRunner, "map", lambda self, tasks: (forked.append(1), real_map(self, tasks))[1])
    src = open_source(tiny_model, False)
    one = score_source(src, ScoreOptions(strategy, threads=1), None, progress=False)
    two = score_source(src, ScoreOptions(strategy, threads=2), None, progress=False)
    assert forked == ([1] if stream.can_fork() else [])
    assert two.tensors == one.tensors


def test_an_error_in_a_forked_worker_is_the_same_error(tiny_model: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ggufmix.errors import InputError
    from ggufmix.score import base
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    def damaged(job: TensorJob) -> None:
        raise InputError(f"{job.name!r} is damaged")

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(base.SCORERS, "ewq", base.ScorerSpec("ewq", damaged, False, "", False, gil_bound=True))
    with pytest.raises(InputError, match="is damaged"):
        score_source(open_source(tiny_model, False), ScoreOptions("ewq", threads=2), None, progress=False)


def test_forked_workers_price_no_types(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent prices every type the tasks need before it forks: a worker pricing an IQ type would run
    ggml's OpenMP set-up, which waits forever in a child of a process whose OpenMP threads exist."""
    import os

    from ggufmix.score import quant_error, stream
    from ggufmix.score.measure import ScoreOptions, open_source, score_source

    parent, real = os.getpid(), quant_error.price

    def price(kernels: Kernels, qtype: QuantType, ncols: int) -> float:
        assert os.getpid() == parent or (qtype, ncols) in quant_error.known_noise(), "a forked worker priced a type"
        return real(kernels, qtype, ncols)

    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(quant_error, "price", price)
    monkeypatch.setattr(quant_error, "_noise", {})
    monkeypatch.setattr(stream, "BATCH_VALUES", 200_000)
    scores = score_source(open_source(tiny_model, False), ScoreOptions("zd", threads=2), None, progress=False)
    assert len(scores.tensors) > 10 and quant_error.known_noise()
