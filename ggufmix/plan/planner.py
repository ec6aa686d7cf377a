"""From scores and a budget to a Plan: every tensor's type, as the knapsack solver chose it."""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources

from ggufmix.errors import BudgetError, UsageError
from ggufmix.layout.rules import collected_by_imatrix
from ggufmix.layout.slots import Slot
from ggufmix.plan.budget import Budget, bpw
from ggufmix.plan.plan import Plan, PlanEntry
from ggufmix.plan.solver import Item, Option, Solution, faster_within, feasible_range, solve
from ggufmix.plan.speed import DEFAULT_SPEED_TRADEOFF, quantize_seconds
from ggufmix.scores import Scores
from ggufmix.types import QuantType, bits_per_weight, parse_type

logger = logging.getLogger(__name__)

# Tensors that must share one type, as (regex, group key template). Each line names the models it is for.
DEFAULT_TIES: tuple[tuple[str, str], ...] = (
    # MoE models (Mixtral, Qwen3-MoE, DeepSeek): llama.cpp's fused gate+up expert path wants one type
    (r"^blk\.(\d+)\.ffn_(?:gate|up)_exps\.weight$", r"blk.\1.ffn_gate_up_exps"),
)
TOLERANCE_BPW = 0.02


@dataclass(frozen=True)
class Pin:
    pattern: re.Pattern[str]
    qtype: QuantType


def parse_pin(text: str) -> Pin:
    """``'output\\.weight=Q6_K'`` -> Pin (regex searched in tensor names, like llama-quantize --tensor-type).

    Raises:
        UsageError: no ``=``, a bad regex or an unknown type.
    """
    pattern, sep, tname = text.rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"--pin {text!r}: expected REGEX=TYPE, e.g. 'output\\.weight=Q6_K'")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--pin {text!r}: bad regex ({e})") from None
    return Pin(rx, parse_type(tname))


# The probe type of role_gains.json's tables (scripts/calibrate_gains.py), and of the tables named
# ``MODE@LOW_PROBE``: the same gains measured where 2-3 bpw budgets put most tensors. Qwen2.5-Coder-1.5B's Q2_K
# probes gave 0.62-1.57x the Q4_0 probes' gains by group (docs/results.md).
GAIN_PROBE = QuantType.Q4_0
LOW_PROBE = QuantType.Q2_K


def load_gains(imatrix: bool = False, arch: str | None = None, probe: QuantType = GAIN_PROBE) -> dict[str, float]:
    """Objective weights per ``role@depth`` shipped in ggufmix/data/role_gains.json (see gain_key): the table
    calibrated on a model of ``arch`` when there is one for this mode (``by_arch``), else the default's. For
    ``probe`` LOW_PROBE, the table measured at it (``MODE@Q2_K``), empty where none was."""
    doc = _role_gains()
    mode = "imatrix" if imatrix and "imatrix" in doc else "plain"
    name = gain_table(mode, probe)
    own = doc.get("by_arch", {}).get(arch or "", {})
    table = (own if mode in own else doc).get(name, {})  # the architecture's tables, or else the default's
    return {k: float(v) for k, v in table.items()}


def gain_table(mode: str, probe: QuantType) -> str:
    """role_gains.json's name for the ``mode`` ("plain" or "imatrix") table probed at ``probe``: ``MODE`` at
    GAIN_PROBE, ``MODE@TYPE`` at another type."""
    return mode if probe == GAIN_PROBE else f"{mode}@{probe.name}"


@cache
def _role_gains() -> dict:
    """role_gains.json, read once (a plan loads two of its tables, ``--fit`` plans several times)."""
    return json.loads(resources.files("ggufmix.data").joinpath("role_gains.json").read_text())


def depth_bucket(layer: int | None, n_layers: int) -> str:
    """``early``/``mid``/``late``: the first and last eighth of the blocks, the eighths llama.cpp's
    ``use_more_bits()`` favours (it rounds n/8 down; this split does not, so 30 blocks give 4/23/3)."""
    if layer is None or n_layers <= 0:
        return "none"
    if layer < n_layers / 8:
        return "early"
    if layer >= 7 * n_layers / 8:
        return "late"
    return "mid"


def gain_key(slot: Slot, n_layers: int, tied: bool) -> str:
    """``role@depth``: the key of a tensor's objective weight (token_embd counts as output when tied)."""
    role = "token_embd_tied" if slot.role == "token_embd" and tied else slot.role
    return f"{role}@{depth_bucket(slot.layer, n_layers)}"


# Roles the calibration model lacks, measured through their nearest stand-in: an untied output matrix
# does the tied embedding's output job (SmolLM2, the calibration model, ties them; Qwen2.5-1.5B does not).
ROLE_STAND_IN = {"output": "token_embd_tied"}


def lookup_gain(gains: dict[str, float], key: str) -> float:
    """The calibrated weight for ``key``, else its stand-in role's, else the role's average, else ``other``, else 1."""
    if key in gains:
        return gains[key]
    role, _, depth = key.partition("@")
    if role in ROLE_STAND_IN:
        return lookup_gain(gains, f"{ROLE_STAND_IN[role]}@{depth}")
    same = [v for k, v in gains.items() if k.split("@")[0] == role]
    return sum(same) / len(same) if same else gains.get("other@none", 1.0)


def gain_at(error: float, gain: float, low_gain: float | None, errors: dict[QuantType, float]) -> float:
    """The gain at a type whose measured noise is ``error``: ``gain`` (measured at GAIN_PROBE) at or below the
    tensor's own noise at GAIN_PROBE, ``low_gain`` at or above its noise at LOW_PROBE, geometric in between
    (the role's noise-to-KLD curve through its two probes)."""
    high, low = errors.get(GAIN_PROBE, 0.0), errors.get(LOW_PROBE, 0.0)
    if low_gain is None or error <= high or not 0.0 < high < low:
        return gain
    frac = min(math.log(error / high) / math.log(low / high), 1.0)
    return gain * (low_gain / gain) ** frac


def make_plan(scores: Scores, budget: Budget, *, types: Sequence[QuantType] | None = None,
              pins: Sequence[Pin] = (), ties: Sequence[tuple[str, str]] = DEFAULT_TIES,
              gains: dict[str, float] | None = None, low_gains: dict[str, float] | None = None,
              speed_tradeoff: float = DEFAULT_SPEED_TRADEOFF) -> Plan:
    """Solve the budget over the scored candidates, then take the plan llama.cpp writes fastest among those
    whose predicted error is within ``speed_tradeoff`` (a fraction; 0: the least error whatever the time) of
    the least (plan/speed.py).

    The solver minimises the sum over tensors of weight x importance x error. For ``kld`` (scores whose
    settings say ``units: kld``) the weight is 1: the error is already the end-to-end KLD. Otherwise it is the role/depth
    gain (role_gains.json) for strategies whose errors are in its units (``measured`` and the hybrids);
    for the others (``uniform``, the pure paper strategies) and for an empty ``gains`` it is the tensor's
    share of the quantized weights, so that equal importances give every tensor the same bits per weight
    (the papers' starting point) instead of starving the biggest tensors: with one unit of cost per
    tensor, a 28M-parameter tied embedding went to 2 bits while 0.1M-parameter attn_k stayed at 8.
    Where role_gains.json also has the gains measured at LOW_PROBE (``low_gains``), each type's gain follows its
    role's noise-to-KLD curve through the two probes (:func:`gain_at`).

    Raises:
        UsageError: a pin or palette no tensor can take.
        BudgetError: the budget is outside the feasible range (the message gives the range).
    """
    if budget.is_rule:
        return rule_plan(scores, types=types, pins=pins)
    imatrix = scores.settings.get("imatrix") is not None
    if gains is None and scores.calibrated:
        arch = scores.layout.arch
        gains, low_gains = load_gains(imatrix, arch), load_gains(imatrix, arch, LOW_PROBE)
    gains = gains or {}
    low_gains = (low_gains or {}) if gains else {}  # a curve bends a gains table: none without one
    slots = [s for s in scores.layout.slots if s.quantized]
    weight = _weighting(scores, slots, gains, low_gains)
    options = {s.name: _options(s, scores, types, pins, weight(s), imatrix) for s in slots}
    _check_pins_used(pins, options)
    groups = _groups([s.name for s in slots], ties)
    items = [_merge(key, [options[n] for n in names]) for key, names in groups.items()]
    total_elements = scores.layout.total_elements
    fixed = scores.layout.fixed_bytes
    target = _target(budget, total_elements, fixed, feasible_range(items))
    best = solve(items, target - fixed)
    sol = faster_within(items, target - fixed, best, speed_tradeoff)
    chosen = {n: sol.choice[key] for key, names in groups.items() for n in names}
    end_to_end = scores.settings.get("units") == "kld"
    settings = {"types": None if types is None else [t.name for t in types],
                "pins": [f"{p.pattern.pattern}={p.qtype.name}" for p in pins], "gains": gains,
                **({f"gains@{LOW_PROBE.name}": low_gains} if low_gains else {}),
                "weights": "none (end-to-end KLD)" if end_to_end else "role gains" if gains else "elements",
                "speed": _speed_settings(best, sol, speed_tradeoff)}
    plan = _assemble(scores, str(budget), target, chosen, options, settings)
    slack = bpw(target - plan.total_bytes, total_elements)
    if slack > TOLERANCE_BPW:
        logger.warning("plan is %.3f bpw under the budget (tolerance %.2f): tensor sizes leave no finer step",
                       slack, TOLERANCE_BPW)
    if not end_to_end:
        _warn_noisy(plan)
    return plan


# Measured noise (noise power over the weights' signal, the measured scorers' error) past which llama.cpp's
# output falls apart instead of degrading in proportion. SmolLM2-135M (576-column rows, where Q2_0 at NSR
# 0.52-0.59 is the only default type under 4 bits): 3.0 bpw gave mean KLD 18 and 3.9 bpw 3.5; at 4.9 bpw, ten ffn_gate
# at Q2_0 took the KLD from 0.19 to 1.09. Q2_K (NSR about 0.09) is in every stock Q2_K file.
NOISE_WARNING = 0.25


def _warn_noisy(plan: Plan) -> None:
    """Warn when tensors are planned at a type whose measured noise is past NOISE_WARNING."""
    noisy = [e for e in plan.quantized() if e.error > NOISE_WARNING]
    if noisy:
        kinds = ", ".join(sorted({e.qtype.name for e in noisy}))
        logger.warning("%d tensors (%s) are planned at %s, whose measured noise is %.2f-%.2f of their signal "
                       "(past %.2f the output falls apart: SmolLM2-135M at 3 bpw had mean KLD 18); raise the "
                       "budget or leave %s out with --types", len(noisy), _names(noisy), kinds,
                       min(e.error for e in noisy), max(e.error for e in noisy), NOISE_WARNING, kinds)


def _names(entries: Sequence[PlanEntry], shown: int = 3) -> str:
    names = [e.name for e in entries[:shown]]
    return ", ".join(names) + (f" and {len(entries) - shown} more" if len(entries) > shown else "")


def _speed_settings(best: Solution, chosen: Solution, tradeoff: float) -> dict[str, float]:
    """What the speed tradeoff did, for plan.json and the log: predicted one-thread quantize seconds of the
    least-error plan and of the chosen one, and the predicted error given up."""
    lost = chosen.cost / best.cost - 1 if best.cost > 0 else 0.0
    if chosen is not best:
        logger.info("quantizing: %.0f s predicted (one thread) instead of %.0f s, for %.2f%% more predicted error "
                    "(--speed-tradeoff %g)", chosen.seconds, best.seconds, 100 * lost, tradeoff)
    return {"tradeoff": tradeoff, "quantize_seconds": round(chosen.seconds, 3),
            "least_error_quantize_seconds": round(best.seconds, 3), "error_given_up": round(lost, 6)}


def _weighting(scores: Scores, slots: Sequence[Slot], gains: dict[str, float],
               low_gains: dict[str, float]) -> Callable[[Slot], tuple[float, float | None]]:
    """Each tensor's weight in the objective (see :func:`make_plan`), and its gain at LOW_PROBE where
    ``low_gains`` has one (see :func:`gain_at`)."""
    n_layers = scores.layout.n_layers
    quantized_elements = sum(s.n_elements for s in slots)
    end_to_end = scores.settings.get("units") == "kld"  # the oracle's KLDs are the objective itself

    def weight(s: Slot) -> tuple[float, float | None]:
        if end_to_end:
            return 1.0, None
        if gains:
            key = gain_key(s, n_layers, scores.layout.tied_embeddings)
            return lookup_gain(gains, key), lookup_gain(low_gains, key) if low_gains else None
        return s.n_elements / quantized_elements, None
    return weight


def _target(budget: Budget, total_elements: int, fixed: int, feasible: tuple[int, int]) -> int:
    """The budget in bytes of all tensor data; a ceiling (``at_most``) above the largest file is that file.

    Raises:
        BudgetError: outside the feasible range (the message gives it).
    """
    lo, hi = (fixed + b for b in feasible)
    target = budget.to_bytes(total_elements)
    if budget.at_most:
        target = min(target, hi)
    if not lo <= target <= hi:
        raise BudgetError(_range_message(budget, target, lo, hi, total_elements))
    return target


def _options(slot: Slot, scores: Scores, types: Sequence[QuantType] | None, pins: Sequence[Pin],
             gain: tuple[float, float | None], imatrix: bool = False) -> dict[QuantType, Option]:
    """The tensor's allowed types as solver options: bytes, weighted error, and predicted quantize seconds
    (with the importance matrix where llama-imatrix collects the tensor). ``gain`` is the tensor's weight and its
    gain at LOW_PROBE, None without a curve (:func:`gain_at`)."""
    allowed = dict(slot.candidates)
    if types is not None:
        allowed = {t: b for t, b in allowed.items() if t in types}
        if not allowed:
            raise UsageError(f"{slot.name!r}: rows of {slot.shape[0]} fit none of --types "
                             f"{','.join(t.name for t in types)}; it can take {','.join(t.name for t in slot.candidates)}")
    pin = next((p for p in pins if p.pattern.search(slot.name)), None)
    if pin is not None:
        if pin.qtype not in slot.candidates:
            raise UsageError(f"{slot.name!r}: pinned to {pin.qtype.name}, but rows of {slot.shape[0]} can take only "
                             f"{','.join(t.name for t in slot.candidates)}")
        allowed = {pin.qtype: slot.candidates[pin.qtype]}
    ts = scores.tensors.get(slot.name)
    if ts is None:
        raise UsageError(f"{slot.name!r}: no scores for this tensor; re-run ggufmix score")
    searched = imatrix and collected_by_imatrix(slot.name)
    return {t: Option(t, b, ts.importance * gain_at(ts.errors[t], *gain, ts.errors) * ts.errors[t],
                      quantize_seconds(t, slot.n_elements, searched))
            for t, b in allowed.items()}


# EWQ's tiers as GGUF types. The paper quantizes its lowest-entropy blocks hardest (4-bit), the middle
# ones to 8 bits and leaves the rest unquantized, which saves at most ~20%; for GGUF users we shift the
# ladder one step down so the rule gives a usable file: Q4_K / Q6_K / Q8_0 (Q8_0 is llama.cpp's
# near-lossless type). Tensors outside blocks (embeddings, output) are not ranked: the top tier.
TIER_TYPES = (QuantType.Q4_K, QuantType.Q6_K, QuantType.Q8_0)


def rule_plan(scores: Scores, *, types: Sequence[QuantType] | None = None, pins: Sequence[Pin] = ()) -> Plan:
    """Every tensor at its block's EWQ tier type (``--budget rule``); the nearest allowed type where a
    tensor cannot take it (rows that are not a multiple of 256 fall back like llama.cpp).

    Raises:
        UsageError: the scores carry no tiers (a strategy without a decision rule).
    """
    slots = [s for s in scores.layout.slots if s.quantized]
    if not any("ewq_tier" in scores.tensors[s.name].stats for s in slots if s.name in scores.tensors):
        raise UsageError(f"--budget rule: strategy {scores.strategy!r} has no decision rule "
                         "(ewq, ewq-norm and fastewq have one); give a size or bpw")
    chosen = {}
    for s in slots:
        tier = int(scores.tensors[s.name].stats.get("ewq_tier", len(TIER_TYPES) - 1))
        opts = _options(s, scores, types, pins, (1.0, None))
        want = TIER_TYPES[tier]
        chosen[s.name] = want if want in opts else min(
            opts, key=lambda t: (abs(bits_per_weight(t) - bits_per_weight(want)), -bits_per_weight(t)))
    plan = plan_from_types(scores, chosen, "rule")
    return replace(plan, settings={**plan.settings, "rule": "ewq tiers " + "/".join(t.name for t in TIER_TYPES)})


def plan_from_types(scores: Scores, chosen: dict[str, QuantType], label: str) -> Plan:
    """A Plan with given types (every quantized tensor named), e.g. to probe or to mirror a stock mix.

    Raises:
        UsageError: a tensor is missing or given a type it cannot take.
    """
    options = {}
    for s in scores.layout.slots:
        if s.quantized:
            t = chosen.get(s.name)
            if t not in s.candidates:
                raise UsageError(f"{s.name!r}: {t.name if t else 'no type'} is not one of its candidates")
            ts = scores.tensors[s.name]
            options[s.name] = {t: Option(t, s.candidates[t], ts.importance * ts.errors[t])}
    total = scores.layout.fixed_bytes + sum(o.bytes for opts in options.values() for o in opts.values())
    return _assemble(scores, label, total, {n: chosen[n] for n in options}, options, {"fixed_types": label})


def _check_pins_used(pins: Sequence[Pin], options: dict[str, dict[QuantType, Option]]) -> None:
    for p in pins:
        if not any(p.pattern.search(n) for n in options):
            raise UsageError(f"--pin {p.pattern.pattern!r}={p.qtype.name} matches no quantizable tensor")


def _groups(names: Sequence[str], ties: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        key = n
        for rx, template in ties:
            m = re.match(rx, n)
            if m:
                key = m.expand(template)
                break
        groups.setdefault(key, []).append(n)
    return groups


def _merge(key: str, members: list[dict[QuantType, Option]]) -> Item:
    common = set(members[0]).intersection(*members[1:])
    if not common:
        raise UsageError(f"{key!r}: tied tensors share no type they can all take")
    return Item(key, tuple(Option(t, sum(m[t].bytes for m in members), sum(m[t].cost for m in members),
                                  sum(m[t].seconds for m in members)) for t in sorted(common)))


def _range_message(budget: Budget, target: int, lo: int, hi: int, n: int) -> str:
    return (f"budget {budget} ({target / 1e6:.2f} MB) is not achievable for this model: sizes range from "
            f"{lo / 1e6:.2f} MB ({bpw(lo, n):.3f} bpw) to {hi / 1e6:.2f} MB ({bpw(hi, n):.3f} bpw) "
            "with the allowed types")


def _assemble(scores: Scores, budget: str, target: int, chosen: dict[str, QuantType],
              options: dict[str, dict[QuantType, Option]], settings: dict[str, object]) -> Plan:
    entries = []
    for s in scores.layout.slots:
        if s.quantized:
            t = chosen[s.name]
            ts = scores.tensors[s.name]
            entries.append(PlanEntry(s.name, s.shape, t, s.candidates[t], s.role, s.layer,
                                     ts.errors[t], options[s.name][t].cost))
        else:
            entries.append(PlanEntry(s.name, s.shape, s.source_type, s.fixed_bytes, s.role, s.layer))
    return Plan(tuple(entries), budget, target, scores.layout.total_elements, scores.strategy,
                scores.source, {**scores.settings, **settings}, scores.layout.arch)
