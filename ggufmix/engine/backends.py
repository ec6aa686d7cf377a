"""The ggml backend devices the installed llama.cpp has, read from ggml's backend registry through ctypes.

llama-cpp-python does not bind the registry (``ggml-backend.h``: ``ggml_backend_dev_count``,
``ggml_backend_dev_get``, ``ggml_backend_dev_name`` / ``_description`` / ``_type`` / ``_memory``), so this
module opens the ``libggml`` shipped beside ``libllama`` and calls them. Devices are what the registry says,
never guessed from library names; ``ggml_backend_load_all`` runs first so dynamically built backends register.
"""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from ggufmix.engine.llamalib import lib_dir, loaded_once
from ggufmix.errors import EngineError

logger = logging.getLogger(__name__)

# enum ggml_backend_dev_type in ggml-backend.h (0.3.36's pinned llama.cpp)
DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    """One registered ggml backend device.

    Attributes:
        index: position in the registry (``ggml_backend_dev_get(index)``).
        name: the registry's name ("CPU", "CUDA0", "Vulkan0", "Metal").
        description: the device's own description (CPU model, GPU name).
        kind: "cpu", "gpu", "igpu" or "accel".
        memory_free, memory_total: bytes, as ``ggml_backend_dev_memory`` reports them.
    """

    index: int
    name: str
    description: str
    kind: str
    memory_free: int
    memory_total: int

    def __post_init__(self) -> None:
        if self.kind not in DEVICE_TYPES.values():
            raise ValueError(f"device {self.name!r}: unknown type {self.kind!r}")

    def to_json(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name, "description": self.description, "kind": self.kind,
                "memory_free": self.memory_free, "memory_total": self.memory_total}


@loaded_once
def _ggml() -> ctypes.CDLL:
    folder = lib_dir()
    path = folder / "libggml.so"
    if not path.exists():
        found = sorted(folder.glob("*ggml.*"))
        if not found:
            raise EngineError(f"{folder}: no libggml next to libllama; reinstall llama-cpp-python==0.3.36")
        path = found[0]
    lib = ctypes.CDLL(str(path))
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    lib.ggml_backend_dev_count.restype = sz
    lib.ggml_backend_dev_get.argtypes, lib.ggml_backend_dev_get.restype = [sz], vp
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes, getattr(lib, fn).restype = [vp], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes, lib.ggml_backend_dev_type.restype = [vp], ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [vp, ctypes.POINTER(sz), ctypes.POINTER(sz)]
    lib.ggml_backend_dev_memory.restype = None
    if hasattr(lib, "ggml_backend_load_all"):
        lib.ggml_backend_load_all.restype = None
        lib.ggml_backend_load_all()
    return lib


def list_devices() -> list[Device]:
    """Every device in ggml's backend registry, in registry order.

    Raises:
        EngineError: llama-cpp-python or its libggml cannot be loaded.
    """
    lib = _ggml()
    out = []
    for i in range(int(lib.ggml_backend_dev_count())):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        kind = DEVICE_TYPES.get(int(lib.ggml_backend_dev_type(dev)), "accel")
        out.append(Device(i, (lib.ggml_backend_dev_name(dev) or b"").decode(),
                          (lib.ggml_backend_dev_description(dev) or b"").decode(), kind, free.value, total.value))
    logger.debug("ggml devices: %s", [d.name for d in out])
    return out


def select_devices(spec: str) -> list[Device]:
    """Devices for ``--backends``: "auto" (all) or comma-separated names/prefixes ("cpu,cuda").

    Raises:
        EngineError: a named backend that this llama.cpp build does not have.
    """
    devices = list_devices()
    if spec == "auto":
        return devices
    chosen = []
    for want in (w.strip().lower() for w in spec.split(",") if w.strip()):
        hits = [d for d in devices if d.name.lower().startswith(want)]
        if not hits:
            have = ", ".join(d.name for d in devices) or "none"
            raise EngineError(f"--backends {want}: this llama.cpp build has no such device (it has: {have})")
        chosen += [d for d in hits if d not in chosen]
    return chosen
