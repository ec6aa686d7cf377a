#!/usr/bin/env python3
"""Calibrate the planner's objective weights against measured end-to-end KL-divergence.

For every tensor group (role@depth, e.g. ``ffn_down@early``), quantize only that group to a probe type
(Q4_0, which every row length of 32 takes) and everything else to Q8_0, and measure the KLD against
the F16 source on calibration text. The group's weight is

    gain = (KLD(group at probe) - KLD(all Q8_0)) / sum over the group of NSR(probe)

i.e. KLD per unit of the scorer's noise-to-signal ratio. The result is written into
ggufmix/data/role_gains.json under "plain" (no imatrix) or "imatrix", with its provenance.

    python scripts/calibrate_gains.py SOURCE.f16.gguf CALIB.txt [MORE.txt ...] [--imatrix FILE] [--chunks 8]

Given several texts, each probe is evaluated on ``--chunks`` of every text and its KLD is the mean over the texts:
the gains of a role differ between kinds of text (the output head's is 1.7-2.1x higher on English prose than on web,
technical and code text), so a table fitted on one kind under-prices the roles another kind leans on.

``--for-arch`` writes the table as the one for the source's architecture (``by_arch``): the planner uses it for
models of that architecture, the default table for the rest. ``--roles`` probes only those roles and adds their
gains to the default table (the others stay as they are): the roles the calibration model lacks, e.g. an untied
``output`` (SmolLM2 ties it to the embedding; Qwen2.5 does not). ``--probe`` probes at another type than Q4_0 and
writes the table as ``MODE@TYPE``; the planner reads ``MODE@Q2_K`` as each role's gain at Q2_K's noise and follows
the curve through the two probes (planner.gain_at).

Or from the KLD oracle's per-tensor measurements (``ggufmix score --strategy kld``), no probe files: each
group's gain is the sum of its tensors' measured KLDs over the sum of their noise-to-signal ratios at the
same types (the measured scorer's, kept in the kld scores' stats):

    python scripts/calibrate_gains.py --from-scores scores-kld-imatrix.json [--for-arch] [--dry-run]

The shipped imatrix tables come from there: ``ggufmix bench ... --modes imatrix --strategies measured,kld``
(docs/strategies.md) writes ``scores-kld-imatrix.json``, measured on the calibration text at the types near
the stock mixes' widths.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from ggufmix.evaluate.evaluation import evaluate
from ggufmix.io.text import read_text
from ggufmix.plan.planner import GAIN_PROBE, gain_key, gain_table, plan_from_types
from ggufmix.realize.build import quantize_plan
from ggufmix.score.measure import ScoreOptions, load_imatrix, open_source, score_source
from ggufmix.types import QuantType

PROBE = GAIN_PROBE  # a table probed at another type is written as MODE@TYPE (the planner reads MODE@LOW_PROBE)
FLOOR = QuantType.Q8_0
GAINS = Path(__file__).resolve().parent.parent / "ggufmix" / "data" / "role_gains.json"
logger = logging.getLogger("calibrate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("source", type=Path, nargs="?")
    ap.add_argument("texts", type=Path, nargs="*", help="Calibration texts (each probe's KLD is their mean).")
    ap.add_argument("--from-scores", type=Path, help="kld scores.json: fit the gains from the oracle's measurements.")
    ap.add_argument("--imatrix", type=Path)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "ggufmix-calibrate")
    ap.add_argument("--dry-run", action="store_true", help="Print the gains, do not write role_gains.json.")
    ap.add_argument("--probe", default=PROBE.name, help="Probe type (default Q4_0; every row length of 32 takes it).")
    ap.add_argument("--for-arch", action="store_true",
                    help="Write the gains as the table of the source's architecture (by_arch), not the default's.")
    ap.add_argument("--roles", help="Comma-separated roles to probe and add to the table (default: all, replacing it).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.for_arch and args.roles:
        ap.error("--for-arch writes a whole table for the architecture: leave out --roles")
    if args.from_scores:
        return _from_oracle(args)
    if args.source is None or not args.texts:
        ap.error("give SOURCE and TEXT, or --from-scores")
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    probe = QuantType[args.probe.upper()]
    src = open_source(args.source, False)
    imatrix = load_imatrix(args.imatrix, src)
    scores = score_source(src, ScoreOptions(imatrix=args.imatrix), imatrix)
    layout = scores.layout
    groups: dict[str, list[str]] = defaultdict(list)
    for s in layout.slots:
        if s.quantized and (not args.roles or s.role in args.roles.split(",")):
            groups[gain_key(s, layout.n_layers, layout.tied_embeddings)].append(s.name)
    if not groups:
        raise SystemExit(f"{args.source}: no quantized tensor has a role in --roles {args.roles}")
    probes = {"floor": set(), **{key: set(names) for key, names in sorted(groups.items())}}
    kld = _measure_klds(probes, scores, src.path, imatrix, probe, args)
    gains = {}
    for key, names in sorted(groups.items()):
        nsr = sum(scores.tensors[n].errors[probe] - scores.tensors[n].errors[FLOOR] for n in names)
        gains[key] = max(kld[key] - kld["floor"], 1e-6) / max(nsr, 1e-12)
        print(f"{key:<24} {len(names):>3} tensors  KLD {kld[key]:.5f}  sum NSR {nsr:.4f}  gain {gains[key]:.4f}")
    print(f"floor (all {FLOOR.name}) KLD {kld['floor']:.5f}; {time.perf_counter() - t0:.0f} s")
    if not args.dry_run:
        texts = " ".join(t.name for t in args.texts)
        command = (f"scripts/calibrate_gains.py {src.path.name} {texts} --chunks {args.chunks} --ctx {args.ctx}"
                   + (f" --imatrix {args.imatrix.name}" if args.imatrix else "")
                   + f"; probe {probe.name} vs floor {FLOOR.name}")
        mode = "imatrix" if args.imatrix else "plain"
        _write(gains, gain_table(mode, probe), command,
               arch=src.arch if args.for_arch else None, roles=args.roles)


def oracle_gains(scores) -> dict[str, tuple[float, int]]:  # noqa: ANN001
    """role@depth -> (sum of measured KLD / sum of NSR at the measured types, measurements)."""
    kld: dict[str, float] = defaultdict(float)
    nsr: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    layout = scores.layout
    for s in layout.slots:
        ts = scores.tensors.get(s.name)
        if ts is None:
            continue
        key = gain_key(s, layout.n_layers, layout.tied_embeddings)
        for k, v in ts.stats.items():
            if k.startswith("kld.") and f"nsr.{k[4:]}" in ts.stats:
                kld[key] += v
                nsr[key] += ts.stats[f"nsr.{k[4:]}"]
                count[key] += 1
    return {k: (max(kld[k], 1e-9) / max(nsr[k], 1e-12), count[k]) for k in sorted(kld)}


def _from_oracle(args: argparse.Namespace) -> None:
    from ggufmix.scores import Scores

    scores = Scores.load(args.from_scores)
    if scores.settings.get("units") != "kld":
        raise SystemExit(f"{args.from_scores}: not kld scores (ggufmix score --strategy kld)")
    fitted = oracle_gains(scores)
    for key, (g, n) in fitted.items():
        print(f"{key:<24} {n:>4} measurements  gain {g:.5f}")
    if not args.dry_run:
        imatrix = scores.settings.get("imatrix")
        o = scores.settings["oracle"]
        command = (f"ggufmix score {Path(scores.source['path']).name} --strategy kld "
                   f"--calib {Path(scores.settings['calib']['text']).name}"
                   + (f" --imatrix {Path(imatrix).name}" if imatrix else "")
                   + f" --oracle chunks={o['chunks']},ctx={o['ctx']},start={o['start']},types={o['max_types']}"
                   + f" (widths {','.join(f'{w:g}' for w in o['widths'])} bpw)"
                   + f"; scripts/calibrate_gains.py --from-scores {args.from_scores.name}")
        _write({k: g for k, (g, _) in fitted.items()}, "imatrix" if imatrix else "plain", command,
               arch=scores.layout.arch if args.for_arch else None, roles=args.roles)


def _measure_klds(probes: dict[str, set[str]], scores, source: Path, imatrix, probe: QuantType,  # noqa: ANN001
                  args: argparse.Namespace) -> dict[str, float]:
    """KLD of every probe (its group at ``probe``, the rest at FLOOR), the mean over the texts. Each probe file is
    evaluated on every text as soon as it is written and then deleted (a Qwen2.5-1.5B probe is 1.9 GB, 43 GB for all
    23), its KLDs journaled per text in the workdir's kld.json: an interrupted run resumes, a run with one more text
    evaluates only that one, and re-scoring (a new error measure) needs no new eval, since the probes' types, hence
    their KLDs, do not depend on the scores."""
    key = {"source": str(source), "chunks": args.chunks, "ctx": args.ctx, "imatrix": str(args.imatrix),
           "probe": probe.name}
    cache = args.workdir / "kld.json"
    doc = json.loads(cache.read_text()) if cache.exists() else {}
    by_text: dict[str, dict[str, float]] = doc.get("kld", {}) if doc.get("key") == key else {}
    texts = {str(t): read_text(t) for t in args.texts}
    for name, group in probes.items():
        missing = [t for t in texts if name not in by_text.get(t, {})]
        if not missing:
            continue
        out = args.workdir / f"{name.replace('@', '-')}-{probe.name}.gguf"
        chosen = {s.name: probe if s.name in group else FLOOR for s in scores.layout.slots if s.quantized}
        try:
            quantize_plan(source, out, plan_from_types(scores, chosen, out.stem), imatrix, progress=False)
            for t in missing:
                report = evaluate(source, [out], texts[t], ctx=args.ctx, chunks=args.chunks)
                by_text.setdefault(t, {})[name] = report.quants[0].divergence.kld.value
                cache.write_text(json.dumps({"key": key, "kld": by_text}, indent=1))
        finally:
            out.unlink(missing_ok=True)
    return {name: sum(by_text[t][name] for t in texts) / len(texts) for name in probes}


def _write(gains: dict[str, float], table: str, command: str, *, arch: str | None = None,
           roles: str | None = None) -> None:
    """Write ``gains`` as role_gains.json's ``table`` ("plain" or "imatrix"): the architecture's own (``arch``),
    added to the default's (``roles``), or the default table itself; ``command`` is its provenance."""
    doc = json.loads(GAINS.read_text())
    if arch:  # the planner takes this table for models of this architecture
        entry = doc.setdefault("by_arch", {}).setdefault(arch, {})
        entry[table] = {k: round(v, 6) for k, v in gains.items()}
        entry.setdefault("provenance_by_table", {})[table] = command + " --for-arch"
    elif roles:  # added to the table; each added key keeps its own command
        doc[table].update({k: round(v, 6) for k, v in gains.items()})
        doc.setdefault("provenance_by_key", {}).setdefault(table, {}).update(
            {k: command + f" --roles {roles}" for k in gains})
    else:
        doc[table] = {k: round(v, 6) for k, v in gains.items()}
        doc.setdefault("provenance_by_table", {})[table] = command
        doc.get("provenance_by_key", {}).pop(table, None)
    GAINS.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GAINS} [{table}]")


if __name__ == "__main__":
    sys.exit(main())
