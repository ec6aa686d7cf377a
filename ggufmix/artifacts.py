"""The one JSON reader/writer for ggufmix's versioned artifacts (scores, plan, build, report).

Every file is ``{"format": "ggufmix.<kind>", "version": N, ...}``, written atomically and with
sorted keys so the same inputs give byte-identical files.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
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

    ``mkstemp`` makes files only the owner can read; renamed into place they would surprise users. Made as
    :func:`_made_beside` makes it: a build killed just as its temporary file appeared left it behind
    (tests/test_build.py, tests/test_cli.py).
    """
    def make() -> str:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except BaseException:
            os.unlink(name)
            raise
        finally:
            os.close(fd)
        return name
    return _made_beside(make, os.unlink)


def dir_beside(path: Path) -> Path:
    """An empty temporary folder in ``path``'s folder (to assemble ``path`` in and rename), made as
    :func:`_made_beside` makes it."""
    return _made_beside(lambda: tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent), os.rmdir)


def _made_beside(make: Callable[[], str], remove: Callable[[str], None]) -> Path:
    """``make()``'s new file or folder, with Ctrl-C and ``kill`` (a KeyboardInterrupt, cli._terminate) held while it
    is made, and ``remove``d if one arrives before it is returned: the caller's cleanup only starts once it holds
    the name."""
    name = None
    try:
        with _interrupts_held():
            name = make()
        made = Path(name)
    except BaseException:
        if name is not None:
            remove(name)
        raise
    return made


_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """SIGINT and SIGTERM noted instead of handled for the block, and delivered again when it ends.

    Python runs signal handlers in the main thread whichever thread the kernel gives the signal to (llama.cpp's
    and OpenMP's threads included), so the handlers are swapped there rather than the thread's signal mask;
    elsewhere no handler runs in this thread and nothing is needed.
    """
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in _HELD):
        yield  # None: a handler installed from C, which Python can neither hold back nor put back
        return
    arrived: list[int] = []
    handlers = {s: signal.signal(s, lambda signum, _frame: arrived.append(signum)) for s in _HELD}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if arrived:
            signal.raise_signal(arrived[0])


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
