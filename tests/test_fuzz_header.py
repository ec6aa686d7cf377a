"""Mutated GGUF headers: ggufmix either opens the file or raises a GgufmixError, nothing else."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ggufmix.errors import GgufmixError
from ggufmix.io.gguf_index import read_index

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from fuzz import mutate, probe  # noqa: E402


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodel import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("fuzz") / "f.gguf", n_layer=1, n_embd=64, n_ff=128, n_head=2,
                            n_head_kv=1, n_vocab=300, seed=4)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_mutants_only_raise_ggufmix_errors(seed_file: Path, tmp_path: Path, seed: int) -> None:
    index = read_index(seed_file)
    path = tmp_path / "mutant.gguf"
    path.write_bytes(mutate(seed_file.read_bytes(), index.tensors_offset, index.data_offset, random.Random(seed)))
    try:
        probe(path)
    except GgufmixError as e:
        assert "mutant.gguf" in str(e)
