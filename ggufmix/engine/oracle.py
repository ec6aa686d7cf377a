"""A float source loaded once in llama.cpp whose weights are overwritten in place: the KLD oracle's engine.

Measuring what quantizing one tensor does to the model's output end to end would otherwise cost a file
write and a model load per (tensor, type). Here the model is loaded once, without mmap (an mmap'd
weight is read-only memory: writing it segfaults) and without repacked "extra" buffers (those hold
weights in another layout), so every weight lives in a plain CPU buffer. llama.h exposes no tensor
getter, so the weights are found through the eval callback: during one warm-up pass every graph node's
sources are looked at, and a source that carries a model weight's name, owns memory and is no view is
that weight (``MUL_MAT`` / ``GET_ROWS`` / ``MUL_MAT_ID`` ``src[0]``). Its data is then replaced with
``ggml_backend_tensor_set`` by ``dequantize(quantize(w))`` from llama.cpp's own kernels (kernels.py),
stored back in the source's own float type, and restored from a saved copy afterwards.

What this measures differs from a file built with the type in one way: llama.cpp multiplies a quantized
weight with activations rounded to the type's dot-product type (Q8_K for Q4_K), here with F16-rounded
activations on the dequantized weight. tests/test_oracle.py bounds that difference against a real file.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ggufmix.engine import kernels
from ggufmix.engine.activations import GgmlTensor, _ggml, _weight_name
from ggufmix.engine.isolated import check_loads
from ggufmix.engine.llamalib import last_error, llama
from ggufmix.engine.logits import ChunkPlan
from ggufmix.errors import EngineError, InputError
from ggufmix.numerics import log_softmax_into
from ggufmix.types import QuantType

logger = logging.getLogger(__name__)

_FLOAT = {0: QuantType.F32, 1: QuantType.F16, 30: QuantType.BF16}  # ggml type ids of the float sources


@dataclass(frozen=True)
class WeightRef:
    """A model weight inside llama.cpp: its tensor's address, float type and shape (nrows, ncols)."""

    addr: int
    qtype: QuantType
    nrows: int
    ncols: int
    nbytes: int


class _Finder:
    """Eval callback: on the warm-up pass, record the weights named in ``wanted`` among the nodes' sources."""

    def __init__(self, wanted: Collection[str]) -> None:
        self.wanted = set(wanted)
        self.found: dict[str, WeightRef] = {}
        self.active = True
        self.error: Exception | None = None

    def __call__(self, addr: int | None, ask: bool, user_data: Any) -> bool:
        if not self.active or not addr or not ask:
            return False
        try:
            t = GgmlTensor.from_address(addr)
            for src in t.src:
                if src and len(self.found) < len(self.wanted):
                    self._look(int(src))
        except Exception as e:  # noqa: BLE001 - must not propagate into C; raised after decode
            self.error = EngineError(f"finding the model's weights failed: {e!r}")
        return False

    def _look(self, addr: int) -> None:
        s = GgmlTensor.from_address(addr)
        name = _weight_name(s)
        if name not in self.wanted or name in self.found or s.view_src or not s.buffer or not s.data:
            return
        qtype = _FLOAT.get(s.type)
        if qtype is None:
            raise InputError(f"{name!r} is ggml type {s.type} in llama.cpp; the oracle needs an F32/F16/BF16 source")
        ncols = int(s.ne[0])
        nrows = int(s.ne[1] * s.ne[2] * s.ne[3])
        self.found[name] = WeightRef(addr, qtype, nrows, ncols, int(_ggml().ggml_nbytes(addr)))


def to_float32(raw: np.ndarray, qtype: QuantType) -> np.ndarray:
    """Raw bytes of an F32/F16/BF16 tensor -> float32 values."""
    if qtype == QuantType.F32:
        return raw.view(np.float32).copy()
    if qtype == QuantType.F16:
        return raw.view(np.float16).astype(np.float32)
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def from_float32(values: np.ndarray, qtype: QuantType) -> np.ndarray:
    """float32 values -> raw bytes of ``qtype`` (BF16 rounded to nearest even, like ggml's converter)."""
    x = np.ascontiguousarray(values, dtype=np.float32).ravel()
    if qtype == QuantType.F32:
        return x.view(np.uint8)
    if qtype == QuantType.F16:
        return x.astype(np.float16).view(np.uint8)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded.view(np.uint8)


class SwapModel:
    """One float GGUF in llama.cpp, its weights swappable in place, its log-softmax rows chunk by chunk.

    Args:
        path: the F32/F16/BF16 GGUF.
        weights: names of the weights that may be swapped (found on a warm-up pass over ``warmup``).
        warmup: tokens of one chunk to find the weights with (any text of ``ctx`` tokens).
        ctx: tokens per chunk.
        n_threads: CPU threads (default: all this process may use).

    Raises:
        InputError: missing file, a weight that is not float in llama.cpp, or a weight never used by the graph.
        EngineError: llama.cpp cannot load the model or decode.
    """

    def __init__(self, path: Path, weights: Collection[str], *, ctx: int = 512, n_threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such model file")
        check_loads(self.path)
        self.ctx = ctx
        self._lc = llama()
        self._finder = _Finder(weights)
        self._callback = self._lc.ggml_backend_sched_eval_callback(self._finder)
        self.n_threads = n_threads or len(os.sched_getaffinity(0))
        self._model, self._ctx = self._load(self.n_threads)
        vocab = self._lc.llama_model_get_vocab(self._model)
        self.n_vocab = int(self._lc.llama_vocab_n_tokens(vocab))
        self.bos = int(self._lc.llama_vocab_bos(vocab)) if self._lc.llama_vocab_get_add_bos(vocab) else None
        self._batch = self._lc.llama_batch_init(ctx, 0, 1)
        self._saved: dict[str, np.ndarray] = {}
        self.refs: dict[str, WeightRef] = {}

    def _load(self, n_threads: int) -> tuple[Any, Any]:
        lc = self._lc
        mp = lc.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.load_mode = lc.LLAMA_LOAD_MODE_NONE  # weights in an allocated buffer we may write, not a read-only map
        mp.use_extra_bufts = False               # no repacked copies of the weights
        model = lc.llama_model_load_from_file(str(self.path).encode(), mp)
        if not model:
            raise EngineError(f"{self.path}: llama.cpp could not load the model: {last_error()}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = cp.n_batch = self.ctx
        cp.n_ubatch = min(self.ctx, 512)
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.no_perf = True
        cp.cb_eval = self._callback
        cp.cb_eval_user_data = None
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            lc.llama_model_free(model)
            raise EngineError(f"{self.path}: llama.cpp could not create a context of {self.ctx} tokens: {last_error()}")
        return model, ctx

    def __enter__(self) -> SwapModel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Free the batch, the context and the weights."""
        if getattr(self, "_ctx", None) is not None:
            self._lc.llama_batch_free(self._batch)
            self._lc.llama_free(self._ctx)
            self._lc.llama_model_free(self._model)
            self._ctx = None

    def tokenize(self, text: str) -> np.ndarray:
        """Tokens as llama-perplexity gets them (BOS added as the vocabulary asks)."""
        data = text.encode("utf-8")
        buf = (self._lc.llama_token * (len(data) + 8))()
        n = self._lc.llama_tokenize(self._lc.llama_model_get_vocab(self._model), data, len(data), buf, len(buf),
                                    True, False)
        if n < 0:
            raise EngineError(f"tokenizing {len(data)} bytes needs {-n} tokens, more than the buffer held")
        return np.asarray(buf[:n], dtype=np.int32)

    def find_weights(self, tokens: np.ndarray, plan: ChunkPlan) -> None:
        """Run chunk 0 once with the finder on; every wanted weight must have been seen.

        Raises:
            InputError: a wanted weight never appeared as a node's source (not used on CPU, or renamed).
        """
        self._finder.active = True
        for _ in self.iter_chunks(tokens, ChunkPlan(plan.ctx, 1)):
            pass
        self._finder.active = False
        if self._finder.error is not None:
            raise self._finder.error
        missing = sorted(self._finder.wanted - set(self._finder.found))
        if missing:
            raise InputError(f"{self.path}: {len(missing)} weights were not found in llama.cpp's graph "
                             f"(first: {missing[0]!r}); the oracle cannot swap them")
        self.refs = dict(self._finder.found)

    def read(self, name: str) -> np.ndarray:
        """The weight's current values as float32 (nrows, ncols)."""
        ref = self.refs[name]
        raw = np.empty(ref.nbytes, np.uint8)
        _ggml().ggml_backend_tensor_get(ref.addr, raw.ctypes.data, 0, ref.nbytes)
        return to_float32(raw, ref.qtype).reshape(ref.nrows, ref.ncols)

    def write(self, name: str, values: np.ndarray) -> None:
        """Replace the weight's data by ``values`` (float32, stored in the weight's own float type);
        the original is kept until ``restore``."""
        ref = self.refs[name]
        if name not in self._saved:
            raw = np.empty(ref.nbytes, np.uint8)
            _ggml().ggml_backend_tensor_get(ref.addr, raw.ctypes.data, 0, ref.nbytes)
            self._saved[name] = raw
        data = from_float32(values, ref.qtype)
        if data.size != ref.nbytes:
            raise EngineError(f"{name!r}: {data.size} bytes for a {ref.nbytes}-byte weight")
        _ggml().ggml_backend_tensor_set(ref.addr, data.ctypes.data, 0, ref.nbytes)

    def restore(self, name: str | None = None) -> None:
        """Put back the original data of ``name`` (every swapped weight when None)."""
        for n in [name] if name is not None else list(self._saved):
            raw = self._saved.pop(n, None)
            if raw is not None:
                _ggml().ggml_backend_tensor_set(self.refs[n].addr, raw.ctypes.data, 0, raw.size)

    def original(self, name: str) -> np.ndarray:
        """The weight's source values (float32), whether or not it is swapped now."""
        ref = self.refs[name]
        if name in self._saved:
            return to_float32(self._saved[name], ref.qtype).reshape(ref.nrows, ref.ncols)
        return self.read(name)

    def swap_quantized(self, name: str, qtype: QuantType, imatrix: np.ndarray | None = None,
                       rows_per_group: int | None = None) -> None:
        """Replace the weight by ``dequantize(quantize(original, qtype, imatrix))`` from llama.cpp's kernels,
        quantized on the model's threads.

        Args:
            imatrix: (groups, ncols) per-column importance; one group per expert (rows_per_group rows each).
        """
        w = self.original(name)
        if qtype in (self.refs[name].qtype, QuantType.F32):
            self.write(name, w)
            return
        self.write(name, quant_roundtrip(w, qtype, imatrix, rows_per_group, self.n_threads))

    def iter_chunks(self, tokens: np.ndarray, plan: ChunkPlan) -> Iterator[np.ndarray]:
        """Decode each chunk from an empty KV cache; yield its scored rows' log-softmax (a reused buffer)."""
        buf = np.empty((plan.n_scored, self.n_vocab), np.float32)
        for i in range(plan.n_chunks):
            self._fill(plan.chunk_tokens(tokens, i), plan)
            self._lc.llama_memory_clear(self._lc.llama_get_memory(self._ctx), True)
            rc = self._lc.llama_decode(self._ctx, self._batch)
            if self._finder.error is not None:
                raise self._finder.error
            if rc != 0:
                raise EngineError(f"{self.path}: llama_decode failed on chunk {i} ({rc}): {last_error()}")
            logits = np.ctypeslib.as_array(self._lc.llama_get_logits(self._ctx), shape=buf.shape)
            log_softmax_into(logits, buf)
            yield buf

    def _fill(self, chunk: np.ndarray, plan: ChunkPlan) -> None:
        b = self._batch
        for k in range(plan.ctx):
            b.token[k] = int(chunk[k])
            b.pos[k] = k
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = 0
            b.logits[k] = plan.first <= k < plan.first + plan.n_scored
        if self.bos is not None:
            b.token[0] = self.bos
        b.n_tokens = plan.ctx


def quant_roundtrip(w: np.ndarray, qtype: QuantType, imatrix: np.ndarray | None,
                    rows_per_group: int | None = None, threads: int = 1) -> np.ndarray:
    """``dequantize(quantize(w))`` with ggml's kernels, one imatrix group (expert) of rows at a time."""
    ncols = w.shape[1]
    if imatrix is None or imatrix.shape[0] == 1:
        im = None if imatrix is None else imatrix[0]
        return kernels.dequantize_rows(kernels.quantize_rows(w, qtype, im, threads), qtype, ncols)
    step = rows_per_group or w.shape[0] // imatrix.shape[0]
    out = np.empty_like(w)
    for g in range(imatrix.shape[0]):
        blocks = kernels.quantize_rows(w[g * step:(g + 1) * step], qtype, imatrix[g], threads)
        out[g * step:(g + 1) * step] = kernels.dequantize_rows(blocks, qtype, ncols)
    return out


def available_memory() -> int | None:
    """Bytes the system can give without swapping (``MemAvailable``), or None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_needed(path: Path, n_elements: Collection[int]) -> int:
    """Bytes the oracle holds: the whole source in RAM (no mmap), the saved copy and float32 round trip of
    the largest weight (x3), the compute buffers (taken as 10% of the file, at least 256 MiB)."""
    size = Path(path).stat().st_size
    largest = max(n_elements, default=0)
    return size + 3 * 4 * largest + max(size // 10, 256 << 20)


def check_memory(path: Path, n_elements: Collection[int]) -> None:
    """Refuse before loading when the source cannot be held in RAM.

    Raises:
        EngineError: naming the GB needed and available.
    """
    need, avail = memory_needed(path, n_elements), available_memory()
    if avail is not None and need > avail:
        raise EngineError(f"{path}: the KLD oracle holds the whole source in memory: it needs about "
                          f"{need / 1e9:.1f} GB, {avail / 1e9:.1f} GB are available")
