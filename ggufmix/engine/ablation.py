"""What each block is worth to the model: perplexity with the block replaced by the identity (LieQ).

LieQ removes a layer and measures the perplexity. Copying the model once per block (llama.cpp's
``prune_layers``) costs a file write and a model load per block; instead the eval callback overwrites
block N's output ``l_out-N`` with its input ``l_out-(N-1)`` (``embd`` for block 0) as soon as the
scheduler has computed it, so everything after the block sees the residual stream as if the block
were not there. One model load, one forward pass per block and chunk.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ggufmix.engine.activations import (
    _EMBD_NAMES,
    GgmlTensor,
    _bos,
    _chunks,
    _ggml,
    _session,
    _tokens,
    decode_chunk,
)
from ggufmix.engine.llamalib import llama
from ggufmix.errors import EngineError, GgufmixError
from ggufmix.numerics import log_softmax, target_nll

logger = logging.getLogger(__name__)


class _Identity:
    """Eval callback: when ``target`` is set, block ``target``'s output is replaced by its input."""

    def __init__(self) -> None:
        self.target: int | None = None
        self._input: np.ndarray | None = None
        self.replaced = 0
        self.error: GgufmixError | None = None

    def _block(self, t: GgmlTensor) -> int | None:
        if t.name in _EMBD_NAMES:
            return -1
        if t.name.startswith(b"l_out-"):
            return int(t.name[6:])
        return None

    def __call__(self, addr: int | None, ask: bool, user_data: Any) -> bool:
        if self.target is None or not addr or self.error is not None:
            return False
        try:
            t = GgmlTensor.from_address(addr)
            block = self._block(t)
            if ask:
                return block in (self.target - 1, self.target)
            self._swap(addr, block)
            return True
        except Exception as e:  # noqa: BLE001 - must not propagate into C
            self.error = e if isinstance(e, GgufmixError) else EngineError(f"block ablation failed: {e!r}")
            return False

    def _swap(self, addr: int, block: int | None) -> None:
        lib = _ggml()
        n = lib.ggml_nbytes(addr)
        if block == self.target - 1:
            self._input = np.empty(n, np.uint8)
            lib.ggml_backend_tensor_get(addr, self._input.ctypes.data, 0, n)
        elif block == self.target:
            if self._input is None or self._input.size != n:
                raise EngineError(f"l_out-{self.target}: its input has another size; cannot bypass the block")
            lib.ggml_backend_tensor_set(addr, self._input.ctypes.data, 0, n)
            self.replaced += 1
            self._input = None


def block_removal_cost(model_path: str | os.PathLike[str], text: str | Sequence[int], n_layers: int, *,
                       n_ctx: int = 512, n_chunks: int | None = 4, n_threads: int | None = None,
                       progress: bool = True) -> dict[int, float]:
    """Per block: mean next-token NLL with the block bypassed minus the intact model's (= ln PPL ratio).

    Scored like llama-perplexity: the second half of every chunk.

    Raises:
        InputError: missing model or too little text. EngineError: llama.cpp failed, or a block's output
            never appeared in the graph (an architecture without ``l_out-N`` names).
    """
    from tqdm.auto import tqdm

    hook = _Identity()
    with _session(Path(model_path), n_ctx, n_threads, 0, hook) as (model, ctx):  # type: ignore[arg-type]
        chunks = _chunks(_tokens(model, text), n_ctx, n_chunks, _bos(model))
        base = _mean_nll(ctx, model, chunks, hook)
        out = {}
        for b in tqdm(range(n_layers), desc="block removal", unit="block", disable=not progress):
            hook.target, hook.replaced = b, 0
            nll = _mean_nll(ctx, model, chunks, hook)
            if hook.replaced != len(chunks):
                raise EngineError(f"{model_path}: block {b}'s output (l_out-{b}) was not seen; cannot bypass it")
            out[b] = nll - base
        hook.target = None
    return out


def _mean_nll(ctx: Any, model: Any, chunks: list[list[int]], hook: _Identity) -> float:

    llama_cpp = llama()
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    n_ctx = len(chunks[0])
    first = n_ctx // 2
    batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
    total, count = 0.0, 0
    try:
        for chunk in chunks:
            decode_chunk(ctx, batch, chunk, hook)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n_ctx, n_vocab))
            nll = target_nll(log_softmax(logits[first:n_ctx - 1]), np.asarray(chunk[first + 1:]))
            total += float(nll.sum())
            count += nll.size
    finally:
        llama_cpp.llama_batch_free(batch)
    return total / count
