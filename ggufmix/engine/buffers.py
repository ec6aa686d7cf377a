"""llama.cpp's own account of a model's memory: load it at a context size and read the buffer sizes it logs.

llama.cpp logs every buffer it allocates (``load_tensors: CPU_Mapped model buffer size = ...``,
``llama_kv_cache: CPU KV buffer size = ...``, ``sched_reserve: CPU compute buffer size = ...``,
``llama_context: CPU output buffer size = ...``), on every backend. Those lines are the ground truth
that ``ggufmix.ship.devices`` is tested against and that ``--fit`` checks its result with.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ggufmix.engine.llamalib import _LISTENERS, last_error, llama
from ggufmix.errors import EngineError

_BUFFER = re.compile(r"(?P<where>\w+):\s+(?P<dev>\S+)\s+(?P<kind>model|KV|compute|output) buffer size =\s+"
                     r"(?P<mib>[0-9.]+) MiB")
_KV_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "iq4_nl": 20, "bf16": 30}


@dataclass(frozen=True)
class Buffers:
    """Bytes per kind of buffer, summed over devices (each logged to 0.01 MiB: +-5 KiB)."""

    model: int
    kv: int
    compute: int
    output: int
    lines: tuple[str, ...]

    @property
    def total(self) -> int:
        return self.model + self.kv + self.compute + self.output


def measure_buffers(path: str | os.PathLike[str], *, n_ctx: int, n_ubatch: int = 512, kv_type: str = "f16",
                    n_gpu_layers: int = 0, use_mmap: bool = False, swa_full: bool = False) -> Buffers:
    """Load ``path`` in llama.cpp with these settings and return the buffers it allocated.

    ``use_mmap=False`` (llama.cpp ``--no-mmap``, Ollama ``use_mmap false``) by default: with mmap,
    llama.cpp maps the whole file *and* copies the tensors it repacks for the CPU (Q4_0, IQ4_NL,
    Q4_K ... on x86) into a second buffer, so its log counts those weights twice; without mmap the
    model buffers add up to the file's tensor bytes.

    Raises:
        EngineError: llama.cpp could not load the model or logged no buffer sizes.
    """
    from ggufmix.engine.isolated import check_loads

    check_loads(path)  # a crash inside llama.cpp on damaged metadata becomes an EngineError
    lib = llama()
    lines: list[str] = []
    _LISTENERS.append(lines.append)
    flash = kv_type not in ("f16", "f32", "bf16")  # llama.cpp needs flash attention for a quantized V cache
    try:
        model = lib.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ubatch, n_ubatch=n_ubatch, verbose=False,
                          n_gpu_layers=n_gpu_layers, type_k=_KV_TYPE[kv_type], type_v=_KV_TYPE[kv_type],
                          flash_attn=flash, use_mmap=use_mmap, swa_full=swa_full)
    except (ValueError, RuntimeError) as e:
        raise EngineError(f"{path}: llama.cpp could not load it ({e}): {last_error()}") from None
    finally:
        _LISTENERS.remove(lines.append)
    model.close()
    return parse_buffers("".join(lines), str(path))


def parse_buffers(log: str, what: str) -> Buffers:
    """Sum the ``... buffer size = X MiB`` lines of a llama.cpp log by kind.

    Raises:
        EngineError: the log has no such line.
    """
    sums = {"model": 0.0, "KV": 0.0, "compute": 0.0, "output": 0.0}
    found = []
    for m in _BUFFER.finditer(log):
        sums[m.group("kind")] += float(m.group("mib"))
        found.append(m.group(0).strip())
    if not found:
        raise EngineError(f"{what}: llama.cpp logged no buffer sizes")
    b = {k: round(v * (1 << 20)) for k, v in sums.items()}
    return Buffers(b["model"], b["KV"], b["compute"], b["output"], tuple(found))
