#!/usr/bin/env python3
"""Regenerate tests/golden/*.Modelfile from tests/golden_inputs.py (never edit the golden files by hand).

    python scripts/regen_golden.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from golden_inputs import CASES  # noqa: E402

from ggufmix.ship.modelfile import modelfile  # noqa: E402

for name, (template, kw) in CASES.items():
    path = ROOT / "tests" / "golden" / f"{name}.Modelfile"
    path.write_text(modelfile("model.gguf", template, **kw))
    print(f"wrote {path.relative_to(ROOT)}")
