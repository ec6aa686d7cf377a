#!/usr/bin/env python3
"""Round trip of a real model through ggufmix's Hugging Face path: F16 GGUF -> HF folder -> ggufmix -> GGUF.

1. transformers loads the F16 GGUF (``from_pretrained(dir, gguf_file=...)``, needs accelerate) and
   ``save_pretrained``s it as float16 safetensors;
2. the tokenizer transformers rebuilds from GGUF metadata is put back the way the original repo
   ships it, so llama.cpp's converter recognises its pre-tokenizer by hash: byte-level BPE with
   individual digits, no byte fallback, no BOS added by the post-processor, no ``tokenizer.model``
   (transformers writes the GGUF itself under that name), special tokens from the GGUF's ids;
3. ``python -m ggufmix convert FOLDER --outtype f16`` converts it (llama.cpp's converter, cached);
4. every tensor and tokenizer key is compared with the original, and
   ``python -m ggufmix eval BASE CONVERTED --text TEXT --chunks N`` gives both perplexities;
5. with ``--budget``, ``ggufmix build`` from the GGUF and from the folder, and the two outputs compared.

Needs the extra ``hf`` plus accelerate (transformers' GGUF loader): ``pip install 'ggufmix[hf]' accelerate``.

Usage (SmolLM2-135M from scripts/fetch_bench_data.sh):
    python scripts/check_hf_roundtrip.py ~/.cache/ggufmix-bench/smollm2-135m.f16.gguf \
        --text ~/.cache/ggufmix-bench/text/eval-wiki.txt --chunks 10 --work smollm2-hf [--budget 4.5bpw]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

# Original tokenizer.json parts of a byte-level BPE repo (SmolLM2's, as published by HuggingFaceTB).
_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
_POST = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}


def export_hf(src: Path, folder: Path) -> None:
    """Write ``src`` (an F16 GGUF) as a float16 Hugging Face folder with a converter-ready tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float16)
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(folder)
    fix_tokenizer(folder, gguf.GGUFReader(src))


def fix_tokenizer(folder: Path, reader: gguf.GGUFReader) -> None:
    """Byte-level BPE files as the original repo has them (see the module docstring)."""
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok.update(pre_tokenizer=_PRE_TOKENIZER, decoder=_DECODER, post_processor=_POST, normalizer=None)
    tok["model"]["byte_fallback"] = False
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    ids = {k: reader.fields[f"tokenizer.ggml.{k}_token_id"].contents() for k in ("bos", "eos", "unknown", "padding")
           if f"tokenizer.ggml.{k}_token_id" in reader.fields}
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "legacy", "model_type"):
        cfg.pop(key, None)
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    special = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}
    cfg.update(tokenizer_class="GPT2Tokenizer", add_prefix_space=False,
               add_bos_token=bool(add_bos.contents()) if add_bos else False,
               **{name: tokens[ids[k]] for k, name in special.items() if k in ids})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def compare(a: Path, b: Path) -> tuple[int, int, list[str]]:
    """(identical tensors, tensors, metadata keys that differ) between two GGUFs."""
    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta, tb = {t.name: t for t in ra.tensors}, {t.name: t for t in rb.tensors}
    same = sum(n in tb and ta[n].tensor_type == tb[n].tensor_type
               and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)) for n in ta)
    keys = [k for k in set(ra.fields) | set(rb.fields) if k.startswith("tokenizer.")
            and (k not in ra.fields or k not in rb.fields or _value(ra, k) != _value(rb, k))]
    return same, len(ta), sorted(keys)


def _value(r: gguf.GGUFReader, key: str) -> object:
    return r.fields[key].contents()


def ggufmix(*args: str) -> str:
    """Run ``python -m ggufmix ARGS`` from this checkout; its stdout."""
    res = subprocess.run([sys.executable, "-m", "ggufmix", *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if res.returncode:
        sys.exit(f"ggufmix {' '.join(args)} failed:\n{res.stderr}")
    return res.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path, help="F16 GGUF to round-trip")
    ap.add_argument("--text", type=Path, required=True, help="evaluation text")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--work", type=Path, required=True, help="folder for the Hugging Face export")
    ap.add_argument("--budget", help="also build both sources to this budget (e.g. 4.5bpw) and compare the outputs")
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not (args.work / "config.json").is_file():
        export_hf(args.gguf, args.work)
    t1 = time.perf_counter()
    converted = Path(ggufmix("convert", str(args.work), "--outtype", "f16").split()[-1])
    t2 = time.perf_counter()
    same, n, keys = compare(args.gguf, converted)
    rep = json.loads(ggufmix("eval", str(args.gguf), str(converted), "--text", str(args.text),
                             "--chunks", str(args.chunks), "--json"))
    base, conv = rep["base"]["perplexity"]["ppl"]["value"], rep["quants"][0]["perplexity"]["ppl"]["value"]
    kld = rep["quants"][0]["divergence"]["kld_mean"]["value"]
    print(f"export {t1 - t0:.1f} s, convert {t2 - t1:.1f} s -> {converted}")
    print(f"{same}/{n} tensors bit-identical; tokenizer keys that differ: {keys or 'none'}")
    gap = 100 * abs(conv / base - 1)
    print(f"PPL {base:.4f} (F16 GGUF) vs {conv:.4f} (via ggufmix convert), {gap:.4f}% apart (limit 0.1%); "
          f"mean KLD {kld:.6f}")
    if args.budget:
        built = [args.work.parent / f"{args.work.name}.{kind}.{args.budget}.gguf" for kind in ("gguf", "hf")]
        for model, out in zip((args.gguf, args.work), built):
            ggufmix("build", str(model), "--budget", args.budget, "-o", str(out), "--force", "--no-smoke")
        same, n, _ = compare(*built)
        print(f"ggufmix build --budget {args.budget} from the GGUF and from the folder: {same}/{n} tensors "
              "identical in type and bytes")
    sys.exit(0 if gap <= 0.1 else 1)


if __name__ == "__main__":
    main()
