"""Device enumeration through ggml's backend registry on the real installed llama.cpp (no fakes)."""
from __future__ import annotations

import pytest

from ggufmix.engine.backends import list_devices, select_devices
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
