from __future__ import annotations

import numpy as np

from ggufmix.engine.kernels import dequantize_rows, quantize_rows
from ggufmix.score.base import Kernels, TensorJob, scorers
from ggufmix.score.quant_error import typical_power
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
