"""Input second moments ``H = sum x x^T`` of chosen weights' matrix multiplications, through the eval callback.

GPTQ-style error feedback (realize/gptq.py) needs, for each weight, the full matrix of its inputs on the
calibration text, not only the diagonal an imatrix keeps. Weights that read the same graph node (attn_q,
attn_k and attn_v read the normed hidden state; ffn_gate and ffn_up too) share one matrix. A matrix is
``cols x cols`` float32, summed chunk by chunk (GPTQ keeps it in float32 too; Qwen2.5-1.5B's ffn_down:
8960 columns, 320 MB), so callers ask for as many blocks as memory holds. Every pass runs the whole model
over the text.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from ggufmix.engine.activations import (
    GGML_OP_MUL_MAT,
    EvalCallback,
    GgmlTensor,
    _bos,
    _chunks,
    _ggml,
    _session,
    _src,
    _tokens,
    _weight_name,
    decode_chunk,
    read_node,
)
from ggufmix.engine.llamalib import llama
from ggufmix.errors import InputError, UsageError


@dataclass
class Covariances:
    """What one pass measured: weight name -> the graph node it reads, node -> ``sum x x^T``, and the chunks
    of text it ran (fewer than asked where the text is short)."""

    input_of: dict[str, str]
    matrices: dict[str, np.ndarray]
    chunks: int

    def of(self, weight: str) -> np.ndarray:
        """The weight's input matrix; InputError when the pass never saw the weight multiply anything."""
        node = self.input_of.get(weight)
        if node is None:
            raise InputError(f"{weight!r}: no matrix multiplication read this weight on the calibration text")
        return self.matrices[node]


def collect_covariances(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int],
                        weights: Collection[str], *, n_ctx: int = 512, n_chunks: int | None = None,
                        n_threads: int | None = None) -> Covariances:
    """``sum x x^T`` of the inputs of ``weights`` over the chunks of the text (BOS first, as llama-imatrix).

    Raises:
        UsageError: n_ctx is over 512.
        InputError: the model file is missing or the text shorter than one chunk.
        EngineError: llama.cpp failed, or a weight's input could not be read.
    """
    collector = _Gram(_ggml(), frozenset(weights))
    chunks = _run_chunks(model_path, tokens_or_text, collector, n_ctx, n_chunks, n_threads)
    return Covariances(collector.input_of, collector.matrices, chunks)


def _run_chunks(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int], collector: EvalCallback,
                n_ctx: int, n_chunks: int | None, n_threads: int | None) -> int:
    """Decode the chunks of the text with ``collector`` as the eval callback, its ``chunk`` set to each chunk's
    index; the number of chunks run."""
    if not 1 <= n_ctx <= 512:  # one ubatch a chunk: a node is seen once per chunk
        raise UsageError(f"n_ctx {n_ctx}: matmul inputs are collected over chunks of 1..512 tokens")
    llama_cpp = llama()
    with _session(Path(model_path), n_ctx, n_threads, 0, collector) as (model, ctx):
        chunks = _chunks(_tokens(model, tokens_or_text), n_ctx, n_chunks, _bos(model))
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        try:
            for i, chunk in enumerate(chunks):
                collector.chunk = i
                decode_chunk(ctx, batch, chunk, collector)
        finally:
            llama_cpp.llama_batch_free(batch)
    return len(chunks)


class _Gram(EvalCallback):
    """For each wanted weight's MUL_MAT, add its input's ``x^T x`` once per chunk and graph node."""

    def __init__(self, lib: ctypes.CDLL, weights: frozenset[str]) -> None:
        self._lib, self._weights = lib, weights
        self.input_of: dict[str, str] = {}
        self.matrices: dict[str, np.ndarray] = {}
        self._done: set[tuple[int, str]] = set()
        self.chunk = 0

    def _wants(self, t: GgmlTensor) -> bool:
        return t.op == GGML_OP_MUL_MAT and _weight_name(_src(t, 0)) in self._weights

    def _take(self, t: GgmlTensor, addr: int) -> bool:
        weight, node = _weight_name(_src(t, 0)), _src(t, 1)
        key = node.name.decode(errors="replace")
        self.input_of[weight] = key
        if (self.chunk, key) in self._done:
            return True
        self._done.add((self.chunk, key))
        x = read_node(self._lib, t.src[1], weight).reshape(-1, int(node.ne[0]))
        if key not in self.matrices:
            self.matrices[key] = np.zeros((x.shape[1], x.shape[1]), np.float32)
        self.matrices[key] += x.T @ x
        return True


def collect_inputs(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int], weights: Sequence[str], *,
                   n_ctx: int = 512, n_chunks: int | None = None, n_threads: int | None = None,
                   every: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """The rows each weight's matrix multiplication reads over the chunks of the text, in one pass: weight ->
    float32 (tokens, cols); ``every[w]`` keeps every n-th token's row of ``w`` (the memory of wide inputs).

    Raises:
        UsageError: n_ctx is over 512.
        InputError: the model file is missing, the text shorter than one chunk, or no matmul read a weight.
        EngineError: llama.cpp failed.
    """
    collector = _Rows(_ggml(), frozenset(weights), dict(every or {}))
    _run_chunks(model_path, tokens_or_text, collector, n_ctx, n_chunks, n_threads)
    missing = sorted(set(weights) - set(collector.rows))
    if missing:
        raise InputError(f"{missing[0]!r}: no matrix multiplication read this weight on the calibration text")
    return {w: np.concatenate(collector.rows[w]) for w in weights}


class _Rows(EvalCallback):
    """The input rows of some weights' MUL_MATs, once per chunk each."""

    def __init__(self, lib: ctypes.CDLL, weights: frozenset[str], every: dict[str, int]) -> None:
        self._lib, self._weights, self._every = lib, weights, every
        self.rows: dict[str, list[np.ndarray]] = {}
        self._taken: set[tuple[str, int]] = set()
        self.chunk = 0

    def _wants(self, t: GgmlTensor) -> bool:
        return t.op == GGML_OP_MUL_MAT and _weight_name(_src(t, 0)) in self._weights

    def _take(self, t: GgmlTensor, addr: int) -> bool:
        name = _weight_name(_src(t, 0))
        if (name, self.chunk) not in self._taken:
            self._taken.add((name, self.chunk))
            x = read_node(self._lib, t.src[1], name).reshape(-1, int(_src(t, 1).ne[0]))
            self.rows.setdefault(name, []).append(np.array(x[::self._every.get(name, 1)], dtype=np.float32))
        return True
