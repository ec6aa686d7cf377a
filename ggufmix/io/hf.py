"""MODEL as a GGUF file, a local Hugging Face folder, or a hub repo id: always a float GGUF in the end.

Hub repos come through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HOME``,
``HF_HUB_OFFLINE``, tokens and progress bars), fetching only what conversion reads. Folders are
checked before anything heavy runs: only safetensors are loaded (pickle can run code when
unpickled), shards named by ``model.safetensors.index.json`` must all be there, and custom model
code is refused. Conversion is llama.cpp's own converter (:mod:`ggufmix.io.llamacpp_src`); its
output is cached under ``${GGUFMIX_CACHE}/converted`` keyed by source, content, revision, outtype
and converter version, so another budget does not convert again.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ggufmix.artifacts import cache_root, temp_beside
from ggufmix.errors import InputError, MissingDependencyError, UsageError
from ggufmix.io.llamacpp_src import (
    INSTALL_HINT,
    OUTTYPES,
    locate_converter,
    run_converter,
)
from ggufmix.io.safetensors_header import read_header

logger = logging.getLogger(__name__)

# What conversion reads; never pickles (*.bin, *.pt) and never code (*.py).
HUB_PATTERNS = ("*.safetensors", "*.json", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# config.json dtype -> converter outtype; anything else converts to f16.
_DEFAULT_OUTTYPE = {"bfloat16": "bf16"}


@dataclass(frozen=True)
class HfOptions:
    """How to turn a Hugging Face MODEL into a GGUF (``--revision``, ``--outtype``, ``--llama-cpp-dir``)."""

    revision: str | None = None
    outtype: str | None = None
    llama_cpp_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.outtype is not None and self.outtype not in OUTTYPES:
            raise UsageError(f"--outtype {self.outtype!r}: choose from {', '.join(OUTTYPES)}")


def resolve_model(model: str | Path, opts: HfOptions = HfOptions()) -> Path:
    """The GGUF to work on: MODEL itself, or the (cached) conversion of a Hugging Face folder or repo.

    Args:
        model: a .gguf path, a folder with config.json and safetensors, or a hub id ``owner/name``.
        opts: revision, outtype and converter location for Hugging Face models.

    Returns:
        A GGUF path (a missing .gguf path is returned as is, for the GGUF reader's own message).

    Raises:
        UsageError: ``--revision``/``--outtype`` given with a GGUF, ``--revision`` with a folder.
        InputError: a folder that is not a usable Hugging Face model, or a repo that cannot be had.
        MissingDependencyError: huggingface_hub or the converter's packages are missing.
        EngineError: the converter failed.
    """
    p = Path(model)
    if p.is_dir():
        if opts.revision:
            raise UsageError(f"{p}: --revision applies to hub ids, not to a local folder")
        return convert_cached(check_folder(p), str(p.resolve()), opts)
    if p.exists() or p.suffix == ".gguf" or not _REPO_ID.match(str(model)):
        if opts.revision or opts.outtype:
            raise UsageError(f"{p}: --revision and --outtype apply to Hugging Face models, not to a GGUF file")
        return p
    folder = check_folder(download(str(model), opts.revision, opts.progress), str(model))
    return convert_cached(folder, str(model), opts)


def check_folder(folder: Path, label: str | None = None) -> Path:
    """Refuse, in one line naming the folder, what must not or cannot be converted.

    Raises:
        InputError: no config.json, no safetensors (pickle-only folders say why), a shard named by the
            index that is missing, a truncated or damaged safetensors file, or custom model code.
    """
    name = label or str(folder)
    if not (folder / "config.json").is_file():
        raise InputError(f"{name}: no config.json; expected a .gguf file or a Hugging Face model folder")
    shards = safetensors_files(folder, name)
    if not shards:
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES
                         or f.name.endswith(".bin.index.json"))
        if pickles:
            raise InputError(f"{name}: only pickle weights ({', '.join(pickles[:3])}); ggufmix loads safetensors "
                             "only, because unpickling can run arbitrary code (use a revision with .safetensors)")
        raise InputError(f"{name}: no .safetensors weights")

    for shard in shards:
        read_header(shard)  # a truncated download is named here, not deep inside the converter
    code = sorted(f.name for f in folder.glob("*.py"))
    if code and any("auto_map" in _json(folder / c) for c in ("config.json", "tokenizer_config.json")):
        raise InputError(f"{name}: needs its own model code ({code[0]}, auto_map); ggufmix never runs "
                         "repository code (there is no --trust-remote-code)")
    return folder


def safetensors_files(folder: Path, label: str | None = None) -> list[Path]:
    """The weight files: the shards the index names (all must exist), else every ``*.safetensors``.

    Raises:
        InputError: an unreadable index, or a shard it names that is not in the folder.
    """
    index = folder / INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    weight_map = _json(index, label).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: no weight_map")
    files = sorted({folder / str(f) for f in weight_map.values()})
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{index}: names {missing[0]}, which is not in {label or folder}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return files


def _json(path: Path, label: str | None = None) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{label + ': ' if label else ''}{path.name}: not readable JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object")
    return doc


def download(repo_id: str, revision: str | None, progress: bool = True) -> Path:
    """``snapshot_download`` of the files conversion needs; the local snapshot folder.

    Raises:
        MissingDependencyError: huggingface_hub is not installed.
        InputError: unknown/gated repo or revision, offline without a cached copy, network failure.
    """
    try:
        import huggingface_hub
        from huggingface_hub.utils import (
            are_progress_bars_disabled,
            disable_progress_bars,
            enable_progress_bars,
        )
    except ImportError:
        raise MissingDependencyError(f"{repo_id}: downloading from the Hugging Face Hub needs huggingface_hub: "
                                     f"{INSTALL_HINT}") from None
    quiet = not progress and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        path = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS))
    except (OSError, ValueError) as e:  # hub errors are OSError (HTTP, offline cache miss) or ValueError (bad id)
        where = f"{repo_id}@{revision}" if revision else repo_id
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{where}: not a local file or folder, and the Hugging Face Hub says: "
                         f"{type(e).__name__}: {first}") from None
    finally:
        if quiet:
            enable_progress_bars()
    return Path(path)


def default_outtype(folder: Path) -> str:
    """bf16 for a bfloat16 checkpoint (config ``torch_dtype``/``dtype``), otherwise f16."""
    cfg = _json(folder / "config.json", str(folder))
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype") or text.get("dtype")
    return _DEFAULT_OUTTYPE.get(str(dtype), "f16")


def convert_cached(folder: Path, source: str, opts: HfOptions) -> Path:
    """The converted GGUF of ``folder`` from the cache, converting it first on a miss.

    Raises:
        UsageError: too little free disk in the cache for the conversion.
        MissingDependencyError, EngineError: from the converter.
    """
    outtype = opts.outtype or default_outtype(folder)
    conv = locate_converter(opts.llama_cpp_dir, fetch=False)
    key = cache_key(folder, source, opts.revision, outtype, conv.version)
    slug = re.sub(r"[^\w.-]+", "-", source.strip("/").split("/")[-1])[:60] or "model"
    out = cache_root() / "converted" / f"{slug}-{outtype}-{key}.gguf"
    if out.is_file():
        logger.info("%s: converted before, using %s", source, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    need = sum(f.stat().st_size for f in safetensors_files(folder)) * (2 if outtype == "f32" else 1)
    free = shutil.disk_usage(out.parent).free
    if free < need + (64 << 20):
        raise UsageError(f"{out.parent}: {free / 1e6:.0f} MB free, converting {source} needs about "
                         f"{need / 1e6:.0f} MB (set GGUFMIX_CACHE to a bigger disk)")
    with safetensors_view(folder) as view:
        run_converter(locate_converter(opts.llama_cpp_dir), view, out, outtype, opts.progress, label=source)
    return out


@contextlib.contextmanager
def safetensors_view(folder: Path) -> Iterator[Path]:
    """``folder`` as the converter should see it: without pickle files (``training_args.bin`` ...).

    The converter falls back to ``torch.load`` of ``pytorch_model*.bin`` when it finds no
    ``model*.safetensors``; a view of symlinks to everything else (same folder name, which becomes
    the GGUF's ``general.name``) makes loading a pickle impossible, not just unlikely.
    """
    if not any(f.suffix in PICKLE_SUFFIXES for f in folder.iterdir()):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="ggufmix-view-") as tmp:
        view = Path(tmp) / folder.resolve().name
        view.mkdir()
        for f in folder.iterdir():
            if f.suffix not in PICKLE_SUFFIXES:
                (view / f.name).symlink_to(f.resolve())
        yield view


def cache_key(folder: Path, source: str, revision: str | None, outtype: str, converter: str) -> str:
    """16 hex digits over the source, every top-level file's name/size/mtime, revision, outtype, converter."""
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                   if f.is_file() and not f.name.startswith("."))
    doc = {"source": source, "files": files, "revision": revision, "outtype": outtype, "converter": converter}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def copy_converted(src: Path, out: Path) -> Path:
    """Copy a converted GGUF out of the cache, through a temporary file beside ``out`` (checked by the caller)."""
    tmp = temp_beside(out)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
