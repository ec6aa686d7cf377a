"""An interrupted scoring run resumes from its journal and gives the same scores as an uninterrupted one."""
from __future__ import annotations

from pathlib import Path

import pytest

from ggufmix.score.measure import ScoreOptions, open_source, score_source
from ggufmix.score import base
from ggufmix.score.journal import Journal, fingerprint


def test_interrupted_scoring_resumes(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUFMIX_CACHE", str(tmp_path / "cache"))
    src = open_source(tiny_model, False)
    opts = ScoreOptions(max_rows=32, threads=1)
    clean = score_source(src, opts, None, progress=False)
    assert not list((tmp_path / "cache" / "score-journal").glob("*.jsonl"))  # finished: journal removed

    spec = base.scorers()["measured"]
    calls: list[str] = []

    def interrupted(job):  # noqa: ANN001, ANN202
        calls.append(job.name)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return spec.fn(job)

    monkeypatch.setitem(base.SCORERS, "measured", base.ScorerSpec("measured", interrupted, True, "", True))
    with pytest.raises(KeyboardInterrupt):
        score_source(src, opts, None, progress=False)
    journals = list((tmp_path / "cache" / "score-journal").glob("*.jsonl"))
    assert len(journals) == 1 and len(journals[0].read_text().splitlines()) == 5
    with journals[0].open("a") as f:
        f.write('{"name": "torn')  # killed mid-write

    calls.clear()
    monkeypatch.setitem(base.SCORERS, "measured", base.ScorerSpec("measured", lambda j: (calls.append(j.name),
                                                                                       spec.fn(j))[1], True, "", True))
    resumed = score_source(src, opts, None, progress=False)
    assert len(calls) == len(clean.tensors) - 5
    assert resumed.tensors == clean.tensors


def test_journal_key_follows_source_and_settings(tiny_model: Path, odd_model: Path, tmp_path: Path) -> None:
    key = {"source": fingerprint(tiny_model), "strategy": "measured", "rows": 32}
    assert Journal(key, tmp_path).path == Journal(dict(key), tmp_path).path
    assert Journal({**key, "rows": 64}, tmp_path).path != Journal(key, tmp_path).path
    assert fingerprint(odd_model) != key["source"]


def test_journal_of_other_code_is_not_resumed(tiny_model: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # an interrupted run of an earlier checkout (same version number) must not lend its lines to this one
    from ggufmix.score import journal

    key = {"source": fingerprint(tiny_model), "strategy": "ewq", "rows": 32}
    here = Journal(key, tmp_path).path
    assert journal.code_digest() == journal.code_digest() and len(journal.code_digest()) == 64
    monkeypatch.setattr(journal, "code_digest", lambda: "0" * 64)
    assert Journal(key, tmp_path).path != here


def test_non_finite_weights_are_refused_by_name(tmp_path: Path) -> None:
    import numpy as np
    from tinymodel import write_tiny_llama

    from ggufmix.errors import InputError
    from ggufmix.io.gguf_source import open_gguf

    path = write_tiny_llama(tmp_path / "nan.gguf", n_layer=1, seed=3)
    src = open_gguf(path)
    info = src.tensors["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    data[src.offsets[info.name]:src.offsets[info.name] + 2] = np.float16(np.nan).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"'blk.0.ffn_up.weight' has NaN or infinite weights \(row 0\)"):
        score_source(open_source(path, False), ScoreOptions(max_rows=8), None, progress=False)
