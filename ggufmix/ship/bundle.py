"""``--bundle DIR``: the built GGUF with everything needed to run, share and reproduce it.

    DIR/model.gguf      the single-file model (Ollama needs one file)
    DIR/Modelfile       FROM ./model.gguf, template, stops, context (see modelfile.py)
    DIR/README.md       model card: source, budget, recipe summary, quality numbers, picture
    DIR/recipe.txt      llama-quantize --tensor-type-file (rebuild with plain llama.cpp)
    DIR/plan.json       every tensor's type and score
    DIR/build.json      verification and timings
    DIR/validate.json   with ``build --validate``: ``ggufmix validate``'s report (also a section of the card)
    DIR/layers.png      types layer by layer (when matplotlib is installed)
    DIR/SHA256SUMS      ``sha256sum -c SHA256SUMS`` checks every file above

The bundle is assembled in a temporary folder beside DIR and renamed into place at the end.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from ggufmix.plan.plan import Plan
from ggufmix.realize.build import BuildResult
from ggufmix.realize.overrides import base_ftype
from ggufmix.ship.modelfile import modelfile
from ggufmix.types import mix_name

logger = logging.getLogger(__name__)

SIDECARS = {"plan.json": ".plan.json", "recipe.txt": ".recipe.txt", "build.json": ".build.json"}
OPTIONAL_SIDECARS = {"validate.json": ".validate.json"}
CHECKSUMS = "SHA256SUMS"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksums(folder: Path) -> Path:
    """``SHA256SUMS`` over every other file of ``folder``, sorted, in sha256sum's format."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS)
    out = folder / CHECKSUMS
    out.write_text("".join(f"{sha256(folder / n)}  {n}\n" for n in names))
    return out


def finish_bundle(staging: Path, final: Path, *, modelfile_text: str, card: str) -> Path:
    """Rename the build's sidecars, add Modelfile, card, picture and checksums, then move into place.

    ``staging`` holds ``model.gguf`` and its ``model.*`` sidecars as ``build`` wrote them.
    """
    for name, suffix in SIDECARS.items():
        (staging / f"model{suffix}").replace(staging / name)
    for name, suffix in OPTIONAL_SIDECARS.items():
        if (staging / f"model{suffix}").exists():
            (staging / f"model{suffix}").replace(staging / name)
    (staging / "Modelfile").write_text(modelfile_text)
    (staging / "README.md").write_text(card)
    try:
        from ggufmix import plots
    except ImportError:
        logger.warning("matplotlib is not installed: the bundle has no layers.png (pip install 'ggufmix[plot]')")
    else:
        plots.layers(staging / "plan.json", staging / "layers.png")
    write_checksums(staging)
    if final.exists():
        shutil.rmtree(final)
    staging.replace(final)
    return final


def front_matter(meta: dict[str, Any]) -> list[str]:
    """The hub's model-card metadata (YAML between ``---`` lines): what the GGUF header says about the source."""
    import json

    fields: dict[str, Any] = {}
    if isinstance(meta.get("general.license"), str):
        fields["license"] = meta["general.license"]
    langs = meta.get("general.languages")
    if isinstance(langs, list) and all(isinstance(x, str) for x in langs):
        fields["language"] = langs
    for key in ("general.base_model.0.repo_url", "general.source.repo_url"):
        url = meta.get(key)
        if isinstance(url, str) and url.startswith("https://huggingface.co/") and url.count("/") == 4:
            fields["base_model"] = url.removeprefix("https://huggingface.co/")
            fields["base_model_relation"] = "quantized"
            break
    fields["library_name"] = "gguf"
    fields["tags"] = ["gguf", "ggufmix", "llama.cpp", "quantized"]
    # JSON scalars and lists are valid YAML, and quote whatever the header holds
    return ["---", *(f"{k}: {json.dumps(v)}" for k, v in fields.items()), "---", ""]


def group_table(plan: Plan) -> list[str]:
    """Bytes per group (experts, shared experts, attention, embeddings ...): how MoE quants are compared."""
    groups = plan.by_group()
    rows = ["| group | tensors | MB | share | bpw | types by bytes |", "|---|---|---|---|---|---|"]
    for g, d in groups.items():
        types = ", ".join(t for t, _ in sorted(d["types"].items(), key=lambda kv: -kv[1]))
        rows.append(f"| {g} | {d['tensors']} | {d['bytes'] / 1e6:.2f} | {100 * d['bytes'] / max(plan.total_bytes, 1):.1f}% "
                    f"| {8 * d['bytes'] / max(d['elements'], 1):.3f} | {types} |")
    return rows


def model_card(plan: Plan, meta: dict[str, Any], *, verified: dict[str, Any], fit_lines: list[str] | None,
               quality: dict[str, Any] | None, rebuild: str, has_picture: bool,
               validation: list[str] | None = None) -> str:
    """README.md of the bundle (Markdown); ``validation`` is ``ship.validate.card_section``'s lines."""
    name = str(meta.get("general.name") or plan.source.get("name", "model"))
    lines = [*front_matter(meta), f"# {name}: ggufmix mixed-precision GGUF, {plan.bpw:.3f} bpw", "",
             f"Built by ggufmix {plan.versions.get('ggufmix', '?')} with llama.cpp's quantizer "
             f"(llama-cpp-python {plan.versions.get('llama-cpp-python', '?')}) from `{plan.source.get('name')}` "
             f"({meta.get('general.architecture', '?')}), strategy `{plan.strategy}`, budget `{plan.budget}`.", "",
             f"- tensor data {plan.total_bytes / 1e6:.2f} MB, file {verified['file_bytes'] / 1e6:.2f} MB, "
             f"{verified['n_tensors']} tensors verified against the plan", ""]
    if fit_lines:
        lines += ["## Memory budget", "", "```", *fit_lines, "```", ""]
    lines += ["## Types", "", "| type | tensors | MB |", "|---|---|---|"]
    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for e in plan.entries:
        by_type[e.qtype.name][0] += 1
        by_type[e.qtype.name][1] += e.bytes
    lines += [f"| {t} | {n} | {b / 1e6:.2f} |" for t, (n, b) in sorted(by_type.items(), key=lambda kv: -kv[1][1])]
    lines += ["", "| role | types (tensors) |", "|---|---|"]
    roles: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in plan.quantized():
        roles[e.role][e.qtype.name] += 1
    lines += [f"| {r} | {', '.join(f'{t} ({n})' for t, n in sorted(ts.items()))} |" for r, ts in sorted(roles.items())]
    lines += ["", *group_table(plan)]
    if quality:
        lines += ["", "## Quality (ggufmix eval against the source)", "",
                  f"{quality['settings']}", "", "| PPL source | PPL this file | mean KLD | p99 KLD | same top-1 |",
                  "|---|---|---|---|---|",
                  f"| {quality['base_ppl']:.3f} | {quality['ppl']:.3f} | {quality['kld']:.4f} ± {quality['kld_err']:.4f} "
                  f"| {quality['kld_p99']:.3f} | {100 * quality['top1']:.2f}% |"]
    if validation:
        lines += ["", *validation]
    if has_picture:
        lines += ["", "## Types layer by layer", "", "![types per layer](layers.png)"]
    lines += ["", "## Run", "", "```", "ollama create my-model -f Modelfile && ollama run my-model",
              "llama-cli -m model.gguf -cnv --no-mmap" if fit_lines else "llama-cli -m model.gguf -cnv", "```", "", "## Rebuild with plain llama.cpp", "", "```", rebuild, "```",
              "", f"Check the files with `sha256sum -c {CHECKSUMS}`.", ""]
    return "\n".join(lines)


def write_bundle(model: Path, meta: dict[str, Any], staging: Path, final: Path, res: BuildResult, *,
                 fit_lines: list[str] | None, quality: dict[str, Any] | None, imatrix: Path | None,
                 fit_ctx: tuple[int, int] | None, validation: list[str] | None = None) -> Path:
    """The bundle of a finished build of ``model`` (whose header is ``meta``): Modelfile, model card (with the
    llama-quantize line that rebuilds it, and ``validation``: ``ship.validate.card_section``'s lines), checksums,
    renamed from ``staging`` to ``final``."""
    ftype = base_ftype(res.plan)
    name = mix_name(ftype)
    rebuild = ("llama-quantize --tensor-type-file recipe.txt " + (f"--imatrix {imatrix.name} " if imatrix else "")
               + f"{model.name} model.gguf {name}")
    chat = meta.get("tokenizer.chat_template")
    text = modelfile("model.gguf", chat if isinstance(chat, str) else None,
                     num_ctx=fit_ctx[0] if fit_ctx else None, num_batch=fit_ctx[1] if fit_ctx else None,
                     use_mmap=False if fit_ctx else None)
    card = model_card(res.plan, meta, verified=res.verified.__dict__, fit_lines=fit_lines, quality=quality,
                      rebuild=rebuild, has_picture=importlib.util.find_spec("matplotlib") is not None,
                      validation=validation)
    return finish_bundle(staging, final, modelfile_text=text, card=card)
