"""The importance matrix: llama-imatrix's per-column activation statistics, as one value.

An entry is what llama-imatrix accumulates for one weight (``blk.0.attn_q.weight``): ``sums``, the
per-column sum of squared input activations (one row of ``ncols`` per expert, flattened), and
``counts``, the number of activation rows that went into each expert's sums (one count for a dense
weight). ``Imatrix.values`` turns them into the per-column mean square llama-quantize consumes.
Collected by the engine, read and written by ``io/imatrix.py``, consumed by the scorers and the quantizer.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np


@dataclass(frozen=True)
class Imatrix:
    """Per-weight activation statistics, as llama-imatrix collects them.

    Attributes:
        sums: name -> float32 (n_mat * ncols,), per expert the per-column sum of squared activations.
        counts: name -> int64 (n_mat,), activation rows summed per expert (n_mat is 1 for dense weights).
        datasets: where the activations came from (file names or labels).
        chunk_count: chunks evaluated.
        chunk_size: tokens per chunk (0 when unknown, as for legacy ``.dat`` files).
    """

    sums: Mapping[str, np.ndarray]
    counts: Mapping[str, np.ndarray]
    datasets: tuple[str, ...] = ()
    chunk_count: int = 0
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if set(self.sums) != set(self.counts):
            odd = sorted(set(self.sums) ^ set(self.counts))[0]
            raise ValueError(f"{odd!r}: an imatrix entry needs both sums and counts")
        sums = {n: _frozen_array(self.sums[n], np.float32) for n in sorted(self.sums)}
        counts = {n: _frozen_array(self.counts[n], np.int64) for n in sums}
        for name, s in sums.items():
            _check_entry(name, s, counts[name])
        object.__setattr__(self, "sums", MappingProxyType(sums))
        object.__setattr__(self, "counts", MappingProxyType(counts))
        object.__setattr__(self, "datasets", tuple(str(d) for d in self.datasets))

    def __contains__(self, name: object) -> bool:
        return name in self.sums

    def __len__(self) -> int:
        return len(self.sums)

    @property
    def names(self) -> tuple[str, ...]:
        """Weight names, sorted."""
        return tuple(self.sums)

    def n_mat(self, name: str) -> int:
        """Number of matrices (experts) the entry ``name`` holds statistics for."""
        return int(self.counts[name].size)

    def ncols(self, name: str) -> int:
        """Row length of the weight ``name`` (its input dimension)."""
        return int(self.sums[name].size) // self.n_mat(name)

    def values(self, name: str) -> np.ndarray:
        """Per-column mean squared activation of ``name``, flat float32 (n_mat * ncols,).

        Mirrors llama-quantize's ``load_imatrix``: sums / count per expert, and 1.0 for the columns of
        an expert no activation reached (count 0).

        Raises:
            KeyError: no entry ``name``.
        """
        sums = self.sums[name].reshape(self.n_mat(name), -1)
        counts = self.counts[name].astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(counts > 0, sums / np.maximum(counts, 1), np.float32(1.0))
        return out.astype(np.float32).reshape(-1)


def _frozen_array(a: np.ndarray | Sequence[float], dtype: type) -> np.ndarray:
    arr = np.array(a, dtype=dtype).reshape(-1)
    arr.setflags(write=False)
    return arr


def _check_entry(name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if counts.size == 0 or sums.size == 0:
        raise ValueError(f"{name!r}: empty imatrix entry")
    if sums.size % counts.size:
        raise ValueError(f"{name!r}: {sums.size} sums do not split into {counts.size} experts")
    if (counts < 0).any():
        raise ValueError(f"{name!r}: negative activation count")
