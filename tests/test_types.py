from __future__ import annotations

import pytest

from ggufmix.engine.kernels import ggml_row_size
from ggufmix.errors import UsageError
from ggufmix.types import (
    DEFAULT_TYPES,
    QuantType,
    bits_per_weight,
    block_size,
    parse_type,
    row_bytes,
)


@pytest.mark.parametrize("qtype", [*DEFAULT_TYPES, QuantType.F16, QuantType.BF16, QuantType.F32])
@pytest.mark.parametrize("ncols", [256, 576, 1536, 4096])
def test_row_bytes_match_ggml(qtype: QuantType, ncols: int) -> None:
    if ncols % block_size(qtype):
        pytest.skip("rows do not fit this type's block")
    assert row_bytes(qtype, ncols) == ggml_row_size(qtype, ncols)


def test_q2_0_is_known_and_sized_like_ggml() -> None:
    assert QuantType(42) is QuantType.Q2_0
    assert bits_per_weight(QuantType.Q2_0) == 2.25
    assert row_bytes(QuantType.Q2_0, 576) == ggml_row_size(QuantType.Q2_0, 576)


def test_parse_type() -> None:
    assert parse_type("q4_k") is QuantType.Q4_K
    with pytest.raises(UsageError, match="Q5_KM"):
        parse_type("Q5_KM")


def test_default_types_sorted_by_bits() -> None:
    bits = [bits_per_weight(t) for t in DEFAULT_TYPES]
    assert bits == sorted(bits)
    assert QuantType.Q8_0 in DEFAULT_TYPES and QuantType.F16 not in DEFAULT_TYPES
