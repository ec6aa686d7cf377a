"""How much memory a GGUF needs at run time, and the weight budget that fits a device (pure arithmetic).

    total = weights + KV cache + compute buffer + output buffer

- KV cache: mirrors ``llama_kv_cache`` (src/llama-kv-cache.cpp): per layer, ``n_cells`` x
  (``n_embd_k_gqa`` K elements + ``n_embd_v_gqa`` V elements) in the cache types, where ``n_cells`` is
  ``n_ctx`` padded to 256 (``llama_context``: ``GGML_PAD(n_ctx, 256)``) and ``n_embd_k_gqa`` is
  ``key_length x head_count_kv`` of that layer (``key_length`` defaults to ``n_embd / n_head``). MLA
  (DeepSeek-V2/V3, Kimi K2 ...: the header has ``attention.key_length_mla`` and ``value_length_mla``) caches
  the compressed latent only: K of ``key_length`` = kv_lora_rank + rope dims (576 for DeepSeek-V3) x
  ``head_count_kv`` (1, the converter writes MLA as MQA) and no V at all (``llama_kv_cache``: ``has_v = !is_mla``).
- Compute and output buffers depend on llama.cpp's graph allocator; they are measured by loading the
  model in llama.cpp at the same ``n_ctx`` / ``n_ubatch`` (:mod:`ggufmix.engine.buffers`), not guessed; for
  a header-only GGUF, by llama.cpp's ``no_alloc`` mode on the header (the same allocator, no weights).

Sliding-window layers (Gemma 2/3, Cohere 2, gpt-oss ...) mirror ``llama_kv_cache_iswa``: unless ``swa_full``,
their cache holds ``min(n_ctx, sliding_window + n_ubatch)`` cells padded to 256; which layers slide comes from
``{arch}.attention.sliding_window_pattern`` when the GGUF has it, else from the pattern llama.cpp's model code
sets for the architecture (``load_swa_pattern(ml, N)`` in src/models/*.cpp, table below). llama.cpp's C default
(and llama-cpp-python's) is ``swa_full = true``; llama-server, llama-cli and Ollama default to the window.
An architecture with a sliding window that is not in the table is counted at the full context (an overestimate).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from ggufmix.errors import InputError, UsageError
from ggufmix.plan.budget import parse_budget
from ggufmix.types import QuantType, parse_type, row_bytes

CTX_PAD = 256
SWA_PAD = 256  # llama_kv_cache_iswa: "the SWA cache is always padded to 256 for performance"
# arch -> (n_pattern, dense_first) of llama_hparams::set_swa_pattern, from llama.cpp 0.3.36's src/models/*.cpp
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False), "gemma3": (6, False), "gemma3n": (5, False), "gemma-embedding": (6, False),
    "cohere2": (4, False), "exaone4": (4, False), "olmo2": (4, False), "gpt-oss": (2, False),
    "smallthinker": (4, True), "afmoe": (4, False), "plamo3": (8, False),
}
KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl")  # llama.cpp -ctk/-ctv


@dataclass(frozen=True)
class ModelShape:
    """What the KV cache depends on, read from GGUF metadata (``{arch}.*`` keys)."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    head_count_kv: tuple[int, ...]   # per layer
    key_length: int
    value_length: int
    n_ctx_train: int
    sliding_window: int | None
    swa_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding-window cache (empty: none does)
    mla: bool = False                  # multi-head latent attention: a K cache of the latent, no V cache

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ModelShape:
        """Raises: InputError: a key the arithmetic needs is missing."""
        arch = str(meta.get("general.architecture", ""))

        def key(name: str, default: Any = None) -> Any:
            v = meta.get(f"{arch}.{name}", default)
            if v is None:
                raise InputError(f"GGUF metadata has no {arch}.{name}; cannot size the KV cache of a {arch!r} model")
            return v

        n_layer, n_embd, n_head = int(key("block_count")), int(key("embedding_length")), int(key("attention.head_count"))
        kv = key("attention.head_count_kv", n_head)
        per_layer = tuple(int(x) for x in kv) if isinstance(kv, list) else (int(kv),) * n_layer
        k_len = int(key("attention.key_length", n_embd // max(n_head, 1)))
        v_len = int(key("attention.value_length", k_len))
        swa = meta.get(f"{arch}.attention.sliding_window")
        n_swa = int(swa) if isinstance(swa, int) and swa > 0 else None
        layers = swa_layers(arch, n_layer, meta.get(f"{arch}.attention.sliding_window_pattern")) if n_swa else ()
        mla = all(int(meta.get(f"{arch}.attention.{k}_length_mla", 0) or 0) > 0 for k in ("key", "value"))
        return cls(arch, n_layer, n_embd, n_head, per_layer, k_len, v_len, int(key("context_length", 0)), n_swa,
                   layers, mla)

    @property
    def swa_unknown(self) -> bool:
        """A sliding window whose layer pattern ggufmix does not know: counted at the full context."""
        return self.sliding_window is not None and not self.swa_layers


def swa_layers(arch: str, n_layer: int, pattern: Any) -> tuple[bool, ...]:
    """Which layers llama.cpp gives the sliding-window cache (``llama_hparams::is_swa``); () if unknown."""
    if isinstance(pattern, list) and len(pattern) >= n_layer and all(isinstance(x, bool) for x in pattern):
        return tuple(pattern[:n_layer])  # llama.cpp reads a per-layer array first
    if arch not in SWA_PATTERNS:
        return ()
    n_pattern, dense_first = SWA_PATTERNS[arch]
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        n_pattern = pattern
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def kv_type(name: str) -> QuantType:
    """``'f16'``/``'q8_0'`` ... -> the cache's ggml type (llama.cpp's ``--cache-type-k`` names).

    Raises:
        UsageError: not a type llama.cpp accepts for the KV cache.
    """
    if name.lower() not in KV_TYPES:
        raise UsageError(f"--kv-type {name!r}: llama.cpp's KV cache takes {', '.join(KV_TYPES)}")
    return parse_type(name)


def n_cells(n_ctx: int, shape: ModelShape) -> int:
    """KV cells llama.cpp allocates: ``n_ctx`` (0: the training context) padded to 256."""
    ctx = n_ctx or shape.n_ctx_train
    return -(-ctx // CTX_PAD) * CTX_PAD


def kv_cache_bytes(shape: ModelShape, n_ctx: int, type_k: QuantType = QuantType.F16,
                   type_v: QuantType = QuantType.F16, *, n_ubatch: int = 512, swa_full: bool = False) -> int:
    """Bytes of llama.cpp's KV cache for one sequence of ``n_ctx`` tokens (sliding-window layers: see above)."""
    cells = n_cells(n_ctx, shape)
    swa_cells = cells
    if shape.swa_layers and not swa_full:
        assert shape.sliding_window is not None
        swa_cells = -(-min(cells, shape.sliding_window + n_ubatch) // SWA_PAD) * SWA_PAD
    total = 0
    for il, kv in enumerate(shape.head_count_kv):
        per_cell = row_bytes(type_k, shape.key_length * kv)
        if not shape.mla:
            per_cell += row_bytes(type_v, shape.value_length * kv)
        total += per_cell * (swa_cells if shape.swa_layers and shape.swa_layers[il] else cells)
    return total


@dataclass(frozen=True)
class Device:
    name: str
    usable_bytes: int
    note: str
    palette: str | None = None  # the --palette the device's llama.cpp backend implies (devices.json)


def load_devices() -> dict[str, Device]:
    """The device profiles shipped in ggufmix/data/devices.json."""
    doc = json.loads(resources.files("ggufmix.data").joinpath("devices.json").read_text())
    return {name: Device(name, parse_budget(d["usable"]).to_bytes(0), d["note"], d.get("palette"))
            for name, d in doc["devices"].items()}


def resolve_fit(text: str) -> Device:
    """``--fit`` value: a device profile name or a size (``4GB``, ``100MB``).

    Raises:
        UsageError: neither a known profile nor a size.
    """
    devices = load_devices()
    if text.lower() in devices:
        return devices[text.lower()]
    try:
        b = parse_budget(text)
    except UsageError:
        raise UsageError(f"--fit {text!r}: not a size (100MB, 4GB ...) nor a device ({', '.join(devices)})") from None
    if b.unit in ("bpw", "rule"):
        what = "bits per weight" if b.unit == "bpw" else "a decision rule"
        raise UsageError(f"--fit {text!r}: a memory size or device, not {what} (that is --budget)")
    return Device(text, b.to_bytes(0), "size given on the command line")


@dataclass(frozen=True)
class FitReport:
    """The arithmetic behind a ``--fit`` budget, line by line."""

    device: Device
    n_ctx: int
    n_ubatch: int
    kv_type: str
    kv_bytes: int
    compute_bytes: int
    output_bytes: int
    reserve_bytes: int
    kv_note: str = ""  # how sliding-window layers were counted, when the model has them
    buffers_by: str = "measured by llama.cpp"  # or "sized by llama.cpp, no weights" (a header-only GGUF)

    @property
    def weights_bytes(self) -> int:
        return self.device.usable_bytes - self.kv_bytes - self.compute_bytes - self.output_bytes - self.reserve_bytes

    def lines(self) -> list[str]:
        mib = 1 << 20
        rows = [(f"usable memory ({self.device.name}: {self.device.note})", self.device.usable_bytes),
                (f"- KV cache ({self.n_ctx} tokens, {self.kv_type}{self.kv_note})", -self.kv_bytes),
                (f"- compute buffer (n_ubatch {self.n_ubatch}, {self.buffers_by})", -self.compute_bytes),
                (f"- output buffer ({self.buffers_by})", -self.output_bytes),
                ("- reserve (repacked weights, allocator slack)", -self.reserve_bytes),
                ("= weights budget", self.weights_bytes)]
        return [f"{name:<68} {b / mib:>10.2f} MiB" for name, b in rows]
