"""Activation capture through llama.cpp's eval callback: importance matrices and block distances.

llama.cpp's scheduler calls ``cb_eval(tensor, ask, user_data)`` for every graph node: with
``ask=True`` to learn whether we want the node, then, for the nodes we want, with ``ask=False`` once
the node is computed. We want the matrix multiplications whose ``src[0]`` is a model weight and read
their ``src[1]`` (the input activations) to accumulate llama-imatrix's statistic, and optionally the
block outputs ``l_out-N`` to measure how much each block changes the hidden state.

The ``struct ggml_tensor`` mirror and the op ids are checked against libggml at first use and in
the tests. Chunking and the statistic mirror ``tools/imatrix/imatrix.cpp`` of llama.cpp 0.3.36.
"""
from __future__ import annotations

import collections
import ctypes
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.engine import kernels
from ggufmix.engine.isolated import check_loads
from ggufmix.engine.llamalib import last_error, llama, loaded_once
from ggufmix.errors import EngineError, GgufmixError, InputError, UsageError
from ggufmix.imatrix import Imatrix
from ggufmix.numerics import effective_rank

logger = logging.getLogger(__name__)

# ggml/include/ggml.h
GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64
GGML_MAX_OP_PARAMS = 64
GGML_OP_MUL_MAT = 29
GGML_OP_MUL_MAT_ID = 30
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I32 = 26
_NP_TYPES: dict[int, Any] = {GGML_TYPE_F32: np.float32, GGML_TYPE_F16: np.float16, GGML_TYPE_I32: np.int32}
# The token embeddings entering block 0: "embd" in llama.cpp 0.3.36 (build_inp_embd), "inp_embd" before.
_EMBD_NAMES = (b"embd", b"inp_embd")
# Block outputs kept for the effective rank (LieQ's compactness): 32 evenly spaced tokens of each chunk,
# at most 512 per block (the rank of a 512-row sample of a 576..1536-wide state is what is compared).
ERANK_ROWS, ERANK_ROWS_PER_CHUNK = 512, 32
MIN_ROWS = 16  # imatrix.cpp ignores matmuls over fewer tokens (warm-up and single-token passes)


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ggml.h (336 bytes on 64-bit); pointers kept as addresses."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass(frozen=True)
class Activations:
    """What one pass over the calibration text measured.

    Attributes:
        imatrix: per-weight input statistics (empty when not collected).
        block_distance: block index -> mean over tokens of 1 - cos(block input, block output).
        block_erank: block index -> effective rank of the block's outputs (a sample of tokens).
    """

    imatrix: Imatrix
    block_distance: dict[int, float]
    block_erank: dict[int, float]


def collect_imatrix(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int], *, n_ctx: int = 512,
                    n_chunks: int | None = None, n_threads: int | None = None, progress: bool = True,
                    include_output: bool = False, n_gpu_layers: int = 0, dataset: str | None = None) -> Imatrix:
    """Compute an importance matrix the way llama-imatrix does.

    Args:
        model_path: a GGUF llama.cpp can load.
        tokens_or_text: calibration text (tokenized with the model's tokenizer, BOS added as the
            vocabulary asks) or token ids.
        n_ctx: tokens per chunk; each chunk is one batch with a fresh KV cache and BOS first.
        n_chunks: chunks to evaluate; all that the text fills when None.
        n_threads: CPU threads; all cores when None.
        progress: show a progress bar.
        include_output: also collect ``output.weight`` (llama-imatrix's ``--process-output``).
        n_gpu_layers: layers to offload (activations are copied back with ggml_backend_tensor_get).
        dataset: name recorded in ``imatrix.datasets``.

    Returns:
        The importance matrix.

    Raises:
        InputError: the model file is missing or the text too short for one chunk.
        UsageError: n_ctx or n_chunks is not positive.
        EngineError: llama.cpp failed to load or evaluate, or an activation could not be read.
    """
    return collect_activations(model_path, tokens_or_text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
                               progress=progress, include_output=include_output, n_gpu_layers=n_gpu_layers,
                               dataset=dataset, block_io=False).imatrix


def capture_block_io(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int], *, n_ctx: int = 512,
                     n_chunks: int | None = None, n_threads: int | None = None, progress: bool = True,
                     n_gpu_layers: int = 0) -> dict[int, float]:
    """Per block, the mean over tokens of 1 - cos(input, output) of the hidden state.

    Block N's input is ``l_out-(N-1)``; block 0's is the embedding output (``embd``, or ``inp_embd``
    in older llama.cpp; block 0 is missing from the result when the graph has neither). Arguments as ``collect_imatrix``.

    Returns:
        Block index -> mean cosine distance, a layer-importance score (higher: the block does more).
    """
    return collect_activations(model_path, tokens_or_text, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads,
                               progress=progress, n_gpu_layers=n_gpu_layers, imatrix=False).block_distance


def collect_activations(model_path: str | os.PathLike[str], tokens_or_text: str | Sequence[int], *,
                        n_ctx: int = 512, n_chunks: int | None = None, n_threads: int | None = None,
                        progress: bool = True, imatrix: bool = True, block_io: bool = True,
                        include_output: bool = False, n_gpu_layers: int = 0,
                        dataset: str | None = None) -> Activations:
    """The imatrix and the block distances from a single pass; see ``collect_imatrix``."""
    if n_ctx < 1 or (n_chunks is not None and n_chunks < 1):
        raise UsageError(f"n_ctx ({n_ctx}) and n_chunks ({n_chunks}) must be positive")
    collector = _Collector(_ggml(), weights=imatrix, blocks=block_io, include_output=include_output)
    with _session(Path(model_path), n_ctx, n_threads, n_gpu_layers, collector) as (model, ctx):
        chunks = _chunks(_tokens(model, tokens_or_text), n_ctx, n_chunks, _bos(model))
        _evaluate(ctx, chunks, collector, progress)
    label = dataset or ("tokens" if not isinstance(tokens_or_text, str) else "text")
    return Activations(collector.imatrix((label,), len(chunks), n_ctx), collector.block_distance(),
                       collector.block_erank())


# ---------------------------------------------------------------------------------------------
# The eval callback


class EvalCallback:
    """A ``ggml_backend_sched_eval_callback``: ``_wants(node)`` when asked, ``_take(node, addr)`` once computed.

    No exception may reach C: the first one is kept in ``error`` and re-raised after the decode (``decode_chunk``).
    """

    error: GgufmixError | None = None

    def __call__(self, addr: int | None, ask: bool, user_data: Any) -> bool:
        if self.error is not None or not addr:
            return False
        try:
            t = GgmlTensor.from_address(addr)
            return self._wants(t) if ask else self._take(t, addr)
        except Exception as e:  # noqa: BLE001 - must not propagate into C; re-raised after decode
            self.error = e if isinstance(e, GgufmixError) else EngineError(f"activation capture failed: {e!r}")
            return False

    def _wants(self, t: GgmlTensor) -> bool:
        raise NotImplementedError

    def _take(self, t: GgmlTensor, addr: int) -> bool:
        raise NotImplementedError


class _Collector(EvalCallback):
    """Accumulates imatrix sums and block distances from the nodes the scheduler hands over."""

    def __init__(self, lib: ctypes.CDLL, *, weights: bool, blocks: bool, include_output: bool) -> None:
        self._lib = lib
        self._weights, self._blocks, self._include_output = weights, blocks, include_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self._dist: dict[int, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        self._prev: tuple[int, np.ndarray] | None = None
        self._samples: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self.error: GgufmixError | None = None

    def _wants(self, t: GgmlTensor) -> bool:
        if t.op == GGML_OP_MUL_MAT_ID:
            return self._weights  # imatrix.cpp collects every indirect matmul
        if t.op == GGML_OP_MUL_MAT:
            return self._weights and self._is_weight(_src(t, 0)) and _src(t, 1).ne[1] >= MIN_ROWS
        return self._blocks and (t.name in _EMBD_NAMES or t.name.startswith(b"l_out-"))

    def _is_weight(self, src0: GgmlTensor) -> bool:
        name = _weight_name(src0)
        return name.startswith("blk.") or (self._include_output and name == "output.weight")

    def _take(self, t: GgmlTensor, addr: int) -> bool:
        if t.op == GGML_OP_MUL_MAT_ID:
            self._moe(t)
        elif t.op == GGML_OP_MUL_MAT:
            self._dense(t)
        else:
            self._block(t, addr)
        return True

    def _dense(self, t: GgmlTensor) -> None:
        """imatrix.cpp, dense branch: one count, a row of sums per 2-D slice of src0."""
        src0, name = _src(t, 0), _weight_name(_src(t, 0))
        x = self._read(t.src[1], name).astype(np.float64)  # (ne3, ne2, ne1, ne0)
        n_mat = int(src0.ne[2] * src0.ne[3])
        sums, counts = self._entry(name, x.shape[-1] * n_mat, 1)
        sq = np.einsum("abij,abij->abj", x, x)
        acc = sums.reshape(n_mat, -1)
        if n_mat == 1:
            acc[0] += sq.sum(axis=(0, 1))
        else:
            for i3, i2 in np.ndindex(*sq.shape[:2]):
                acc[(i3 % src0.ne[3]) * src0.ne[2] + i2 % src0.ne[2]] += sq[i3, i2]
        counts[0] += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        _check_finite(name, acc)

    def _moe(self, t: GgmlTensor) -> None:
        """imatrix.cpp, MUL_MAT_ID branch: src1 [ne0, n_used or 1, n_tokens], ids [n_used, n_tokens]."""
        src0, name = _src(t, 0), _weight_name(_src(t, 0))
        x = self._read(t.src[1], name)
        ids = self._read(t.src[2], name + " expert ids")
        if x.shape[0] != 1 or ids.shape[-2] != x.shape[1]:
            raise EngineError(f"{name}: unexpected MUL_MAT_ID shapes {x.shape} / {ids.shape}")
        x, ids = x[0], ids[0, 0]  # (n_tokens, ne1, ne0), (n_tokens, n_ids)
        n_as = int(src0.ne[2])
        sums, counts = self._entry(name, x.shape[-1] * n_as, n_as)
        acc = sums.reshape(n_as, -1)
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise EngineError(f"{name}: expert id out of range 0..{n_as - 1}")
        for idx in range(ids.shape[1]):
            ex = ids[:, idx]
            xi = x[:, idx % x.shape[1], :].astype(np.float64)
            order = np.argsort(ex, kind="stable")
            used, starts = np.unique(ex[order], return_index=True)
            acc[used] += np.add.reduceat((xi * xi)[order], starts, axis=0)
            counts += np.bincount(ex, minlength=n_as)
        _check_finite(name, acc)

    def _entry(self, name: str, n_values: int, n_counts: int) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.sums:
            self.sums[name] = np.zeros(n_values, np.float64)
            self.counts[name] = np.zeros(n_counts, np.int64)
        if self.sums[name].size != n_values or self.counts[name].size != n_counts:
            raise EngineError(f"{name}: inconsistent activation size ({n_values} values, {n_counts} counts; "
                              f"had {self.sums[name].size}, {self.counts[name].size})")
        return self.sums[name], self.counts[name]

    def _block(self, t: GgmlTensor, addr: int) -> None:
        name = t.name.decode()
        h = self._read(addr, name).reshape(-1, int(t.ne[0])).astype(np.float64)
        block = -1 if t.name in _EMBD_NAMES else int(name.rsplit("-", 1)[1])
        if self._prev is not None and self._prev[0] == block - 1 and self._prev[1].shape == h.shape:
            acc = self._dist[block]
            acc[0] += float(_cos_distance(self._prev[1], h).sum())
            acc[1] += h.shape[0]
        if block >= 0 and sum(len(x) for x in self._samples[block]) < ERANK_ROWS:
            self._samples[block].append(h[::max(1, h.shape[0] // ERANK_ROWS_PER_CHUNK)].astype(np.float32))
        self._prev = (block, h)

    def _read(self, addr: int | None, what: str) -> np.ndarray:
        return read_node(self._lib, addr, what)

    def imatrix(self, datasets: tuple[str, ...], chunk_count: int, chunk_size: int) -> Imatrix:
        return Imatrix(sums={n: s.astype(np.float32) for n, s in self.sums.items()}, counts=dict(self.counts),
                       datasets=datasets, chunk_count=chunk_count, chunk_size=chunk_size)

    def block_distance(self) -> dict[int, float]:
        return {b: s / n for b, (s, n) in sorted(self._dist.items()) if n}

    def block_erank(self) -> dict[int, float]:

        return {b: effective_rank(np.concatenate(x)[:ERANK_ROWS]) for b, x in sorted(self._samples.items()) if x}


def _src(t: GgmlTensor, i: int) -> GgmlTensor:
    if not t.src[i]:
        raise EngineError(f"{t.name.decode(errors='replace')}: graph node has no src[{i}]")
    return GgmlTensor.from_address(t.src[i])


def _weight_name(t: GgmlTensor) -> str:
    """imatrix.cpp ``filter_tensor_name``: ``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``."""
    name = t.name.decode(errors="replace")
    return name.split("#")[1] if "#" in name else name


def read_node(lib: ctypes.CDLL, addr: int | None, what: str) -> np.ndarray:
    """A graph tensor's elements, shaped (ne3, ne2, ne1, ne0), copied from its backend."""
    if not addr:
        raise EngineError(f"{what}: the graph node has no such source")
    t = GgmlTensor.from_address(addr)
    dtype = _NP_TYPES.get(t.type)
    if dtype is None:
        name = (lib.ggml_type_name(t.type) or b"?").decode().upper()
        raise EngineError(f"{what}: activations of ggml type {name} cannot be read; "
                          "only F32, F16 (and I32 expert ids) are supported")
    if t.nb[0] != np.dtype(dtype).itemsize:
        raise EngineError(f"{what}: activation elements are not contiguous (nb[0] = {t.nb[0]}); cannot read")
    owner = GgmlTensor.from_address(t.view_src) if t.view_src else t
    if not owner.buffer or not t.data:
        raise EngineError(f"{what}: the activation tensor has no memory")
    nbytes = lib.ggml_nbytes(addr)
    raw = np.empty(nbytes, np.uint8)
    lib.ggml_backend_tensor_get(addr, raw.ctypes.data, 0, nbytes)
    arr = np.ndarray(tuple(reversed(t.ne)), dtype=dtype, buffer=raw, strides=tuple(reversed(t.nb)))
    return arr.astype(np.float32) if dtype is np.float16 else arr


def _cos_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return 1.0 - (a * b).sum(axis=1) / np.maximum(den, np.finfo(np.float64).tiny)


def _check_finite(name: str, acc: np.ndarray) -> None:
    if not np.isfinite(acc).all():
        raise EngineError(f"{name}: non-finite input activations; the model overflows on this text "
                          "(an F16 model may need its F32/BF16 original)")


# ---------------------------------------------------------------------------------------------
# llama.cpp plumbing


@loaded_once
def _ggml() -> ctypes.CDLL:
    """libggml-base (shared with ``kernels``) plus what the callback and the in-place weight swaps need; checks the op ids we mirror."""
    lib = kernels.ggml()
    c = ctypes
    for fname, args, res in (("ggml_backend_tensor_get", [c.c_void_p, c.c_void_p, c.c_size_t, c.c_size_t], None),
                             ("ggml_backend_tensor_set", [c.c_void_p, c.c_void_p, c.c_size_t, c.c_size_t], None),
                             ("ggml_nbytes", [c.c_void_p], c.c_size_t),
                             ("ggml_op_name", [c.c_int], c.c_char_p),
                             ("ggml_type_name", [c.c_int], c.c_char_p)):
        fn = getattr(lib, fname)
        fn.argtypes, fn.restype = args, res
    for op, want in ((GGML_OP_MUL_MAT, b"MUL_MAT"), (GGML_OP_MUL_MAT_ID, b"MUL_MAT_ID")):
        if lib.ggml_op_name(op) != want:
            raise EngineError(f"ggml op {op} is {lib.ggml_op_name(op)!r}, expected {want!r}: this libggml does not "
                              "match the ggml.h ggufmix mirrors (llama-cpp-python==0.3.36)")
    return lib


@contextmanager
def _session(path: Path, n_ctx: int, n_threads: int | None, n_gpu_layers: int,
             collector: _Collector) -> Iterator[tuple[Any, Any]]:
    """A loaded model and a context whose eval callback is ``collector``; both freed on exit."""
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    check_loads(path)  # a crash inside llama.cpp on damaged metadata becomes an EngineError (engine/isolated.py)
    llama_cpp = llama()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise EngineError(f"{path}: llama.cpp could not load the model: {last_error()}")
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)  # referenced until the context is freed
    try:
        ctx = llama_cpp.llama_init_from_model(model, _context_params(n_ctx, n_threads, callback))
        if not ctx:
            raise EngineError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens: "
                              f"{last_error()}")
        try:
            yield model, ctx
        finally:
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
        del callback


def _context_params(n_ctx: int, n_threads: int | None, callback: Any) -> Any:
    llama_cpp = llama()
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_ctx
    cparams.n_ubatch = min(n_ctx, 512)
    cparams.n_seq_max = 1
    cparams.n_threads = cparams.n_threads_batch = n_threads or cpu_count()
    cparams.no_perf = True
    cparams.cb_eval = callback
    cparams.cb_eval_user_data = None
    return cparams


def cpu_count() -> int:
    """Cores this process may run on (os.cpu_count() ignores affinity masks)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _tokens(model: Any, tokens_or_text: str | Sequence[int]) -> list[int]:
    """Text -> ids with the model's tokenizer (BOS as the vocabulary asks), or checked ids."""
    llama_cpp = llama()
    vocab = llama_cpp.llama_model_get_vocab(model)
    if not isinstance(tokens_or_text, str):
        ids = [int(t) for t in tokens_or_text]
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise InputError(f"token id {bad} is outside the model's vocabulary of {n_vocab}")
        return ids
    text = tokens_or_text.encode("utf-8")
    buf = (llama_cpp.llama_token * (len(text) + 8))()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
    if n < 0:
        raise EngineError(f"tokenizing {len(text)} bytes needs {-n} tokens, more than the buffer held")
    return list(buf[:n])


def _bos(model: Any) -> int | None:
    llama_cpp = llama()
    vocab = llama_cpp.llama_model_get_vocab(model)
    return int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None


def _chunks(tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None) -> list[list[int]]:
    """imatrix.cpp ``compute_imatrix``: consecutive n_ctx-token chunks, BOS replacing the first token."""
    available = len(tokens) // n_ctx
    if available == 0:
        raise InputError(f"the calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
                         "give more text or a smaller n_ctx")
    n = available if n_chunks is None else min(n_chunks, available)
    if n_chunks is not None and n_chunks > available:
        logger.warning("the text fills only %d chunks of %d tokens, not %d", available, n_ctx, n_chunks)
    chunks = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


def _evaluate(ctx: Any, chunks: list[list[int]], collector: _Collector, progress: bool) -> None:
    """Decode each chunk from an empty KV cache, logits for every token (all rows reach the last FFN)."""
    from tqdm.auto import tqdm

    llama_cpp = llama()
    n_ctx = len(chunks[0])
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    try:
        for chunk in tqdm(chunks, desc="activations", unit="chunk", disable=not progress):
            decode_chunk(ctx, batch, chunk, collector)
    finally:
        llama_cpp.llama_batch_free(batch)


def decode_chunk(ctx: Any, batch: Any, chunk: list[int], hook: Any) -> None:
    """One chunk from an empty KV cache; the callback's own error (``hook.error``) comes first."""
    llama_cpp = llama()
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    _fill(batch, chunk)
    rc = llama_cpp.llama_decode(ctx, batch)
    if hook.error is not None:
        raise hook.error
    if rc != 0:
        raise EngineError(f"llama_decode failed ({rc}): {last_error()}")


def _fill(batch: Any, tokens: list[int]) -> None:
    for i, tok in enumerate(tokens):
        batch.token[i] = tok
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    batch.n_tokens = len(tokens)
