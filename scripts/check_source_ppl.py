#!/usr/bin/env python3
"""Quick perplexity check of a GGUF model with llama-cpp-python, the way llama-perplexity does it.

The text is tokenized once; chunk i is tokens [i*n_ctx, (i+1)*n_ctx), evaluated from an empty KV
cache, with its first token replaced by BOS; only the second half of each chunk is scored (the
logits at positions n_ctx/2 .. n_ctx-2 against the next token), so every scored token has at least
n_ctx/2 tokens of context. This mirrors perplexity() in llama.cpp tools/perplexity/perplexity.cpp,
which only inserts BOS where the vocabulary asks for one (``--bos auto``, the default); ``--bos
always`` forces it, as many reference scripts do.

Usage:
    python scripts/check_source_ppl.py MODEL.gguf TEXT [--chunks 4] [--ctx 512] [--bos auto]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("check_source_ppl")


@dataclass(frozen=True)
class PplResult:
    """Perplexity over ``n_scored`` tokens in ``n_chunks`` chunks, and per-chunk running values."""

    ppl: float
    n_chunks: int
    n_scored: int
    running: tuple[float, ...]


def chunk_nll(logits: np.ndarray, tokens: np.ndarray, first: int) -> np.ndarray:
    """Negative log-likelihood of tokens[first+1:] given the logits at positions first..n-2.

    Args:
        logits: (n_ctx, n_vocab) logits of one chunk.
        tokens: (n_ctx,) token ids of the chunk as evaluated.
        first: first scored logit position (n_ctx // 2 in llama-perplexity).

    Returns:
        float64 array of n_ctx - 1 - first NLL values.
    """
    rows = logits[first:-1].astype(np.float64)
    targets = tokens[first + 1 :]
    peak = rows.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return log_z - rows[np.arange(len(targets)), targets]


def chunk_tokens(tokens: list[int], n_ctx: int, n_chunks: int) -> list[np.ndarray]:
    """Split tokens into ``n_chunks`` consecutive chunks of ``n_ctx`` tokens.

    Raises:
        ValueError: the text is too short for even one chunk.
    """
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"{len(tokens)} tokens are fewer than one chunk of {n_ctx}; use more text")
    if n_chunks > available:
        logger.warning("only %d chunks of %d tokens in the text; using those", available, n_ctx)
    n = min(n_chunks, available)
    return [np.array(tokens[i * n_ctx : (i + 1) * n_ctx], dtype=np.int64) for i in range(n)]


def perplexity(model: Path, text: str, n_ctx: int = 512, n_chunks: int = 4, bos: str = "auto") -> PplResult:
    """Perplexity of ``model`` on ``text``, llama-perplexity style (see the module docstring).

    Args:
        model: a GGUF llama.cpp can load.
        text: evaluation text.
        n_ctx: chunk length and context size.
        n_chunks: chunks to score (fewer if the text is shorter).
        bos: "auto" (replace the first token by BOS iff the vocab adds BOS), "always" or "never".

    Returns:
        The perplexity and per-chunk running perplexities.
    """
    import llama_cpp  # heavy; only needed when actually evaluating

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False)
    vocab_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    use_bos = bos == "always" or (bos == "auto" and vocab_bos)
    logger.info("%s: vocab add_bos=%s, replacing first token by BOS: %s", model.name, vocab_bos, use_bos)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=use_bos, special=False)
    total, count, running = 0.0, 0, []
    for chunk in chunk_tokens(tokens, n_ctx, n_chunks):
        if use_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk.tolist())
        nll = chunk_nll(np.asarray(llm.scores[:n_ctx]), chunk, n_ctx // 2)
        total, count = total + float(nll.sum()), count + len(nll)
        running.append(math.exp(total / count))
        logger.info("chunk %d: running ppl %.4f", len(running), running[-1])
    return PplResult(ppl=running[-1], n_chunks=len(running), n_scored=count, running=tuple(running))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path, help="GGUF model")
    p.add_argument("text", type=Path, help="UTF-8 evaluation text")
    p.add_argument("--chunks", type=int, default=4, help="chunks of --ctx tokens (default 4)")
    p.add_argument("--ctx", type=int, default=512, help="context / chunk length (default 512)")
    p.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                   help="replace each chunk's first token by BOS (default auto: as the vocab says)")
    p.add_argument("-v", "--verbose", action="store_true", help="log running perplexity per chunk")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.chunks < 1 or args.ctx < 4:
        print("error: --chunks must be >= 1 and --ctx >= 4", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        text = args.text.read_text(encoding="utf-8")
        result = perplexity(args.model, text, n_ctx=args.ctx, n_chunks=args.chunks, bos=args.bos)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    print(f"{args.model.name}: ppl {result.ppl:.4f} over {result.n_chunks} x {args.ctx} tokens "
          f"({result.n_scored} scored, bos={args.bos}) in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
