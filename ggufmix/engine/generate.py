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
    meta = dict(model.metadata)
    arch = meta.get("general.architecture", "")
    if meta.get(f"{arch}.attention.causal") == "false":  # an encoder (BERT ...): it embeds, never generates
        model.close()
        return _embed_smoke(path, prompt, n_threads, label, f"{arch}.pooling_type" in meta)
    try:
        out = model.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, top_k=1)
        return str(out["choices"][0]["text"])
    except (ValueError, RuntimeError) as e:
        raise EngineError(f"{label or path}: llama.cpp could not generate with it ({e}): {last_error()}") from None
    finally:
        model.close()



def _embed_smoke(path: str | os.PathLike[str], prompt: str, n_threads: int | None, label: str | None,
                 has_pooling: bool) -> str:
    """An embedding model's smoke test: embed ``prompt`` (mean pooling unless the file names its own)."""
    import math

    lib = llama()
    try:
        model = lib.Llama(model_path=str(path), n_ctx=256, n_threads=n_threads, verbose=False, embedding=True,
                          pooling_type=-1 if has_pooling else 1)
    except (ValueError, RuntimeError):
        raise EngineError(f"{label or path}: llama.cpp could not load it for embeddings: {last_error()}") from None
    try:
        vec = [float(x) for x in model.embed(prompt)]
    except (ValueError, RuntimeError) as e:
        raise EngineError(f"{label or path}: llama.cpp could not embed with it ({e}): {last_error()}") from None
    finally:
        model.close()
    norm = math.sqrt(sum(x * x for x in vec))
    if not math.isfinite(norm) or norm == 0:
        raise EngineError(f"{label or path}: llama.cpp embedded the smoke prompt to a zero or non-finite vector")
    return f"embedding: {len(vec)} values, norm {norm:.3f}"
