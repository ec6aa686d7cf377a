"""Device enumeration through ggml's backend registry on the real installed llama.cpp (no fakes)."""
from __future__ import annotations

import os

import pytest

from ggufmix.engine.backends import list_devices, select_devices
from ggufmix.engine.isolated import run_child
from ggufmix.errors import EngineError


def test_cpu_device_is_found_with_plausible_memory() -> None:
    devices = list_devices()
    cpus = [d for d in devices if d.kind == "cpu"]
    assert cpus, f"no CPU device among {[d.name for d in devices]}"
    cpu = cpus[0]
    assert cpu.name.upper().startswith("CPU")
    assert cpu.description
    assert 256 << 20 < cpu.memory_total < 64 << 40
    assert 0 < cpu.memory_free <= cpu.memory_total


def test_select_cpu_and_refuse_missing_backend() -> None:
    assert [d.kind for d in select_devices("cpu")] == ["cpu"]
    have = {d.name.lower() for d in list_devices()}
    missing = next(n for n in ("metal", "cuda", "vulkan", "opencl") if not any(h.startswith(n) for h in have))
    with pytest.raises(EngineError, match=f"--backends {missing}"):
        select_devices(missing)


# --- ggufmix validate on the real CPU build --------------------------------------------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from click.testing import CliRunner  # noqa: E402

from ggufmix.cli import cli  # noqa: E402
from ggufmix.realize.build import build  # noqa: E402
from ggufmix.plan.budget import parse_budget  # noqa: E402
from ggufmix.score.measure import ScoreOptions  # noqa: E402
from ggufmix.ship.validate import format_table, validate  # noqa: E402
from ggufmix.types import QuantType  # noqa: E402


@pytest.fixture(scope="module")
def q5_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Q5_0/Q5_1: no CPU repacks them, so llama.cpp's buffers equal the tensor bytes and --fit's arithmetic is exact
    out = tmp_path_factory.mktemp("validate") / "tiny.q5.gguf"
    build(tiny_model, out, parse_budget("5.8bpw"), opts=ScoreOptions(max_rows=16),
          types=(QuantType.Q5_0, QuantType.Q5_1), smoke=False, progress=False)
    return out


def test_validate_cpu_row_against_reference(q5_model: Path, tiny_model: Path) -> None:
    rep = validate(q5_model, reference=tiny_model, n_ctx=512)
    assert [r.device for r in rep.rows][0].upper().startswith("CPU") and rep.mode == "logits"
    cpu = rep.rows[0]
    assert cpu.ok and cpu.moved == () and cpu.graph_splits == "1"
    assert cpu.vs_cpu is not None and cpu.vs_cpu.kld == pytest.approx(0.0, abs=1e-6) and cpu.vs_cpu.top1 == 1.0
    ref = cpu.vs_reference
    assert ref is not None and 0 < ref.kld < 1.0 and 0.3 < ref.top1 < 1.0 and ref.n > 100
    assert cpu.prompt_tps and cpu.prompt_tps > 0 and cpu.gen_tps and cpu.gen_tps > 0
    # llama.cpp's logged buffers against --fit's arithmetic (weights + KV + measured compute/output)
    assert cpu.allocated and cpu.predicted and abs(cpu.allocated - cpu.predicted) < 64 << 10
    assert "CPU" in format_table(rep)


def test_reference_of_the_file_itself_agrees_exactly(tiny_model: Path) -> None:
    rep = validate(tiny_model, reference=tiny_model, n_ctx=256)
    ref = rep.rows[0].vs_reference
    assert ref is not None and ref.kld == pytest.approx(0.0, abs=1e-6) and ref.top1 == 1.0


def test_broken_file_is_one_failed_row_and_exit_4(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    data = tiny_model.read_bytes()
    broken.write_bytes(data[: len(data) - len(data) // 3])  # the header is whole, the tensor data is cut
    res = CliRunner().invoke(cli, ["validate", str(broken), "--backends", "cpu"])
    assert res.exception is not None and getattr(res.exception, "exit_code", None) == 4, res.output
    assert "\n" not in str(res.exception) and "CPU" in str(res.exception)
    doc = json.loads((tmp_path / "broken.validate.json").read_text())
    assert doc["format"] == "ggufmix.validate" and len(doc["rows"]) == 1
    row = doc["rows"][0]
    assert row["ok"] is False and row["error"] and "FAILED" in res.output


def test_child_processes_load_llama_cpp_before_the_module_imports_numpy(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # On a CUDA machine whose numpy (2.5, scipy-openblas) was loaded before libllama, llama.cpp's BPE tokenizer
    # segfaulted inside std::regex while loading any model: every validate row crashed. The children that
    # load models (validate, smoke test) must find llama_cpp loaded before their own imports run.
    (tmp_path / "order_probe.py").write_text(
        "import json, sys\n"
        "print(json.dumps({'llama_cpp_loaded_first': 'llama_cpp' in sys.modules, 'argv': sys.argv[1:]}))\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    doc = run_child("order_probe", ["a", "b c"], "probe", "probing")
    assert doc == {"llama_cpp_loaded_first": True, "argv": ["a", "b c"]}


# llama.cpp 0.3.36's log of a SmolLM2 file loaded with every layer on an H200 (CUDA build, 2026-12-04)
CUDA_LINES = ("load_tensors:        CUDA0 model buffer size =    47.71 MiB",
              "load_tensors:    CUDA_Host model buffer size =     7.59 MiB",
              "llama_context:  CUDA_Host  output buffer size =     0.19 MiB",
              "llama_kv_cache:      CUDA0 KV buffer size =    45.00 MiB",
              "sched_reserve:      CUDA0 compute buffer size =    97.12 MiB",
              "sched_reserve:  CUDA_Host compute buffer size =     7.01 MiB")


def test_gpu_row_counts_the_gpus_buffers_and_puts_the_rest_under_host() -> None:
    from ggufmix.engine.backends import Device
    from ggufmix.engine.buffers import parse_buffers
    from ggufmix.ship.validate import _allocation

    b = parse_buffers("\n".join(CUDA_LINES), "log").__dict__ | {"lines": CUDA_LINES}
    gpu = Device(1, "CUDA0", "NVIDIA H200", "gpu", 0, 0)
    on_gpu, host = _allocation(gpu, b)
    assert on_gpu == round((47.71 + 45.00 + 97.12) * 2**20)
    assert host == round((7.59 + 0.19 + 7.01) * 2**20)
    cpu = Device(0, "CPU", "x86", "cpu", 0, 0)
    assert _allocation(cpu, b) == (on_gpu + host, None)
