#!/usr/bin/env python3
"""How much of ``build --gptq``'s lower output error holds on calibration text the feedback did not see.

    python scripts/bench_gptq_heldout.py SOURCE.gguf --calib calib.txt \
        --weights blk.10.attn_q.weight=Q5_1,blk.10.ffn_down.weight=Q5_K [--chunks 32] [--held-out 16] \
        [--held-out-text other.txt]

The text is cut in two. The first half's 512-token chunks (``--chunks``) give each weight's input matrix ``H``,
from which the feedback is made (realize/gptq.py, as the build makes it, with ``H``'s diagonal as the imatrix);
the second half's (``--held-out``) give another. With ``--held-out-text`` the feedback comes from the whole of
``--calib`` and the held-out chunks from that text instead: a calibration text put together from several kinds
(web pages, then prose, then code) holds out another kind in its second half, and the feedback keeps less of its
gain on another kind of text than on more of the same (docs/results.md). For each weight the table holds the
output error of the compensated rounding over plain rounding's, on the fitted chunks' inputs (what the build
reports) and on the held-out chunks'. Weights with many rows are sampled (``--rows``, evenly spaced; rows are
independent given ``H``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufmix.engine.covariance import collect_covariances
from ggufmix.engine.oracle import quant_roundtrip
from ggufmix.errors import GgufmixError, InputError
from ggufmix.io.gguf_source import open_gguf
from ggufmix.io.text import read_text
from ggufmix.realize.compensate import evenly_spaced_rows
from ggufmix.realize.gptq import compensate, feedback_steps, inverse_factor, output_error
from ggufmix.types import FLOAT_TYPES, QuantType, block_size, fits, parse_type


@dataclass(frozen=True)
class Row:
    """One weight: compensated over plain output error on the inputs the feedback came from and on others."""

    name: str
    qtype: QuantType
    in_sample: float
    held_out: float


def read_weights(source: Path, wanted: dict[str, QuantType], rows: int) -> dict[str, np.ndarray]:
    """The float weights named in ``wanted``, (rows, cols) float32, at most ``rows`` evenly spaced rows each.

    Raises:
        InputError: a weight is missing, not F32/F16/BF16, or its rows do not split into the type's blocks.
    """
    src = open_gguf(source)
    out = {}
    for name, qtype in wanted.items():
        info = src.tensors.get(name)
        if info is None:
            raise InputError(f"{source}: no tensor {name!r}")
        if info.qtype not in FLOAT_TYPES:
            raise InputError(f"{source}: {name!r} is {info.qtype.name}; the feedback starts from F32, F16 or BF16")
        if not fits(qtype, info.ncols):
            raise InputError(f"{name!r}: {qtype.name} does not fit rows of {info.ncols}")
        out[name] = src.rows(name, evenly_spaced_rows(info.nrows, rows))
    return out


def ratios(w: np.ndarray, qtype: QuantType, fit: np.ndarray, held: np.ndarray) -> tuple[float, float]:
    """Compensated over plain output error of ``w`` rounded to ``qtype``, on ``fit``'s inputs and ``held``'s."""
    im = np.ascontiguousarray(np.diagonal(fit), dtype=np.float32)
    block = block_size(qtype)

    def roundtrip(x: np.ndarray, cols: slice) -> np.ndarray:
        return quant_roundtrip(np.ascontiguousarray(x), qtype, im[cols][None, :])

    plain = quant_roundtrip(w, qtype, im[None, :])
    comp = quant_roundtrip(compensate(w, feedback_steps(inverse_factor(fit), block), block, roundtrip),
                           qtype, im[None, :])
    return tuple(output_error(w, comp, h) / max(output_error(w, plain, h), 1e-30) for h in (fit, held))


def fitted_and_held_out(calib: str, held_out_text: str | None) -> tuple[str, str]:
    """The text the feedback comes from and the one it is held out on: ``calib``'s halves, or ``calib`` whole and
    ``held_out_text``."""
    if held_out_text is not None:
        return calib, held_out_text
    half = len(calib) // 2
    return calib[:half], calib[half:]


def measure(source: Path, texts: tuple[str, str], wanted: dict[str, QuantType], *, chunks: int, held_out: int,
            ctx: int, rows: int) -> list[Row]:
    """Input matrices from the fitted text and the held-out one (``fitted_and_held_out``), then each weight's two
    ratios."""
    weights = read_weights(source, wanted, rows)
    fit = collect_covariances(source, texts[0], list(wanted), n_ctx=ctx, n_chunks=chunks)
    held = collect_covariances(source, texts[1], list(wanted), n_ctx=ctx, n_chunks=held_out)
    return [Row(name, qtype, *ratios(weights[name], qtype, fit.of(name), held.of(name)))
            for name, qtype in wanted.items()]


def table(rows: list[Row]) -> str:
    lines = ["| weight | type | compensated / plain, fitted chunks | held-out chunks |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {r.qtype.name} | {r.in_sample:.3f} | {r.held_out:.3f} |" for r in rows]
    return "\n".join(lines)


def parse_weights(spec: str) -> dict[str, QuantType]:
    """``name=TYPE,name=TYPE`` -> {name: type}; ValueError naming the part that is not."""
    out = {}
    for part in filter(None, spec.split(",")):
        name, sep, qtype = part.partition("=")
        if not sep or not name:
            raise ValueError(f"--weights: {part!r} is not NAME=TYPE")
        out[name] = parse_type(qtype)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="the float GGUF (F32/F16/BF16)")
    p.add_argument("--calib", type=Path, required=True, help="calibration text, cut in two halves "
                   "(whole with --held-out-text)")
    p.add_argument("--weights", required=True, help="NAME=TYPE[,NAME=TYPE...]")
    p.add_argument("--chunks", type=int, default=32, help="chunks the feedback comes from (of the first half)")
    p.add_argument("--held-out", type=int, default=16, help="held-out chunks "
                   "(of the second half, or of --held-out-text)")
    p.add_argument("--held-out-text", type=Path, help="hold out on this text's chunks; "
                   "the feedback from all of --calib")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    p.add_argument("--rows", type=int, default=4096, help="rows of each weight at most")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wanted = parse_weights(args.weights)
        held_out_text = read_text(args.held_out_text) if args.held_out_text else None
        texts = fitted_and_held_out(read_text(args.calib), held_out_text)
        rows = measure(args.source, texts, wanted, chunks=args.chunks, held_out=args.held_out, ctx=args.ctx,
                       rows=args.rows)
    except (GgufmixError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
