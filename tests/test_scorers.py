from __future__ import annotations

import numpy as np

from ggufmix.engine.kernels import dequantize_rows, quantize_rows
from ggufmix.score.base import Kernels, TensorJob, scorers
from ggufmix.score import quant_error
from ggufmix.score.quant_error import typical_power, window_starts
from ggufmix.types import QuantType

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
