from __future__ import annotations

import sys
import tarfile
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


@pytest.fixture(scope="session")
def converter():  # noqa: ANN201 - ggufmix.io.llamacpp_src.Converter, imported here: the HF tests need it only
    """The real converter for the installed llama-cpp-python (downloaded on the first run only)."""
    from ggufmix.io.llamacpp_src import locate_converter

    return locate_converter()


@pytest.fixture
def converter_cache(tmp_path: Path, converter, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: ANN001
    """A fresh GGUFMIX_CACHE that already holds the converter, as it would after first use."""
    root = tmp_path / "cache"
    root.mkdir()
    if not converter.version.startswith("checkout:"):
        (root / converter.root.name).symlink_to(converter.root)
    monkeypatch.setenv("GGUFMIX_CACHE", str(root))
    return root


VOCAB = "ggml-vocab-gpt-2.gguf"


@pytest.fixture(scope="session")
def gpt2_vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's own GPT-2 vocabulary file (tokens + merges), from a checkout or llama-cpp-python's source package:
    the tokenizer of tinyhf's BPE families (the MoE and header-model tests)."""
    pytest.importorskip("transformers")
    from ggufmix.io.llamacpp_src import SDIST_SUBDIR, download_sdist, llama_cpp_python_version, locate_converter

    conv = locate_converter()
    if (conv.root / "models" / VOCAB).is_file():
        return conv.root / "models" / VOCAB
    tmp = tmp_path_factory.mktemp("sdist")
    sdist = download_sdist(llama_cpp_python_version(), tmp)
    with tarfile.open(sdist, "r:gz") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f"{SDIST_SUBDIR}/models/{VOCAB}"))
        member.name = VOCAB
        tar.extractall(tmp, members=[member], filter="data")
    return tmp / VOCAB
