"""Every tensor of a model with the types it can really take and their exact bytes."""
from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field

from ggufmix.errors import UsageError
from ggufmix.io.gguf_source import TensorInfo
from ggufmix.layout import rules
from ggufmix.types import DEFAULT_TYPES, QuantType, fits, row_bytes


@dataclass(frozen=True)
class Slot:
    """One tensor: fixed (llama.cpp never quantizes it) or with candidate types -> bytes."""

    name: str
    shape: tuple[int, ...]
    source_type: QuantType
    role: str
    layer: int | None
    n_elements: int
    candidates: dict[QuantType, int] = field(default_factory=dict)
    fixed_bytes: int = 0

    @property
    def quantized(self) -> bool:
        return bool(self.candidates)


@dataclass(frozen=True)
class Layout:
    """The whole model as the planner sees it."""

    arch: str
    slots: tuple[Slot, ...]

    @property
    def total_elements(self) -> int:
        return sum(s.n_elements for s in self.slots)

    @property
    def fixed_bytes(self) -> int:
        return sum(s.fixed_bytes for s in self.slots)

    @property
    def tied_embeddings(self) -> bool:
        return tied_embeddings(s.name for s in self.slots)

    @property
    def n_layers(self) -> int:
        return 1 + max((s.layer for s in self.slots if s.layer is not None), default=-1)

    def by_name(self) -> dict[str, Slot]:
        return {s.name: s for s in self.slots}


def tied_embeddings(names: Iterable[str]) -> bool:
    """Whether ``token_embd`` is also the output head: llama.cpp reuses it where the model has no ``output.weight``."""
    return "output.weight" not in set(names)


def build_layout(arch: str, tensors: Iterable[TensorInfo], types: Sequence[QuantType] = DEFAULT_TYPES,
                 imatrix_names: Collection[str] = (), strict_types: bool = False) -> Layout:
    """Candidates per tensor, as ``llama_model_quantize`` will write them.

    A type is a candidate only where it needs no fallback (``tensor_type_fallback``) and, for tensors
    not in ``imatrix_names``, where llama.cpp does not demand an imatrix (``tensor_requires_imatrix``).

    Raises:
        UsageError: with ``strict_types`` (a user palette), a quantizable tensor none of the types fits.
    """
    slots = []
    for t in tensors:
        base = dict(name=t.name, shape=t.shape, source_type=t.qtype, role=rules.role(t.name),
                    layer=rules.layer(t.name), n_elements=t.n_elements)
        if not rules.allows_quantization(t.name, t.n_dims, arch):
            slots.append(Slot(**base, fixed_bytes=t.n_bytes))
            continue
        cands = {q: t.nrows * row_bytes(q, t.ncols) for q in types
                 if fits(q, t.ncols) and (t.name in imatrix_names or not rules.requires_imatrix(t.name, q))}
        if not cands:
            if strict_types:
                raise UsageError(f"{t.name!r}: rows of {t.ncols} fit none of the types "
                                 f"{', '.join(q.name for q in types)}; add a 32-block type such as Q8_0")
            # llama.cpp writes F16 where no quantized block fits (tensor_type_fallback).
            cands = {QuantType.F16: t.nrows * row_bytes(QuantType.F16, t.ncols)}
        slots.append(Slot(**base, candidates=cands))
    return Layout(arch, tuple(slots))
