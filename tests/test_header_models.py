"""scripts/header_models.py against llama.cpp's converter: the header generator, run on the config.json of a tiny
random folder of each architecture it writes (Llama 3.1, Qwen3-MoE, DeepSeek-V2 and -V3), must give exactly the
tensors (names, shapes, types) and the ``{arch}.*`` keys that ``convert_hf_to_gguf.py --outtype bf16`` writes for
that folder; and llama.cpp must size the generated header's buffers as it sizes the converted model's.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from scriptload import load_script

from ggufmix.engine.buffers import measure_buffers, simulate_buffers
from ggufmix.io.gguf_index import read_index
from ggufmix.io.gguf_source import open_gguf
from ggufmix.ship.devices import ModelShape, kv_cache_bytes
from ggufmix.types import QuantType

HALF_LOGGED_DIGIT = 0.005 * (1 << 20) + 1  # llama.cpp prints MiB with two decimals




def tensors(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    return {t.name: (t.shape, QuantType(t.type_id).name) for t in read_index(path).tensors}


def arch_keys(path: Path) -> dict[str, Any]:
    meta = read_index(path).metadata
    arch = meta["general.architecture"]
    return {k: v for k, v in meta.items() if k.startswith(f"{arch}.")}


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script("header_models.py")


@pytest.mark.parametrize("family", ["llama31", "qwen3_moe", "deepseek_v2", "deepseek_v3"])
def test_generator_writes_what_the_converter_writes(family: str, script: ModuleType, converter: Any,
                                                    gpt2_vocab: Path, tmp_path: Path) -> None:
    from tinyhf import write_tiny_hf

    from ggufmix.io.llamacpp_src import run_converter

    folder = write_tiny_hf(tmp_path / family, family, seed=3, bpe_vocab=gpt2_vocab)
    converted = tmp_path / "converted.gguf"
    run_converter(converter, folder, converted, "bf16", progress=False)
    model = script.HeaderModel.from_config(json.loads((folder / "config.json").read_text()))
    header = tmp_path / "header.gguf"
    script.write_header(header, model)

    assert tensors(header) == tensors(converted)
    assert arch_keys(header) == arch_keys(converted)
    assert open_gguf(header, check_data=False).header_only

    # llama.cpp sizes the generated header's graph as the converted model's, and the KV arithmetic (MLA: the
    # latent K only) matches what it allocates for the converted model
    real = measure_buffers(converted, n_ctx=1024, n_ubatch=128)
    sized = simulate_buffers(header, n_ctx=1024, n_ubatch=128)
    assert (sized.compute, sized.output) == (real.compute, real.output)
    shape = ModelShape.from_metadata(open_gguf(converted).metadata)
    assert shape.mla == family.startswith("deepseek")
    assert abs(kv_cache_bytes(shape, 1024) - real.kv) <= HALF_LOGGED_DIGIT


def test_published_configs(script: ModuleType) -> None:
    """The three big models' headers: block counts, experts and the tensors that set their sizes."""
    shapes = {k: script.tensor_shapes(script.HeaderModel.from_config(c)) for k, c in script.CONFIGS.items()}
    ds = shapes["deepseek-v3"]
    assert sum(1 for n in ds if n.endswith("ffn_up_exps.weight")) == 58 and "blk.2.ffn_up.weight" in ds
    assert ds["blk.3.ffn_up_exps.weight"] == (256, 2048, 7168) and ds["blk.3.exp_probs_b.bias"] == (256,)
    assert ds["blk.60.attn_k_b.weight"] == (128, 512, 128) and "blk.61.attn_norm.weight" not in ds  # no MTP layer
    assert shapes["qwen3-235b"]["blk.93.ffn_down_exps.weight"] == (128, 4096, 1536)
    assert shapes["llama-405b"]["rope_freqs.weight"] == (64,) and "blk.125.attn_k.weight" in shapes["llama-405b"]
    billions = {k: sum(_n(s) for s in v.values()) / 1e9 for k, v in shapes.items()}
    assert round(billions["deepseek-v3"]) == 671 and round(billions["qwen3-235b"]) == 235
    assert round(billions["llama-405b"]) == 406


def _n(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
