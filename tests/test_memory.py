"""KV-cache arithmetic against the buffer sizes llama.cpp itself logs, on tiny models."""
from __future__ import annotations

from pathlib import Path

import pytest

from tinymodel import header_only_copy

from ggufmix.engine.buffers import measure_buffers, parse_buffers, simulate_buffers
from ggufmix.errors import EngineError, UsageError
from ggufmix.io.gguf_source import open_gguf
from ggufmix.ship.devices import FitReport, ModelShape, kv_cache_bytes, kv_type, n_cells, resolve_fit
from ggufmix.ship.fit import FitSettings, fit_report

HALF_LOGGED_DIGIT = 0.005 * (1 << 20) + 1  # llama.cpp prints MiB with two decimals (6.375 -> "6.38")


@pytest.mark.parametrize("n_ctx", [100, 256, 700, 3000])
@pytest.mark.parametrize(("model", "kv"), [("odd_model", "f16"), ("tiny_model", "f16"), ("tiny_model", "q8_0"),
                                           ("tiny_model", "q4_0")])
def test_kv_cache_matches_llama_cpp(model: str, kv: str, n_ctx: int, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(model)  # odd_model: 2 KV heads of 80 (GQA); tiny_model: heads of 64
    shape = ModelShape.from_metadata(open_gguf(path).metadata)
    measured = measure_buffers(path, n_ctx=n_ctx, n_ubatch=64, kv_type=kv)
    assert abs(kv_cache_bytes(shape, n_ctx, kv_type(kv), kv_type(kv)) - measured.kv) <= HALF_LOGGED_DIGIT
    assert measured.compute > 0 and measured.model > 0


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tinymodel import write_tiny_gemma3

    return write_tiny_gemma3(tmp_path_factory.mktemp("swa") / "gemma3.gguf", n_layer=7, sliding_window=100)


@pytest.mark.parametrize(("n_ctx", "n_ubatch", "swa_full"), [(2048, 64, False), (2048, 64, True), (3000, 200, False),
                                                             (256, 64, False), (700, 512, False)])
def test_sliding_window_kv_cache_matches_llama_cpp(gemma3: Path, n_ctx: int, n_ubatch: int, swa_full: bool) -> None:
    """Gemma-3 layout (5 of 6 layers slide, window 100): llama_kv_cache_iswa's two caches, summed, both modes."""
    shape = ModelShape.from_metadata(open_gguf(gemma3).metadata)
    assert shape.swa_layers == (True,) * 5 + (False, True) and not shape.swa_unknown
    measured = measure_buffers(gemma3, n_ctx=n_ctx, n_ubatch=n_ubatch, swa_full=swa_full)
    computed = kv_cache_bytes(shape, n_ctx, n_ubatch=n_ubatch, swa_full=swa_full)
    assert abs(computed - measured.kv) <= 2 * HALF_LOGGED_DIGIT  # two logged buffers
    if not swa_full and n_ctx >= 2048:
        assert computed < kv_cache_bytes(shape, n_ctx, swa_full=True) / 3


def test_sliding_window_patterns() -> None:
    from ggufmix.ship.devices import swa_layers

    assert swa_layers("gemma2", 4, None) == (True, False, True, False)
    assert swa_layers("smallthinker", 5, None) == (False, True, True, True, False)  # dense first
    assert swa_layers("gemma3", 4, 2) == (True, False, True, False)  # a pattern key overrides the table
    assert swa_layers("gemma3", 3, [False, True, True]) == (False, True, True)
    assert swa_layers("mystery", 4, None) == ()
    meta = {"general.architecture": "mystery", "mystery.block_count": 2, "mystery.embedding_length": 64,
            "mystery.attention.head_count": 2, "mystery.attention.sliding_window": 32, "mystery.context_length": 512}
    shape = ModelShape.from_metadata(meta)
    assert shape.swa_unknown and kv_cache_bytes(shape, 512) == kv_cache_bytes(shape, 512, swa_full=True)


def test_shape_and_padding(tiny_model: Path) -> None:
    shape = ModelShape.from_metadata(open_gguf(tiny_model).metadata)
    assert (shape.n_layer, shape.n_embd) == (4, 256) and shape.key_length * shape.n_head == 256
    assert [n_cells(c, shape) for c in (1, 256, 257, 512)] == [256, 256, 512, 512]
    f16 = kv_cache_bytes(shape, 512)
    assert f16 == 512 * sum(2 * 2 * shape.key_length * kv for kv in shape.head_count_kv)
    assert kv_cache_bytes(shape, 512, kv_type("q8_0"), kv_type("q8_0")) == f16 * 34 // 64


def test_parse_buffers_sums_devices_and_refuses_silence() -> None:
    log = ("load_tensors:   CPU_Mapped model buffer size =    98.87 MiB\n"
           "load_tensors:   CPU_REPACK model buffer size =     7.59 MiB\n"
           "llama_kv_cache:        CPU KV buffer size =    45.00 MiB\n"
           "sched_reserve:        CPU compute buffer size =    98.25 MiB\n"
           "llama_context:        CPU  output buffer size =     0.19 MiB\n")
    b = parse_buffers(log, "x")
    assert b.model == round(106.46 * (1 << 20)) and b.kv == 45 * (1 << 20) and len(b.lines) == 5
    with pytest.raises(EngineError, match="no buffer sizes"):
        parse_buffers("nothing here", "x.gguf")


def test_fit_arithmetic_and_errors() -> None:
    dev = resolve_fit("rpi5-8gb")
    assert dev.usable_bytes == 6 << 30
    r = FitReport(resolve_fit("100MB"), 512, 64, "f16", 11 << 20, 13 << 20, 1 << 18, 4 << 20)
    assert r.weights_bytes == 100_000_000 - (28 << 20) - (1 << 18)
    assert r.lines()[-1].startswith("= weights budget")
    with pytest.raises(UsageError, match="not a size"):
        resolve_fit("toaster")
    with pytest.raises(UsageError, match="not bits per weight"):
        resolve_fit("4bpw")
    with pytest.raises(UsageError, match="KV cache takes"):
        kv_type("q2_k")


@pytest.mark.parametrize(("model", "n_ctx", "n_ubatch", "kv"), [("tiny_model", 512, 64, "f16"),
                                                                ("tiny_model", 3000, 512, "q8_0"),
                                                                ("odd_model", 700, 128, "f16")])
def test_header_only_buffers_are_llama_cpps(model: str, n_ctx: int, n_ubatch: int, kv: str, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    """llama.cpp's no_alloc sizing of the header alone gives the compute and output buffers it allocates when it
    loads the whole model (to the 0.01 MiB it logs), and the header-only file is what --fit then uses."""
    path = request.getfixturevalue(model)
    header = header_only_copy(path, tmp_path / "header.gguf")
    assert open_gguf(header, check_data=False).header_only and not open_gguf(path).header_only
    with pytest.raises(EngineError):
        measure_buffers(header, n_ctx=n_ctx, n_ubatch=n_ubatch, kv_type=kv)  # llama.cpp refuses the file itself
    real = measure_buffers(path, n_ctx=n_ctx, n_ubatch=n_ubatch, kv_type=kv)
    sized = simulate_buffers(header, n_ctx=n_ctx, n_ubatch=n_ubatch, kv_type=kv)
    assert (sized.compute, sized.output) == (real.compute, real.output) and sized.compute > 0
    assert sized.model == sized.kv == 0  # no_alloc allocates neither: the KV cache is ggufmix's arithmetic
    report = fit_report(header, None, FitSettings(resolve_fit("1GB"), n_ctx, n_ubatch, kv))
    assert (report.compute_bytes, report.output_bytes) == (real.compute, real.output)
    assert "no weights" in report.lines()[2]


def test_header_only_sliding_window_buffers(gemma3: Path, tmp_path: Path) -> None:
    header = header_only_copy(gemma3, tmp_path / "header.gguf")
    for swa_full in (False, True):
        real = measure_buffers(gemma3, n_ctx=2048, n_ubatch=64, swa_full=swa_full)
        sized = simulate_buffers(header, n_ctx=2048, n_ubatch=64, swa_full=swa_full)
        assert (sized.compute, sized.output) == (real.compute, real.output)
