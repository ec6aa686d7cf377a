"""The scorer interface: pure functions from one tensor's sampled rows to per-type errors.

A scorer never opens files or imports llama_cpp: the runner hands it the rows, the imatrix slice and
the quantize/dequantize kernels. Register one with ``@register("name")``; ``--strategy name`` selects it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ggufmix.types import QuantType

QuantizeFn = Callable[[np.ndarray, QuantType, "np.ndarray | None"], np.ndarray]
DequantizeFn = Callable[[np.ndarray, QuantType, int], np.ndarray]


@dataclass(frozen=True)
class Kernels:
    """The exact llama.cpp kernels, injected by the runner."""

    quantize: QuantizeFn
    dequantize: DequantizeFn
    # F16 values (uint16 or float16) into a float32 array of the same size; None: numpy converts (~8x slower)
    f16_to_f32: Callable[[np.ndarray, np.ndarray], None] | None = None


@dataclass(frozen=True)
class TensorJob:
    """What a scorer sees of one tensor."""

    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]
    candidates: tuple[QuantType, ...]
    rows: np.ndarray                    # float32 (n sampled rows, ncols)
    row_groups: np.ndarray              # index into imatrix rows (expert id) for each sampled row
    imatrix: np.ndarray | None          # (n experts, ncols) per-column mean squared activation, or None
    kernels: Kernels
    read: Callable[[np.ndarray], np.ndarray] | None = None  # any rows by index, float32 (whole-tensor stats)
    # F16 tensors: rows start:stop as stored (float16), read into the caller's buffer (out); None for other types
    read_f16: Callable[[int, int, np.ndarray], np.ndarray] | None = None
    usage: np.ndarray | None = None     # (n experts,) tokens routed to each expert over the mean, or None


@dataclass(frozen=True)
class TensorScore:
    """A scorer's answer for one tensor.

    ``errors[t]`` is the predicted damage of storing the tensor as type ``t`` (for the measured scorer:
    the imatrix-weighted noise-to-signal ratio of the tensor's output); ``importance`` multiplies it in
    the planner's objective; ``stats`` carries diagnostics (entropy, z-share ...) into scores.json.
    """

    errors: Mapping[QuantType, float]
    importance: float = 1.0
    stats: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {t.name: e for t, e in self.errors.items() if not np.isfinite(e) or e < 0}
        if bad:
            raise ValueError(f"errors must be finite and >= 0, got {bad}")


ScorerFn = Callable[[TensorJob], TensorScore]


@dataclass(frozen=True)
class BlockStats:
    """Per-block activation diagnostics measured by llama.cpp on calibration text (engine/activations.py).

    ``distance``: mean 1 - cos(block input, block output) (LIM); ``erank``: effective rank of the block's
    outputs (LieQ's compactness); ``ppl_drop``: ln PPL with the block replaced by the identity minus ln PPL
    of the intact model (LieQ's removal diagnostic). Missing diagnostics are empty.
    """

    distance: Mapping[int, float] = field(default_factory=dict)
    erank: Mapping[int, float] = field(default_factory=dict)
    ppl_drop: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelContext:
    """What a scorer's ``finish`` step sees of the whole model: the slots (name, role, layer, shape)
    and the activation diagnostics when the strategy asked for them."""

    slots: tuple[Any, ...]
    n_layers: int
    metadata: Mapping[str, Any]
    blocks: BlockStats | None = None
    # The KLD oracle's end-to-end measurements, tensor -> type -> (mean KLD, top-1 agreement), when asked for.
    oracle: Mapping[str, Mapping[QuantType, tuple[float, float]]] | None = None


FinishFn = Callable[[Mapping[str, Any], ModelContext], dict[str, TensorScore]]


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    fn: ScorerFn
    needs_rows: bool
    description: str
    calibrated: bool = True  # its errors are in the units role_gains.json was measured in (NSR)
    finish: FinishFn | None = None  # model-level step after every tensor was scored (layer rankings)
    activations: str = ""           # "": weights only; "blocks": distances/erank; "ablation": + ppl_drop;
                                    # "oracle": end-to-end KLD per (tensor, type) (score/oracle.py)
    reads_weights: bool = True      # False: metadata only (works on a GGUF whose data is missing)
    # numpy in short calls, where threads queue for the GIL: scored in forked processes, so it may call no
    # llama.cpp code beyond the type prices (set before the fork) and f16_to_f32 (score/stream.ForkRunner)
    gil_bound: bool = False


SCORERS: dict[str, ScorerSpec] = {}


def register(name: str, *, needs_rows: bool = True, description: str = "", calibrated: bool = True,
             finish: FinishFn | None = None, activations: str = "",
             reads_weights: bool = True, gil_bound: bool = False) -> Callable[[ScorerFn], ScorerFn]:
    """Decorator: make ``fn`` selectable as ``--strategy name``.

    ``calibrated=False``: the planner does not weight its errors by the role/depth gains.
    ``finish``: called once with every tensor's score (a per-layer ranking turns into importances there).
    ``gil_bound``: the scorer runs numpy over the whole tensor in short calls; where the OS forks, local
    scoring runs it in processes (score/stream.ForkRunner).
    """

    def deco(fn: ScorerFn) -> ScorerFn:
        SCORERS[name] = ScorerSpec(name, fn, needs_rows, description or (fn.__doc__ or "").strip().split("\n")[0],
                                   calibrated, finish, activations, reads_weights, gil_bound)
        return fn

    return deco


# Modules whose import registers the built-in scorers (imported on first lookup, not at ``import ggufmix``).
BUILTIN_MODULES = ("ggufmix.score.quant_error", "ggufmix.score.layerwise", "ggufmix.score.kld")


def scorers() -> Mapping[str, ScorerSpec]:
    """Every registered scorer, the built-in ones included."""
    import importlib

    for mod in BUILTIN_MODULES:
        importlib.import_module(mod)
    return SCORERS
