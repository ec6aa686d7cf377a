from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from ggufmix.errors import InputError
from ggufmix.io.gguf_index import ArraySummary, read_index
from ggufmix.io.gguf_source import open_gguf


def test_index_matches_gguf_reader(odd_model: Path) -> None:
    ref = gguf.GGUFReader(odd_model, "r")
    ours = open_gguf(odd_model)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(x) for x in t.shape) and int(info.qtype) == int(t.tensor_type)
        assert ours.offsets[t.name] == t.data_offset
        np.testing.assert_array_equal(ours.rows(t.name), np.asarray(t.data, np.float32).reshape(info.nrows, -1))
    index = read_index(odd_model)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = index.metadata[key]
        if isinstance(value, ArraySummary):
            assert value.length == len(field.data)
        else:
            assert value == field.contents(), key


def test_every_truncation_is_an_input_error(odd_model: Path, tmp_path: Path) -> None:
    data = odd_model.read_bytes()
    header_end = read_index(odd_model).data_offset
    cut = tmp_path / "cut.gguf"
    cuts = sorted({*range(0, 64), *np.linspace(64, header_end, 200).astype(int).tolist(), header_end + 100,
                   len(data) - 1})
    for n in cuts:
        cut.write_bytes(data[:n])
        with pytest.raises(InputError, match="cut.gguf"):
            open_gguf(cut)


def test_tensor_beyond_the_file_and_bad_version(odd_model: Path, tmp_path: Path) -> None:
    data = bytearray(odd_model.read_bytes())
    bad = tmp_path / "v9.gguf"
    bad.write_bytes(bytes(data[:4]) + (9).to_bytes(4, "little") + bytes(data[8:]))
    with pytest.raises(InputError, match="version 9"):
        open_gguf(bad)
    big = tmp_path / "big.gguf"
    big.write_bytes(bytes(data[:4]) + (3).to_bytes(4, "big") + bytes(data[8:]))
    with pytest.raises(InputError, match="big-endian"):
        open_gguf(big)
    short = tmp_path / "short.gguf"
    short.write_bytes(bytes(data[:-4096]))
    with pytest.raises(InputError, match="is it truncated"):
        open_gguf(short)
