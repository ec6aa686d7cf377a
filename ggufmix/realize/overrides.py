"""A Plan as llama.cpp tensor-type overrides: anchored, escaped regexes, one per quantized tensor."""
from __future__ import annotations

import re
from collections import Counter

from ggufmix.plan.plan import Plan
from ggufmix.types import FileType, QuantType, default_file_type


def tensor_pattern(name: str) -> str:
    """The regex that matches exactly this tensor name and no other (llama.cpp regex_searches)."""
    return f"^{re.escape(name)}$"


def overrides(plan: Plan) -> list[tuple[str, QuantType]]:
    """(pattern, type) for every quantized tensor, in plan order."""
    return [(tensor_pattern(e.name), e.qtype) for e in plan.quantized()]


def base_ftype(plan: Plan) -> int:
    """The llama_ftype recorded in the file: the one of the type holding most bytes (quantized).

    It only labels the file (general.file_type): every quantized tensor gets an override."""
    by_bytes: Counter[QuantType] = Counter()
    for e in plan.quantized():
        by_bytes[e.qtype] += e.bytes
    for qtype, _ in by_bytes.most_common():
        ftype = default_file_type(qtype)
        if ftype is not None:
            return ftype
    return FileType.MOSTLY_Q8_0


def recipe(plan: Plan) -> str:
    """A file ``llama-quantize --tensor-type-file`` accepts: one ``pattern=type`` per line."""
    lines = [f"{pat}={t.name.lower()}" for pat, t in overrides(plan)]
    return "\n".join(lines) + "\n"
