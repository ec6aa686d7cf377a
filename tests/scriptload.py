"""Import a file of scripts/ as a module, for the tests of the scripts that are not part of the package."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(filename: str) -> ModuleType:
    """``scripts/FILENAME`` as a module named after it (``header_models.py`` -> ``header_models_script``)."""
    spec = importlib.util.spec_from_file_location(f"{Path(filename).stem}_script", SCRIPTS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module
