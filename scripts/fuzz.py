#!/usr/bin/env python3
"""Fuzz ggufmix's GGUF reading: mutate the header and tensor index of a tiny valid GGUF, open the
mutant with ``inspect``, read rows and (``--score``) score it with ggml's quantizers; anything but a
GgufmixError is a finding. With ``--build``, every mutant that opens also goes through the whole
``ggufmix build`` command in a child process (llama.cpp itself reads it: quantize and the load/generate
smoke test); a finding is then a signal (a crash inside llama.cpp), a traceback or any stderr line but log
warnings and one final ``ggufmix: error:`` line, an unknown exit code, a file at the output path after a
failure, or a temporary file left behind.

    python scripts/fuzz.py [--cases 10000] [--seed 0] [--score | --build]

Prints the count and every distinct escape (exit status 1 if there was one). CI runs a few hundred
cases of the same idea (tests/test_fuzz_header.py, tests/test_fuzz_build.py).
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tinymodel import write_tiny_llama  # noqa: E402

from ggufmix.errors import GgufmixError  # noqa: E402
from ggufmix.inspect_gguf import inspect_gguf  # noqa: E402
from ggufmix.io.gguf_index import read_index  # noqa: E402
from ggufmix.io.gguf_source import open_gguf  # noqa: E402

BYTES = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF)


def mutate(data: bytes, index_start: int, header_end: int, rng: random.Random) -> bytes:
    """1-4 byte edits, 70% in the tensor index, the rest anywhere in the header; sometimes a cut."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(index_start, header_end) if rng.random() < 0.7 else rng.randrange(0, header_end)
        buf[pos] = rng.choice(BYTES) if rng.random() < 0.5 else rng.randrange(256)
    if rng.random() < 0.1:
        buf = buf[:rng.randrange(len(buf))]
    return bytes(buf)


def probe(path: Path, score: bool = False) -> None:
    """inspect, read rows, and with ``score`` the whole measured scoring (ggml's quantizers included)."""
    inspect_gguf(path)
    src = open_gguf(path)
    for name in list(src.tensors)[:4]:
        src.rows(name)
    if score:
        from ggufmix.score.measure import ScoreOptions, open_source, score_source

        score_source(open_source(path, False), ScoreOptions(max_rows=4, threads=1), None, progress=False)


EXIT_CODES = {0, 1, 2, 3, 4, 5, 6, 7}  # ggufmix.errors: success and each GgufmixError subclass


def build_finding(mutant: Path, out: Path) -> str | None:
    """Run ``ggufmix build`` on ``mutant`` in a child process; what went wrong, or None if it failed cleanly
    (or succeeded)."""
    import subprocess

    out.unlink(missing_ok=True)
    before = set(out.parent.iterdir())
    r = subprocess.run([sys.executable, "-m", "ggufmix", "build", str(mutant), "--budget", "6bpw", "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip().splitlines()
    left = {p.name for p in set(out.parent.iterdir()) - before if p.name.endswith(".tmp")}
    if r.returncode < 0:
        return f"killed by signal {-r.returncode}: {err[-1][:160] if err else ''}"
    if r.returncode not in EXIT_CODES:
        return f"exit code {r.returncode}: {err[-1][:160] if err else ''}"
    if left:
        return f"temporary files left: {sorted(left)}"
    if r.returncode == 0:
        for p in out.parent.glob(out.stem + ".*"):
            p.unlink()
        return None
    if out.exists():
        return f"exit {r.returncode} but {out.name} exists"
    errors = [ln for ln in err if ln.startswith("ggufmix: error: ")]
    others = [ln for ln in err if not ln.startswith(("ggufmix: error: ", "WARNING "))]  # log warnings may precede
    if len(errors) != 1 or err[-1] != errors[0] or others:
        return f"not one error line (exit {r.returncode}): {' | '.join(err)[-200:]}"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score", action="store_true", help="also run the measured scorer on every mutant that opens")
    ap.add_argument("--build", action="store_true", help="also run `ggufmix build` on every mutant that opens")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ggufmix-fuzz-"))
    seed_file = write_tiny_llama(work / "seed.gguf", n_layer=1, n_embd=64, n_ff=128, n_head=2, n_head_kv=1,
                                 n_vocab=300, seed=4)
    data, index = seed_file.read_bytes(), read_index(seed_file)
    rng = random.Random(args.seed)
    mutant = work / "mutant.gguf"
    escapes: dict[str, int] = {}
    refused = built = 0
    for i in range(args.cases):
        mutant.write_bytes(mutate(data, index.tensors_offset, index.data_offset, rng))
        try:
            probe(mutant, args.score)
        except GgufmixError:
            refused += 1
            continue
        except Exception as e:  # noqa: BLE001 - the point is to catch everything else
            escapes.setdefault(f"{type(e).__name__}: {str(e)[:160]}", i)
            continue
        if args.build:
            built += 1
            if (finding := build_finding(mutant, work / "out.gguf")) is not None:
                if finding not in escapes:
                    escapes[finding] = i
                    shutil.copy(mutant, work / f"case{i}.gguf")
    print(f"{args.cases} cases (seed {args.seed}): {refused} refused with a GgufmixError, "
          f"{args.cases - refused} opened{' and went through build' if args.build else ''}, "
          f"{len(escapes)} distinct escapes{f' (mutants kept in {work})' if escapes else ''}")
    for what, case in escapes.items():
        print(f"  case {case}: {what}")
    return 1 if escapes else 0


if __name__ == "__main__":
    sys.exit(main())
