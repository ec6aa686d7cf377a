"""Load a GGUF with llama.cpp and generate a few tokens: the build's smoke test."""
from __future__ import annotations

import os

from ggufmix.engine.llamalib import last_error, llama
from ggufmix.errors import EngineError


def smoke_test(path: str | os.PathLike[str], prompt: str = "The capital of France is", n_tokens: int = 16,
               n_threads: int | None = None, label: str | None = None) -> str:
    """Greedy continuation of ``prompt``; errors name ``label`` (default: the path).

    Raises:
        EngineError: llama.cpp could not load or run the file.
    """
    lib = llama()
    try:
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
