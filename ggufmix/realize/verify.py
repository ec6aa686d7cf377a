"""Read the written GGUF back and hold it to the plan: every type, every byte."""
from __future__ import annotations

import os
from dataclasses import dataclass

from ggufmix.errors import InputError, VerifyError
from ggufmix.io.gguf_source import open_gguf
from ggufmix.plan.budget import bpw
from ggufmix.plan.plan import Plan


@dataclass(frozen=True)
class Verified:
    n_tensors: int
    total_bytes: int
    bpw: float
    file_bytes: int


def verify(path: str | os.PathLike[str], plan: Plan) -> Verified:
    """Check that the file at ``path`` has exactly the plan's tensors, types and total bytes.

    Raises:
        VerifyError: a missing or extra tensor, a type that fell back, or a size difference.
    """
    try:
        out = open_gguf(path)
    except InputError as e:
        raise VerifyError(f"written file cannot be read back: {e}") from None
    want = plan.types()
    problems = [f"{n!r} is missing" for n in want if n not in out.tensors]
    problems += [f"{n!r} is not in the plan" for n in out.tensors if n not in want]
    problems += [f"{n!r} is {t.qtype.name}, planned {want[n].name}"
                 for n, t in out.tensors.items() if n in want and t.qtype != want[n]]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise VerifyError(f"{path}: differs from the plan: {'; '.join(problems[:3])}{more}")
    if out.total_bytes != plan.total_bytes:
        raise VerifyError(f"{path}: {out.total_bytes} bytes of tensor data, the plan says {plan.total_bytes}")
    return Verified(len(out.tensors), out.total_bytes, bpw(out.total_bytes, out.total_elements),
                    os.path.getsize(path))
