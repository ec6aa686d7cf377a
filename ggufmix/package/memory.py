"""How much memory a GGUF needs at run time, and the weight budget that fits a device (pure arithmetic).

    total = weights + KV cache + compute buffer + output buffer

- KV cache: mirrors ``llama_kv_cache`` (src/llama-kv-cache.cpp): per layer, ``n_cells`` x
  (``n_embd_k_gqa`` K elements + ``n_embd_v_gqa`` V elements) in the cache types, where ``n_cells`` is
  ``n_ctx`` padded to 256 (``llama_context``: ``GGML_PAD(n_ctx, 256)``) and ``n_embd_k_gqa`` is
  ``key_length x head_count_kv`` of that layer (``key_length`` defaults to ``n_embd / n_head``).
- Compute and output buffers depend on llama.cpp's graph allocator; they are measured by loading the
  model in llama.cpp at the same ``n_ctx`` / ``n_ubatch`` (:mod:`ggufmix.engine.memory`), not guessed.

Sliding-window layers (Gemma 2/3) are counted at the full context: an overestimate, said in the report.
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
        return cls(arch, n_layer, n_embd, n_head, per_layer, k_len, v_len, int(key("context_length", 0)),
                   int(swa) if swa else None)


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
                   type_v: QuantType = QuantType.F16) -> int:
    """Bytes of llama.cpp's KV cache for one sequence of ``n_ctx`` tokens."""
    cells = n_cells(n_ctx, shape)
    per_cell = sum(row_bytes(type_k, shape.key_length * kv) + row_bytes(type_v, shape.value_length * kv)
                   for kv in shape.head_count_kv)
    return cells * per_cell


@dataclass(frozen=True)
class Device:
    name: str
    usable_bytes: int
    note: str


def load_devices() -> dict[str, Device]:
    """The device profiles shipped in ggufmix/data/devices.json."""
    doc = json.loads(resources.files("ggufmix.data").joinpath("devices.json").read_text())
    return {name: Device(name, parse_budget(d["usable"]).to_bytes(0), d["note"]) for name, d in doc["devices"].items()}


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

    @property
    def weights_bytes(self) -> int:
        return self.device.usable_bytes - self.kv_bytes - self.compute_bytes - self.output_bytes - self.reserve_bytes

    def lines(self) -> list[str]:
        mib = 1 << 20
        rows = [(f"usable memory ({self.device.name}: {self.device.note})", self.device.usable_bytes),
                (f"- KV cache ({self.n_ctx} tokens, {self.kv_type})", -self.kv_bytes),
                (f"- compute buffer (n_ubatch {self.n_ubatch}, measured by llama.cpp)", -self.compute_bytes),
                ("- output buffer (measured by llama.cpp)", -self.output_bytes),
                ("- reserve (repacked weights, allocator slack)", -self.reserve_bytes),
                ("= weights budget", self.weights_bytes)]
        return [f"{name:<68} {b / mib:>10.2f} MiB" for name, b in rows]
