from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import write_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 blocks, every row a multiple of 256: all K and IQ types apply."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.f16.gguf", n_layer=4, n_embd=256,
                            n_ff=512, n_vocab=512, seed=1)


@pytest.fixture(scope="session")
def odd_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rows of 320 (not a multiple of 256, like SmolLM2's 576): only 32/64-block types fit most tensors."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "odd.f16.gguf", n_layer=2, n_embd=320,
                            n_ff=512, n_head=4, n_head_kv=2, n_vocab=512, seed=2, tied=True)
