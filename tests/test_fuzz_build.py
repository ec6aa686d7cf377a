"""Mutated GGUFs that ggufmix's reader accepts go through the whole ``ggufmix build`` in a child process, where
llama.cpp itself reads them: the build either succeeds or fails with one ``ggufmix: error:`` line, a known exit
code, nothing at the output path and no temporary file (scripts/fuzz.py --build runs thousands)."""
from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

from ggufmix.errors import GgufmixError
from ggufmix.io.gguf_index import read_index

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from fuzz import build_finding, mutate, probe  # noqa: E402

BUILDS = 24  # mutants that open, each one a build in a child process (~2 s)


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodel import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("fuzz-build") / "seed.gguf", n_layer=1, n_embd=64, n_ff=128,
                            n_head=2, n_head_kv=1, n_vocab=300, seed=4)


def test_builds_of_mutants_fail_cleanly(seed_file: Path, tmp_path: Path) -> None:
    data, index = seed_file.read_bytes(), read_index(seed_file)
    rng = random.Random(2024)
    mutant, out = tmp_path / "mutant.gguf", tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    findings: list[str] = []
    built = 0
    for _ in range(2000):
        mutant.write_bytes(mutate(data, index.tensors_offset, index.data_offset, rng))
        try:
            probe(mutant)
        except GgufmixError:
            continue
        built += 1
        if (finding := build_finding(mutant, out)) is not None:
            findings.append(finding)
        if built == BUILDS:
            break
    assert built == BUILDS
    assert not findings


def test_build_finding_sees_a_file_llama_cpp_cannot_load(seed_file: Path, tmp_path: Path) -> None:
    """The check itself: a tensor renamed so llama.cpp misses it quantizes, then fails the smoke load; the build
    must report that in one line and leave nothing at the output."""
    data = seed_file.read_bytes()
    pos = data.index(b"blk.0.attn_output.weight")
    bad = tmp_path / "renamed.gguf"
    bad.write_bytes(data[:pos] + b"blk.0.attn_outpXt.weight" + data[pos + 24:])
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    assert build_finding(bad, out) is None  # a clean failure ...
    r = subprocess.run([sys.executable, "-m", "ggufmix", "build", str(bad), "--budget", "6bpw", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 4  # ... and a failure: EngineError, before anything reached the output folder
    assert "renamed.gguf" in r.stderr and "'blk.0.attn_output.weight' not found" in r.stderr
    assert list(out.parent.iterdir()) == []


def test_duplicate_tensor_names_are_refused(seed_file: Path, tmp_path: Path) -> None:
    data = seed_file.read_bytes()
    pos = data.index(b"blk.0.attn_k.weight")
    bad = tmp_path / "dup.gguf"
    bad.write_bytes(data[:pos] + b"blk.0.attn_q.weight" + data[pos + 19:])
    with pytest.raises(GgufmixError, match="'blk.0.attn_q.weight' appears twice"):
        read_index(bad)


@pytest.mark.parametrize("name", [b"blk.0.attn_q.weigh\x00", b"x" * 64])
def test_names_llama_cpp_would_read_differently_are_refused(seed_file: Path, tmp_path: Path, name: bytes) -> None:
    import struct

    data = seed_file.read_bytes()
    old = b"blk.0.attn_q.weight"
    pos = data.index(struct.pack("<Q", len(old)) + old)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:pos] + struct.pack("<Q", len(name)) + name + data[pos + 8 + len(old):])
    with pytest.raises(GgufmixError, match="not a valid ggml name"):
        read_index(bad)
