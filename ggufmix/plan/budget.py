"""Budgets: bits per weight (llama.cpp's definition) or a size in bytes of tensor data."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ggufmix.errors import UsageError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bpw|b|kb|mb|gb|kib|mib|gib)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """``bpw``: all tensor bytes x 8 / all elements (llama.cpp); ``rule``: no size, the strategy's own
    decision rule (EWQ's tiers); otherwise bytes of all tensor data. ``at_most``: a ceiling (a device's memory,
    ``--fit``) rather than a target: a model whose largest file is smaller gets its largest file."""

    value: float
    unit: str
    at_most: bool = False

    def __post_init__(self) -> None:
        if self.value <= 0 or self.unit not in {"bpw", "rule", *_UNITS}:
            raise UsageError(f"budget must be a positive size or bpw, got {self.value}{self.unit}")

    @property
    def is_rule(self) -> bool:
        return self.unit == "rule"

    def to_bytes(self, total_elements: int) -> int:
        if self.is_rule:
            raise ValueError("a rule budget has no size")
        if self.unit == "bpw":
            return int(self.value * total_elements // 8)
        return int(self.value * _UNITS[self.unit])

    def __str__(self) -> str:
        if self.unit == "b":
            return f"{int(self.value)}B"
        if self.is_rule:
            return "rule"
        return f"{self.value:g}{self.unit if self.unit == 'bpw' else self.unit.upper().replace('I', 'i')}"


def parse_budget(text: str) -> Budget:
    """``'3.0bpw'``, ``'90MB'``, ``'1.5GiB'``, ``'123456789B'``, ``'rule'`` -> Budget.

    Raises:
        UsageError: anything else.
    """
    if text.strip().lower() == "rule":
        return RULE
    m = _RE.match(text)
    if not m:
        raise UsageError(f"budget {text!r}: use bits per weight (3.0bpw), a size (90MB, 85MiB, 1.2GB, 1GiB) "
                         "or 'rule' (the strategy's own decision: ewq, ewq-norm, fastewq)")
    return Budget(float(m.group(1)), m.group(2).lower())


RULE = Budget(1.0, "rule")


def bpw(total_bytes: int, total_elements: int) -> float:
    """llama.cpp's bits per weight."""
    return total_bytes * 8.0 / total_elements
