#!/usr/bin/env python3
"""How much of a quantized file's KLD comes from llama.cpp's CPU backend rounding each matmul's input, not
from the weights.

    python scripts/bench_activation_rounding.py BASE.gguf QUANT.gguf [QUANT.gguf ...] --text eval.txt \
        [--chunks 4] [--tmp DIR]

On the CPU backend a quantized weight's matrix multiplication rounds its input to 8 bits first (ggml-cpu.c,
``vec_dot_type``): in blocks of 256 values for the K and IQ types (Q8_K), of 32 for Q4_0..Q8_0 and IQ4_NL (Q8_0,
Q8_1). An F16 weight takes its input in F16. Each QUANT's tensors, dequantized by ggml (any type llama.cpp
writes, Q2_0 included), go into a copy of BASE in BASE's own float types (in ``--tmp``, removed afterwards), and
both files are scored against BASE on the same tokens: the difference is what the input rounding costs. Prints a
table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ggufmix.engine.kernels import dequantize_rows
from ggufmix.engine.oracle import from_float32
from ggufmix.errors import GgufmixError, InputError
from ggufmix.evaluate.evaluation import evaluate
from ggufmix.io.gguf_source import GGUFSource, TensorInfo, open_gguf, writable_tensors
from ggufmix.io.text import read_text
from ggufmix.types import FLOAT_TYPES


@dataclass(frozen=True)
class Row:
    """One quantized file: its mean KLD as llama.cpp's CPU backend runs it, the same weights' in F16, and the
    paired difference (F16 minus file) with its standard error."""

    name: str
    file_kld: float
    f16_kld: float
    difference: float
    stderr: float

    @property
    def rounding_share(self) -> float:
        """The file's KLD that the input rounding accounts for."""
        return -self.difference / self.file_kld if self.file_kld > 0 else 0.0


def measure(base: Path, quant: Path, text: str, *, chunks: int | None, ctx: int, tmp: Path | None) -> Row:
    """Score ``quant`` and its F16 copy against ``base`` on the same tokens."""
    with tempfile.TemporaryDirectory(dir=tmp) as d:
        f16 = Path(d) / f"{quant.stem}.f16.gguf"
        weights_in_float(base, quant, f16)
        report = evaluate(base, [quant, f16], text, ctx=ctx, chunks=chunks)
    file_kld, f16_kld = (q.divergence.kld.value for q in report.quants)
    (_, paired), = report.kld_against_first()
    return Row(quant.name, file_kld, f16_kld, paired.value, paired.stderr)


def weights_in_float(base: Path, quant: Path, dest: Path) -> None:
    """``dest``: a copy of ``base`` holding ``quant``'s values, each tensor stored in ``base``'s float type.

    Raises:
        InputError: a tensor of ``quant`` that ``base`` does not hold as a float tensor of the same shape.
    """
    src = open_gguf(quant)
    shutil.copyfile(base, dest)
    with writable_tensors(dest) as out:
        for name, info in src.tensors.items():
            into, raw = out.get(name, (None, None))
            if into is None or into.shape != info.shape or into.qtype not in FLOAT_TYPES:
                raise InputError(f"{quant}: tensor {name!r} is not a float tensor of shape {list(info.shape)} in "
                                 f"{base}")
            raw[:] = from_float32(_values(src, info), into.qtype)


def _values(src: GGUFSource, info: TensorInfo) -> np.ndarray:
    """A tensor's values as float32: float types as ``rows`` reads them, quantized types through ggml's own
    dequantizer (``rows`` goes through gguf-py, which lacks Q2_0)."""
    if info.qtype in FLOAT_TYPES:
        return src.rows(info.name)
    return dequantize_rows(src.read_into(info.name, 0, info.nrows, np.empty(info.n_bytes, np.uint8)), info.qtype,
                           info.ncols)


def table(rows: list[Row]) -> str:
    lines = ["| file | KLD (CPU) | KLD (weights in F16) | F16 - CPU (paired) | input rounding's share |",
             "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {r.file_kld:.5f} | {r.f16_kld:.5f} | {r.difference:+.5f} ± {r.stderr:.5f} | "
              f"{r.rounding_share:.0%} |" for r in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the float GGUF the files were made from")
    p.add_argument("quants", type=Path, nargs="+", help="quantized GGUFs")
    p.add_argument("--text", type=Path, required=True, help="evaluation text")
    p.add_argument("--chunks", type=int, default=None, help="512-token chunks to score (default: all)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk")
    p.add_argument("--tmp", type=Path, default=None, help="where the F16 copies go (one at a time)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        text = read_text(args.text)
        rows = [measure(args.base, q, text, chunks=args.chunks, ctx=args.ctx, tmp=args.tmp) for q in args.quants]
    except (GgufmixError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
