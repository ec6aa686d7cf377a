"""Scores written down as they are measured, so an interrupted ``score``/``build`` resumes where it stopped.

Each finished tensor is appended as one JSON line to ``${GGUFMIX_CACHE}/score-journal/<key>.jsonl``,
where the key hashes the source's fingerprint and every setting that changes a score (strategy, rows,
the imatrix's fingerprint, ggufmix's version and a digest of ggufmix's own code). A re-run with the same
inputs reads the lines back and scores only the rest; a torn last line (killed mid-write) is ignored. The
journal is deleted once the whole model is scored. The code digest matters: a journal left by an
interrupted run of an earlier checkout (same version number, different pricing of a type) was once
resumed, and the finished scores mixed two ways of pricing the same types.

The fingerprint reads the file's size, its first and last MiB and one MiB every 256 MiB, not every
byte: hashing a 140 GB source would cost minutes for each run. A source edited in place without
changing those bytes would be missed; re-exported or re-downloaded files are not.

Beside the journals, ``${GGUFMIX_CACHE}/type-noise/<key>.json`` keeps the pure strategies' type prices
(``PriceCache``), keyed by llama-cpp-python's version and the same code digest, and
``${GGUFMIX_CACHE}/block-stats/<key>.json`` the activation diagnostics of lim and lieq (``BlockStatsCache``),
keyed by the model's fingerprint, the calibration text and chunks, and the same code digest.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, TextIO

from ggufmix import __version__
from ggufmix.artifacts import cache_root, write_text_atomic
from ggufmix.scores import TensorScores
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

_MIB = 1 << 20
_STRIDE = 256 * _MIB


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of every module and data file of the installed ggufmix package (~0.5 MB, a few ms)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def keyed_path(folder: str, key: dict[str, Any], root: Path | None = None, suffix: str = ".json",
               code: bool = True) -> Path:
    """``${GGUFMIX_CACHE}/<folder>/<hash of key, ggufmix's version and code digest><suffix>`` (or under ``root``).

    ``code=False``: the key carries its own digest of the code it depends on (the KLD oracle's measurements
    take hours and do not change when the planner does).
    """
    extra = {"ggufmix": __version__, "code": code_digest()} if code else {}
    digest = hashlib.sha256(json.dumps({**key, **extra}, sort_keys=True).encode()).hexdigest()
    return (root or cache_root() / folder) / f"{digest[:32]}{suffix}"


def fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's size and sampled MiB blocks (see the module docstring)."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with p.open("rb") as f:
        for offset in [*range(0, size, _STRIDE), max(size - _MIB, 0)]:
            f.seek(offset)
            h.update(f.read(_MIB))
    return h.hexdigest()


class Journal:
    """Append-only record of finished tensors for one (source, settings) key."""

    def __init__(self, key: dict[str, Any], root: Path | None = None, folder: str = "score-journal",
                 code: bool = True) -> None:
        self.path = keyed_path(folder, key, root, ".jsonl", code)
        self._out: TextIO | None = None

    def load(self) -> dict[str, TensorScores]:
        """Tensors already scored (empty when there is no journal)."""
        done: dict[str, TensorScores] = {}
        if not self.path.exists():
            return done
        for line in self.path.read_text().splitlines():
            try:
                d = json.loads(line)
                done[d["name"]] = TensorScores({QuantType[k]: float(v) for k, v in d["errors"].items()},
                                               float(d["importance"]), dict(d["stats"]))
            except (ValueError, KeyError, TypeError):
                logger.info("%s: ignoring a torn line", self.path)
        if done:
            logger.info("resuming: %d tensors already scored (%s)", len(done), self.path)
        return done

    def add(self, name: str, ts: TensorScores) -> None:
        """Append one finished tensor; the line is on disk (flushed) when this returns."""
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self.path.open("a")
        self._out.write(json.dumps({"name": name, "errors": {t.name: v for t, v in ts.errors.items()},
                                    "importance": ts.importance, "stats": ts.stats}) + "\n")
        self._out.flush()

    def finish(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


class PriceCache:
    """The pure strategies' type prices (noise of each type on the seeded Gaussian reference of each width),
    kept across runs: they depend only on llama.cpp and ggufmix's code, and pricing the IQ2 types the first
    time in a process costs up to ~8 s of llama.cpp's grid set-up, far more than FastEWQ's whole decision."""

    def __init__(self, llama_cpp: str, root: Path | None = None) -> None:
        self.path = keyed_path("type-noise", {"llama-cpp-python": llama_cpp}, root)

    def load(self) -> dict[tuple[QuantType, int], float]:
        """The prices saved by an earlier run (empty when there are none or the file is damaged)."""
        try:
            doc = json.loads(self.path.read_text())
            return {(QuantType[t], int(n)): float(v) for t, n, v in doc}
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError):
            logger.info("%s: ignoring a damaged price cache", self.path)
            return {}

    def save(self, table: dict[tuple[QuantType, int], float]) -> None:
        if not table or table == self.load():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(sorted([t.name, n, v] for (t, n), v in table.items())) + "\n")


class BlockStatsCache:
    """The activation diagnostics of one model on one calibration text, kept across runs: LieQ's block
    removal costs one llama.cpp pass per block (13 minutes on Qwen2.5-Coder-1.5B here), and the pure
    strategy, its hybrid and every imatrix mode measure the same numbers."""

    def __init__(self, key: dict[str, Any], root: Path | None = None) -> None:
        self.path = keyed_path("block-stats", key, root)

    def load(self) -> dict[str, dict[int, float]] | None:
        """``{"distance": {block: value}, "erank": ..., "ppl_drop": ...}``, or None when not kept (or damaged)."""
        try:
            doc = json.loads(self.path.read_text())
            return {part: {int(b): float(v) for b, v in values.items()} for part, values in doc.items()}
        except FileNotFoundError:
            return None
        except (ValueError, AttributeError, TypeError):
            logger.info("%s: ignoring damaged block statistics", self.path)
            return None

    def save(self, parts: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps({k: {str(b): v for b, v in d.items()} for k, d in parts.items()}) + "\n")
