"""The one JSON reader/writer for ggufmix's versioned artifacts (scores, plan, build, report).

Every file is ``{"format": "ggufmix.<kind>", "version": N, ...}``, written atomically and with
sorted keys so the same inputs give byte-identical files.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ggufmix.errors import InputError, UsageError

VERSIONS = {"scores": 2, "plan": 1, "build": 1, "report": 1, "validate": 1}


def write_artifact(path: str | os.PathLike[str], kind: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as a ``ggufmix.<kind>`` artifact, atomically."""
    doc = {"format": f"ggufmix.{kind}", "version": VERSIONS[kind], **payload}
    return write_text_atomic(path, json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read_artifact(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """Read and check a ``ggufmix.<kind>`` artifact.

    Raises:
        InputError: missing, not JSON, another kind, or a version this ggufmix does not read.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not a ggufmix {kind} file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != f"ggufmix.{kind}":
        raise InputError(f"{p}: not a ggufmix {kind} file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSIONS[kind]:
        raise InputError(f"{p}: {kind} version {doc.get('version')!r}; this ggufmix reads version {VERSIONS[kind]}")
    return doc


def cache_root() -> Path:
    """``${GGUFMIX_CACHE:-~/.cache/ggufmix}``: base logits, score journals."""
    return Path(os.environ.get("GGUFMIX_CACHE") or Path.home() / ".cache" / "ggufmix").expanduser()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(path: Path) -> Path:
    """An empty temporary file in ``path``'s folder, with the permissions a plain ``open`` would give.

    ``mkstemp`` makes files only the owner can read; renamed into place they would surprise users. Ctrl-C and
    ``kill`` (a KeyboardInterrupt, cli._terminate) wait while the file is made, and one that arrives before it is
    returned removes it: the caller's cleanup only starts once it holds the name (a build killed just as its
    temporary file appeared left it behind: tests/test_build.py, tests/test_cli.py).
    """
    tmp = None
    try:
        with _interrupts_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                os.fchmod(fd, 0o666 & ~_umask())
            finally:
                os.close(fd)
        made = Path(tmp)
    except BaseException:
        if tmp is not None:
            os.unlink(tmp)
        raise
    return made


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread for the block, delivered when it ends (where the platform can)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write through a temporary file in the same folder and rename it into place."""
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"{p}: folder {p.parent} does not exist")
    tmp = temp_beside(p)
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
