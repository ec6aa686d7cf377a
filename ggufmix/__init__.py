"""ggufmix: a llama.cpp GGUF whose every tensor gets its own quantization type, to a size budget.

Importing the package stays lean: llama_cpp and torch are imported only inside ``ggufmix.engine``
when a command needs them.
"""
from __future__ import annotations

from ggufmix.errors import GgufmixError

__version__ = "0.1.0"

__all__ = ["GgufmixError", "__version__"]
