"""llama.cpp's own account of a model's memory: load it at a context size and read the buffer sizes it logs.

llama.cpp logs every buffer it allocates (``load_tensors: CPU_Mapped model buffer size = ...``,
``llama_kv_cache: CPU KV buffer size = ...``, ``sched_reserve: CPU compute buffer size = ...``,
``llama_context: CPU output buffer size = ...``), on every backend. Those lines are the ground truth
that ``ggufmix.ship.devices`` is tested against and that ``--fit`` checks its result with.

A header-only GGUF (``scripts/header_models.py``: a 671B model's 2 MB of metadata) has no weights to load, and
llama.cpp refuses a file shorter than its tensor index says (``llama_tensor_weight``: "data is not within the
file bounds"). :func:`simulate_buffers` uses llama.cpp's own ``no_alloc`` mode ("only load metadata and
simulate memory allocations", ``llama_model_params``; what llama.cpp's memory fitting runs) on a sparse copy
of the header as long as the index says: nothing is read from, or written into, the hole. The graph is the
one llama.cpp reserves at those settings (``llama_context``'s ``graph_reserve``), sized by its own allocator
(``ggml_backend_sched_reserve_size``), so the compute and output buffers are llama.cpp's numbers, not a
formula's; ``no_alloc`` allocates no KV cache and no weights (their lines read 0), which
``ggufmix.ship.devices`` computes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ggufmix.engine.llamalib import _LISTENERS, last_error, llama
from ggufmix.errors import EngineError

SPARSE_SLACK = 64 << 20  # a stand-in using more disk than its header and this is not sparse

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


def bytes_by_device(lines: tuple[str, ...] | list[str]) -> dict[str, int]:
    """Bytes of the logged buffers per buffer type's device name (``CPU``, ``CPU_Mapped``, ``CUDA0``, ``CUDA_Host``)."""
    out: dict[str, float] = {}
    for m in _BUFFER.finditer("\n".join(lines)):
        out[m.group("dev")] = out.get(m.group("dev"), 0.0) + float(m.group("mib"))
    return {dev: round(mib * (1 << 20)) for dev, mib in out.items()}


def simulate_buffers(path: str | os.PathLike[str], *, n_ctx: int, n_ubatch: int = 512, kv_type: str = "f16",
                     swa_full: bool = False) -> Buffers:
    """llama.cpp's buffers for a header-only ``path`` at these settings, without weights (see the module doc).

    Runs in a child process: llama.cpp aborts on some headers it cannot build a graph for.

    Raises:
        EngineError: llama.cpp refused or crashed on the header, or the temporary folder cannot hold a sparse file.
    """
    from ggufmix.engine.isolated import run_child

    settings = {"n_ctx": n_ctx, "n_ubatch": n_ubatch, "kv_type": kv_type, "swa_full": swa_full}
    doc = run_child("ggufmix.engine.buffers", [str(path), json.dumps(settings)], str(path),
                    "sizing its buffers without the weights (no_alloc)")
    return Buffers(**{k: int(doc[k]) for k in ("model", "kv", "compute", "output")}, lines=tuple(doc["lines"]))


@contextmanager
def sparse_stand_in(path: Path, length: int) -> Iterator[Path]:
    """A temporary copy of ``path`` extended to ``length`` bytes with a hole (no disk used for it); removed after.

    Raises:
        EngineError: the file system stored the hole as data (no sparse files there: set TMPDIR elsewhere).
    """
    fd, name = tempfile.mkstemp(prefix="ggufmix-header-", suffix=".gguf")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out)
            out.truncate(max(length, out.tell()))
        if tmp.stat().st_blocks * 512 > path.stat().st_size + SPARSE_SLACK:
            raise EngineError(f"{tmp.parent}: this file system does not keep sparse files; set TMPDIR to one that does "
                              "(ext4, xfs, btrfs, tmpfs)")
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _simulate_here(path: Path, n_ctx: int, n_ubatch: int, kv_type: str, swa_full: bool) -> Buffers:
    """The child's work: llama.cpp's ``no_alloc`` load and context with ``Llama()``'s parameters for these settings
    (as :func:`measure_buffers` passes them), on a sparse stand-in of the header."""
    from ggufmix.io.gguf_source import open_gguf

    lib = llama()
    lines: list[str] = []
    with sparse_stand_in(path, open_gguf(path, check_data=False).data_end) as stand_in:
        mp = lib.llama_model_default_params()
        mp.no_alloc, mp.load_mode, mp.n_gpu_layers = True, lib.LLAMA_LOAD_MODE_NONE, 0
        _LISTENERS.append(lines.append)
        try:
            model = lib.llama_model_load_from_file(str(stand_in).encode(), mp)
            if not model:
                raise EngineError(f"{path}: llama.cpp could not read the header: {last_error()}")
            try:
                ctx = lib.llama_init_from_model(model, _context_params(lib, n_ctx, n_ubatch, kv_type, swa_full))
                if not ctx:
                    raise EngineError(f"{path}: llama.cpp could not size a context for it: {last_error()}")
                lib.llama_free(ctx)
            finally:
                lib.llama_model_free(model)
        finally:
            _LISTENERS.remove(lines.append)
    return parse_buffers("".join(lines), str(path))


def _context_params(lib, n_ctx: int, n_ubatch: int, kv_type: str, swa_full: bool):  # noqa: ANN001, ANN202
    """``Llama(n_ctx=, n_batch=n_ubatch, n_ubatch=, type_k=, type_v=, flash_attn=, swa_full=)``'s context params."""
    cp = lib.llama_context_default_params()
    n_batch = min(n_ctx, n_ubatch)
    cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
    cp.type_k = cp.type_v = _KV_TYPE[kv_type]
    flash = kv_type not in ("f16", "f32", "bf16")
    cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.swa_full = swa_full
    return cp


def main(argv: list[str]) -> int:
    """Child entry point: ``PATH SETTINGS_JSON``; one JSON line (the Buffers) on stdout."""
    from ggufmix.engine.isolated import reply

    path, settings = Path(argv[0]), json.loads(argv[1])
    return reply(lambda: asdict(_simulate_here(path, **settings)), EngineError)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
