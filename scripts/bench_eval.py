#!/usr/bin/env python3
"""Throughput of ``ggufmix eval`` against a plain llama-cpp-python forward pass of the same chunks.

    python scripts/bench_eval.py BASE.gguf QUANT.gguf --text eval.txt [--chunks 10] [--ctx 512]

The plain pass is what any evaluation must pay: ``Llama(logits_all=True).eval(chunk)`` for each
chunk, with BOS first like llama-perplexity. ``ggufmix eval`` runs the quantized model against the
base's cached top-k logits (the cache is filled by a first, untimed call), so its time is the
forward pass plus the log-softmax and KLD math. Target (issue 3): within 1.3x of the plain pass.
Prints a table; nothing here is a timed test.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from ggufmix.evaluate.evaluation import evaluate
from ggufmix.io.text import read_text


def plain_forward(model: Path, text: str, ctx: int, chunks: int, threads: int) -> float:
    """Seconds for llama-cpp-python to run ``chunks`` chunks of ``ctx`` tokens with logits for every token."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=threads,
                n_threads_batch=threads)
    tokens = llm.tokenize(text.encode(), add_bos=True, special=False)
    bos = llm.token_bos()
    t0 = time.perf_counter()
    for i in range(chunks):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        chunk[0] = bos
        llm.reset()
        llm.eval(chunk)
        np.asarray(llm.scores[: len(chunk)]).sum()  # touch the logits like any consumer would
    seconds = time.perf_counter() - t0
    llm.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("base", type=Path)
    ap.add_argument("quant", type=Path)
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()
    threads = os.cpu_count() or 1
    text = read_text(args.text)
    evaluate(args.base, [], text, ctx=args.ctx, chunks=args.chunks, progress=False)  # fills the base cache
    t0 = time.perf_counter()
    rep = evaluate(args.base, [args.quant], text, ctx=args.ctx, chunks=args.chunks, progress=False)
    ours = time.perf_counter() - t0
    plain = plain_forward(args.quant, text, args.ctx, args.chunks, threads)
    tp = rep.quants[0].throughput
    n = args.chunks * args.ctx
    print(f"model {args.quant.name}, {args.chunks} x {args.ctx} tokens, {threads} threads; "
          f"base cache {'hit' if rep.settings.cache_hit else 'miss'}")
    print("| pass | seconds | tokens/s | x plain |")
    print("|---|---|---|---|")
    for name, sec in (("plain llama-cpp-python forward (logits_all)", plain),
                      ("ggufmix eval, whole call (load + forward + KLD)", ours),
                      ("ggufmix eval, forward only", tp.decode_s),
                      ("ggufmix eval, log-softmax + metrics only", tp.math_s)):
        print(f"| {name} | {sec:.2f} | {n / sec:.0f} | {sec / plain:.2f} |")


if __name__ == "__main__":
    main()
