"""Scoring streams tensor by tensor: peak RSS does not grow with the model (measured, not assumed)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from bench_memory import measure  # noqa: E402


def test_peak_rss_is_flat_in_model_size(tmp_path: Path) -> None:
    small = measure(2, 1024, 2816, 16, tmp_path)
    big = measure(10, 1024, 2816, 16, tmp_path)
    assert big[0] > 3.5 * small[0] and big[2] == small[2]  # 4x the model, the same largest tensor
    growth = big[3] - small[3]
    assert growth < 3 * big[2] + 16, (small, big)  # MB: a few largest tensors at most, not the ~150 MB added
