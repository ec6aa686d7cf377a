"""Train FastEWQ's metadata classifier on full-EWQ scores and report leave-one-model-out agreement.

    ggufmix score MODEL.gguf --strategy ewq -o smollm2-ewq.json        # for every model you can get
    python scripts/train_fastewq.py smollm2=smollm2-ewq.json qwen=qwen-ewq.json gemma3=gemma3-ewq.json \
        -o ggufmix/data/fastewq.json

Labels: full EWQ's keep side (block entropy above the model's mean). Features: ggufmix/score/fastewq.py.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ggufmix.score.base import ModelContext
from ggufmix.score.fastewq import FEATURES, block_features, fit_logistic, labels_from_entropy, predict
from ggufmix.score.layerwise import ewq_blocks
from ggufmix.scores import Scores


def model_rows(path: Path) -> tuple[np.ndarray, np.ndarray]:
    scores = Scores.load(path)
    if scores.strategy not in ("ewq", "measured+ewq"):
        raise SystemExit(f"{path}: scored with {scores.strategy!r}; FastEWQ learns from --strategy ewq")
    slots = tuple(s for s in scores.layout.slots if s.quantized)
    ctx = ModelContext(slots, scores.layout.n_layers, {})
    labels = labels_from_entropy(ewq_blocks(scores.tensors, ctx))
    feats = block_features(slots, scores.layout.n_layers)
    blocks = sorted(labels)
    return np.array([feats[b] for b in blocks]), np.array([labels[b] for b in blocks], dtype=np.float64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="NAME=scores.json (strategy ewq)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    data = {}
    for item in args.models:
        name, _, path = item.partition("=")
        data[name] = model_rows(Path(path))
    lomo = {}
    print(f"{'held-out model':<16} {'blocks':>6} {'agreement':>9}  (trained on the others)")
    for held in data:
        x = np.vstack([data[m][0] for m in data if m != held])
        y = np.concatenate([data[m][1] for m in data if m != held])
        model = fit_logistic(x, y)
        hx, hy = data[held]
        agree = float(((predict(model, hx) > 0.5) == hy).mean())
        lomo[held] = {"blocks": len(hy), "agreement": round(agree, 4)}
        print(f"{held:<16} {len(hy):>6} {agree:>9.1%}")
    blocks = sum(v["blocks"] for v in lomo.values())
    overall = sum(v["agreement"] * v["blocks"] for v in lomo.values()) / blocks
    print(f"{'all (weighted)':<16} {blocks:>6} {overall:>9.1%}")
    model = fit_logistic(np.vstack([d[0] for d in data.values()]), np.concatenate([d[1] for d in data.values()]))
    doc = {"format": "ggufmix.fastewq", "version": 1, "features": list(FEATURES), "model": model,
           "trained_on": sorted(data), "leave_one_model_out": lomo, "lomo_agreement": round(overall, 4),
           "command": "python scripts/train_fastewq.py " + " ".join(args.models)}
    args.output.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
