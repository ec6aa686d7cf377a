"""Log-softmax rows of a GGUF model over a text, chunk by chunk, the way ``llama-perplexity`` scores.

This is the only module of ``ggufmix.evaluate``'s pipeline that talks to llama.cpp (through
llama-cpp-python). It mirrors ``perplexity()`` / ``kl_divergence()`` in llama.cpp's
``tools/perplexity/perplexity.cpp``:

- the text is tokenized once with ``add_special=true, parse_special=false``;
- it is cut into ``n_tokens // ctx`` chunks of ``ctx`` tokens (at least two chunks' worth is required);
- each chunk starts from an empty KV cache; its first token is replaced by BOS when the vocabulary
  adds BOS;
- positions ``first = ctx // 2`` .. ``ctx - 2`` are scored: row ``j`` predicts token ``first + j + 1``,
  so each chunk scores ``ctx - 1 - ctx // 2`` tokens.

Only the scored positions request logits from llama.cpp (perplexity.cpp's ``need_logits``), which
skips the output matmul for the first half of each chunk. One chunk's rows are held at a time: the
yielded array is a read-only view of a buffer that the next chunk overwrites.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from ggufmix.engine.llamalib import last_error, llama
from ggufmix.errors import EngineError, InputError
from ggufmix.numerics import log_softmax_into

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where llama.cpp loads a model and how large its context is.

    Attributes:
        n_ctx: context cells (``-c``).
        n_batch: logical batch (``-b``); ``n_ubatch`` is llama.cpp's physical batch (``-ub``, capped at n_batch).
        n_gpu_layers: layers to offload (``-ngl``; -1 all).
        main_gpu: with ``single_device``, the index among llama.cpp's offload devices (``-mg``); -1: none (CPU only).
        single_device: ``--split-mode none``: everything offloaded goes to ``main_gpu``.
        use_mmap: False is ``--no-mmap`` (buffers hold each weight once, as ``--fit`` assumes).
    """

    n_ctx: int
    n_batch: int
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    main_gpu: int = 0
    single_device: bool = False
    use_mmap: bool = True

    def llama_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``llama_cpp.Llama`` for this placement."""
        kw: dict[str, Any] = {"n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_ubatch": min(self.n_ubatch, self.n_batch),
                              "n_gpu_layers": self.n_gpu_layers, "use_mmap": self.use_mmap}
        if self.single_device:
            kw |= {"split_mode": 0, "main_gpu": self.main_gpu}  # LLAMA_SPLIT_MODE_NONE
        return kw


@dataclass(frozen=True)
class ChunkPlan:
    """How a token stream is cut into scored chunks (perplexity.cpp ``perplexity()``).

    Attributes:
        ctx: tokens per chunk (``-c``).
        n_chunks: chunks evaluated (``--chunks``, capped at ``n_tokens // ctx``).
    """

    ctx: int
    n_chunks: int

    def __post_init__(self) -> None:
        if self.ctx < 4 or self.ctx % 2:
            raise ValueError(f"ctx={self.ctx}: use an even context of at least 4 tokens")
        if self.n_chunks < 1:
            raise ValueError(f"n_chunks={self.n_chunks}: need at least one chunk")

    @property
    def first(self) -> int:
        """First scored position of a chunk (``n_ctx/2``)."""
        return self.ctx // 2

    @property
    def n_scored(self) -> int:
        """Scored tokens per chunk (``n_ctx - 1 - n_ctx/2``)."""
        return self.ctx - 1 - self.first

    @property
    def n_tokens_scored(self) -> int:
        return self.n_scored * self.n_chunks

    def chunk_tokens(self, tokens: np.ndarray, index: int) -> np.ndarray:
        """The ``ctx`` input tokens of chunk ``index`` (before the BOS substitution)."""
        return tokens[index * self.ctx:(index + 1) * self.ctx]

    def targets(self, tokens: np.ndarray, index: int) -> np.ndarray:
        """The actual next tokens of chunk ``index``'s scored rows."""
        start = index * self.ctx
        return tokens[start + self.first + 1:start + self.ctx]


def plan_chunks(n_tokens: int, ctx: int, chunks: int | None = None) -> ChunkPlan:
    """Chunking of ``n_tokens`` tokens, with perplexity.cpp's limits.

    Args:
        n_tokens: length of the tokenized text.
        ctx: tokens per chunk.
        chunks: wanted chunks; None for all of them.

    Returns:
        The ChunkPlan.

    Raises:
        InputError: when the text has fewer than ``2 * ctx`` tokens (perplexity.cpp refuses too).
    """
    if n_tokens < 2 * ctx:
        raise InputError(f"the text tokenizes to {n_tokens} tokens; ctx={ctx} needs at least {2 * ctx}: "
                         "give a longer text or a smaller --ctx")
    n_max = n_tokens // ctx
    return ChunkPlan(ctx=ctx, n_chunks=n_max if chunks is None else min(chunks, n_max))


@dataclass(frozen=True)
class ChunkLogits:
    """The scored rows of one chunk.

    Attributes:
        index: chunk number.
        targets: (n_scored,) int32 actual next tokens.
        logprobs: (n_scored, n_vocab) float32 log-softmax rows; a read-only view that is only valid
            until the next chunk is requested.
        decode_s: seconds in ``llama_decode`` (the forward pass).
        softmax_s: seconds turning logits into log-probabilities.
    """

    index: int
    targets: np.ndarray
    logprobs: np.ndarray
    decode_s: float
    softmax_s: float


class LogitsModel:
    """One GGUF loaded for scoring: tokenizes, then streams log-softmax rows chunk by chunk.

    Args:
        path: the GGUF file.
        ctx: tokens per chunk; unless ``placement`` says otherwise the context is made exactly this large,
            one chunk per batch.
        n_threads: CPU threads (default: all cores).
        n_gpu_layers: layers to offload (ignored when ``placement`` is given).
        placement: where and how large to load it (``ggufmix validate``: one device, its own context).
        preflight: read the vocabulary in a child process first (off when already in one).

    Raises:
        InputError: the file does not exist.
        EngineError: llama.cpp cannot load it.
    """

    def __init__(self, path: Path, *, ctx: int, n_threads: int | None = None, n_gpu_layers: int = 0,
                 placement: Placement | None = None, preflight: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such model file")
        self.ctx = ctx
        self._lc = llama()
        where = placement or Placement(n_ctx=ctx, n_batch=ctx, n_gpu_layers=n_gpu_layers)
        if where.n_batch < ctx or where.n_ctx < ctx:
            raise ValueError(f"{self.path}: chunks of {ctx} tokens need n_ctx and n_batch >= {ctx}")
        self._llm = self._load(n_threads or os.cpu_count() or 1, where, preflight)
        vocab = self._lc.llama_model_get_vocab(self._llm.model)
        self.n_vocab: int = int(self._lc.llama_vocab_n_tokens(vocab))
        self.add_bos: bool = bool(self._lc.llama_vocab_get_add_bos(vocab))
        self.bos: int = int(self._lc.llama_vocab_bos(vocab))
        self._batch: Any = None
        self._buf: np.ndarray | None = None

    def _load(self, n_threads: int, where: Placement, preflight: bool) -> Any:
        from ggufmix.engine.isolated import check_loads

        if preflight:
            check_loads(self.path)  # a crash inside llama.cpp on damaged metadata becomes an EngineError
        try:
            # logits_all=False: we choose the output rows per token ourselves (need_logits below), and
            # Llama then never fills its own (n_ctx, n_vocab) score matrix.
            return self._lc.Llama(str(self.path), logits_all=False, verbose=False, n_threads=n_threads,
                                  n_threads_batch=n_threads, **where.llama_kwargs())
        except (ValueError, RuntimeError, OSError) as e:
            raise EngineError(f"{self.path}: llama.cpp could not load the model ({e}): {last_error()}") from None

    def __enter__(self) -> LogitsModel:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Free the batch, the logits buffer, the context and the weights."""
        if self._batch is not None:
            self._lc.llama_batch_free(self._batch)
            self._batch = None
        self._buf = None
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None

    def tokenize(self, text: str) -> np.ndarray:
        """Tokens of ``text`` as perplexity.cpp gets them (``common_tokenize(ctx, text, true)``).

        Returns:
            int32 token ids.
        """
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return np.asarray(ids, dtype=np.int32)

    def iter_chunks(self, tokens: np.ndarray, plan: ChunkPlan) -> Iterator[ChunkLogits]:
        """Decode each chunk of ``plan`` and yield its scored log-softmax rows.

        Args:
            tokens: the tokenized text (from this model's or a same-vocabulary model's ``tokenize``).
            plan: chunking; ``plan.ctx`` must equal this model's ``ctx``.

        Yields:
            One ChunkLogits per chunk; its ``logprobs`` is overwritten by the next one.

        Raises:
            EngineError: llama_decode fails.
        """
        self._check(tokens, plan)
        views = self._batch_views(plan)
        buf = self._buffer(plan.n_scored)
        for i in range(plan.n_chunks):
            views["token"][:] = plan.chunk_tokens(tokens, i)
            if self.add_bos:
                views["token"][0] = self.bos
            decode_s = self._decode(i)
            t0 = time.perf_counter()
            logits = np.ctypeslib.as_array(self._lc.llama_get_logits(self._llm.ctx), shape=buf.shape)
            log_softmax_into(logits, buf)
            view = buf.view()
            view.flags.writeable = False
            targets = plan.targets(tokens, i).astype(np.int32)
            yield ChunkLogits(i, targets, view, decode_s, time.perf_counter() - t0)

    def generation_speed(self, prompt: np.ndarray, n_new: int) -> tuple[int, float]:
        """Greedy generation of ``n_new`` tokens after ``prompt`` (end-of-text does not stop it).

        Returns:
            (tokens generated one at a time, seconds llama.cpp's own counters spent on them:
            ``llama_perf_context`` ``n_eval`` / ``t_eval_ms``).

        Raises:
            EngineError: llama.cpp fails while generating.
        """
        lc, ctx = self._lc, self._llm.ctx
        lc.llama_perf_context_reset(ctx)
        try:
            for n, _ in enumerate(self._llm.generate(prompt.tolist(), top_k=1, top_p=1.0, temp=0.0, reset=True), 1):
                if n >= n_new:
                    break
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"{self.path}: llama.cpp could not generate ({e}): {last_error()}") from None
        perf = lc.llama_perf_context(ctx)
        return int(perf.n_eval), float(perf.t_eval_ms) / 1e3

    def _check(self, tokens: np.ndarray, plan: ChunkPlan) -> None:
        if plan.ctx != self.ctx:
            raise ValueError(f"{self.path}: plan ctx {plan.ctx} != model ctx {self.ctx}")
        if len(tokens) < plan.n_chunks * plan.ctx:
            raise ValueError(f"{self.path}: {len(tokens)} tokens are fewer than {plan.n_chunks} chunks of {plan.ctx}")
        if len(tokens) and (int(tokens.max()) >= self.n_vocab or int(tokens.min()) < 0):
            raise InputError(f"{self.path}: token id {int(tokens.max())} is outside its {self.n_vocab}-token "
                             "vocabulary; base and quantized models must share a tokenizer")

    def _decode(self, index: int) -> float:
        t0 = time.perf_counter()
        self._lc.llama_memory_clear(self._lc.llama_get_memory(self._llm.ctx), True)
        rc = self._lc.llama_decode(self._llm.ctx, self._batch)
        if rc != 0:
            raise EngineError(f"{self.path}: llama_decode failed on chunk {index} (return code {rc})")
        self._lc.llama_synchronize(self._llm.ctx)
        return time.perf_counter() - t0

    def _buffer(self, n_rows: int) -> np.ndarray:
        if self._buf is None or self._buf.shape[0] != n_rows:
            self._buf = np.empty((n_rows, self.n_vocab), dtype=np.float32)
        return self._buf

    def _batch_views(self, plan: ChunkPlan) -> dict[str, np.ndarray]:
        """A llama_batch of one chunk, seq 0, outputs on the scored positions, as numpy views."""
        if self._batch is None:
            self._batch = self._lc.llama_batch_init(plan.ctx, 0, 1)
        b, n = self._batch, plan.ctx
        b.n_tokens = n
        views = {name: np.ctypeslib.as_array(getattr(b, name), shape=(n,)) for name in ("token", "pos", "n_seq_id", "logits")}
        views["pos"][:] = np.arange(n, dtype=np.int32)
        views["n_seq_id"][:] = 1
        views["logits"][:] = 0
        views["logits"][plan.first:plan.first + plan.n_scored] = 1
        for k in range(n):
            b.seq_id[k][0] = 0
        return views


def system_info() -> tuple[bool, str]:
    """(GPU offload available, llama.cpp's system info line) of the installed llama-cpp-python."""
    lc = llama()
    return bool(lc.llama_supports_gpu_offload()), lc.llama_print_system_info().decode("utf-8", "replace")
