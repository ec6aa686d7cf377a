"""A Plan as llama.cpp tensor-type overrides: anchored, escaped regexes, one per quantized tensor."""
from __future__ import annotations

import re
from collections import Counter

from ggufmix.plan.plan import Plan
from ggufmix.types import QuantType

# llama_ftype whose default type is each tensor type (llama_ftype_get_default_type, llama-quant.cpp).
# The base ftype only labels the file (general.file_type): every quantized tensor gets an override.
FTYPE_FOR_TYPE: dict[QuantType, int] = {
    QuantType.Q4_0: 2, QuantType.Q4_1: 3, QuantType.Q8_0: 7, QuantType.Q5_0: 8, QuantType.Q5_1: 9,
    QuantType.Q2_K: 10, QuantType.Q3_K: 12, QuantType.Q4_K: 15, QuantType.Q5_K: 17, QuantType.Q6_K: 18,
    QuantType.IQ2_XXS: 19, QuantType.IQ2_XS: 20, QuantType.IQ3_XXS: 23, QuantType.IQ1_S: 24,
    QuantType.IQ4_NL: 25, QuantType.IQ3_S: 26, QuantType.IQ2_S: 28, QuantType.IQ4_XS: 30,
    QuantType.IQ1_M: 31, QuantType.Q2_0: 41,
}
FTYPE_Q8_0 = 7


def tensor_pattern(name: str) -> str:
    """The regex that matches exactly this tensor name and no other (llama.cpp regex_searches)."""
    return f"^{re.escape(name)}$"


def overrides(plan: Plan) -> list[tuple[str, QuantType]]:
    """(pattern, type) for every quantized tensor, in plan order."""
    return [(tensor_pattern(e.name), e.qtype) for e in plan.quantized()]


def base_ftype(plan: Plan) -> int:
    """The llama_ftype recorded in the file: the one of the type holding most bytes (quantized)."""
    by_bytes: Counter[QuantType] = Counter()
    for e in plan.quantized():
        by_bytes[e.qtype] += e.bytes
    for qtype, _ in by_bytes.most_common():
        if qtype in FTYPE_FOR_TYPE:
            return FTYPE_FOR_TYPE[qtype]
    return FTYPE_Q8_0


def recipe(plan: Plan) -> str:
    """A file ``llama-quantize --tensor-type-file`` accepts: one ``pattern=type`` per line."""
    lines = [f"{pat}={t.name.lower()}" for pat, t in overrides(plan)]
    return "\n".join(lines) + "\n"
