"""Text files read by evaluation and calibration alike: the text, minus wiki-dump wrappers, and its digest."""
from __future__ import annotations

import hashlib
from pathlib import Path

from ggufmix.errors import InputError


def read_text(path: Path) -> str:
    """A text file, minus ``<doc ...>`` / ``</doc>`` wrapper lines (wiki.utf8 style).

    Raises:
        InputError: the file is missing or not UTF-8.
    """
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the text ({e})") from None
    keep = [ln for ln in raw.splitlines(keepends=True) if not ln.startswith(("<doc", "</doc"))]
    return "".join(keep)


def text_sha256(text: str) -> str:
    """The digest that keys caches made from a text (base logits, block statistics)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
