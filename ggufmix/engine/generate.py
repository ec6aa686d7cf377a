"""Load a GGUF with llama.cpp and generate a few tokens: the build's smoke test."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ggufmix.engine.llamalib import last_error, llama
from ggufmix.errors import EngineError


def smoke_test(path: str | os.PathLike[str], prompt: str = "The capital of France is", n_tokens: int = 16,
               n_threads: int | None = None, label: str | None = None, extra_buffers: bool = True) -> str:
    """Greedy continuation of ``prompt``; errors name ``label`` (default: the path).

    ``extra_buffers=False`` loads the weights without the CPU backend's extra buffer types (AMX, repacked
    layouts), as ``llama-cli --no-repack`` does.

    Raises:
        EngineError: llama.cpp could not load or run the file.
    """
    lib = llama()
    try:
        with _extra_buffers(lib, extra_buffers):
            model = lib.Llama(model_path=str(path), n_ctx=256, n_threads=n_threads, verbose=False, seed=0)
    except (ValueError, RuntimeError):
        raise EngineError(f"{label or path}: llama.cpp could not load it: {last_error()}") from None
    try:
        out = model.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, top_k=1)
        return str(out["choices"][0]["text"])
    except (ValueError, RuntimeError) as e:
        raise EngineError(f"{label or path}: llama.cpp could not generate with it ({e}): {last_error()}") from None
    finally:
        model.close()


@contextlib.contextmanager
def _extra_buffers(lib: Any, on: bool) -> Iterator[None]:
    """``llama_model_params.use_extra_bufts`` for the models loaded inside: ``Llama`` takes no argument for it,
    and builds its parameters from ``llama_model_default_params``, which is wrapped here for the while."""
    if on:
        yield
        return
    low = lib.llama_cpp
    default = low.llama_model_default_params

    def params() -> Any:
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default
