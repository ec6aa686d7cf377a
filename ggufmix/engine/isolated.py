"""llama.cpp calls on files from elsewhere, run in a child process so that a crash becomes an error message.

llama.cpp ends the whole process on some malformed metadata that ggufmix's own reader cannot judge: a
GGML_ASSERT in the vocabulary loader (two tokens with the same text), an uncaught ``std::out_of_range`` while
turning tokens back into text (a byte token that is not valid UTF-8). No Python handler can catch an abort, so
``ggufmix build`` would die half-way with a C++ message (found by ``scripts/fuzz.py --build``). Here the child
is ``python -m ggufmix.engine.isolated TASK PATH``; it prints one JSON line; a child killed by a signal becomes
an :class:`~ggufmix.errors.EngineError` naming the file, the signal and llama.cpp's last line on stderr.

Tasks: ``vocab`` (load hyper-parameters and vocabulary only: a second or less, run before hours of work) and
``smoke`` (load everything, generate a few tokens: the build's smoke test).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ggufmix.errors import EngineError

_TASKS = {"vocab": "reading its metadata and vocabulary", "smoke": "loading it and generating a few tokens"}


def check_loads(path: str | os.PathLike[str], label: str | None = None) -> None:
    """llama.cpp reads the hyper-parameters and vocabulary of ``path`` without crashing or refusing.

    Raises:
        EngineError: llama.cpp refused the file or crashed reading it (the message names ``label`` or the path).
    """
    _run("vocab", Path(path), label or str(path))


def smoke_test_isolated(path: str | os.PathLike[str], label: str | None = None) -> str:
    """:func:`ggufmix.engine.generate.smoke_test` in a child process; its greedy continuation.

    Raises:
        EngineError: as ``smoke_test``, or llama.cpp crashed.
    """
    return str(_run("smoke", Path(path), label or str(path))["text"])


def _run(task: str, path: Path, label: str) -> dict[str, object]:
    return run_child("ggufmix.engine.isolated", [task, str(path), label], label, _TASKS[task])


_HINT = "; the file's metadata is damaged or not supported by this llama.cpp"


# The child loads llama.cpp's libraries before anything imports numpy, then runs MODULE as ``python -m`` would.
# With the numpy wheel of some images (2.5 with scipy-openblas, seen on a CUDA machine) loaded first, libllama's
# std::regex resolved into libggml-cuda and the BPE tokenizer segfaulted while loading the vocabulary.
_CHILD_BOOT = """\
import runpy, sys
try:
    import llama_cpp  # noqa: F401
except ImportError:
    pass  # the module reports it in one line
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_child(module: str, args: list[str], label: str, doing: str, timeout: float | None = None,
              hint: str = _HINT) -> dict[str, object]:
    """``python -m MODULE ARGS`` in a child process; the one JSON object it prints last on stdout.

    Args:
        module: the child's module (its ``main`` prints one JSON line; ``{"error": ...}`` for a refusal).
        args: its arguments.
        label: what error messages name (the file).
        doing: what the child does, for the crash message ("loading it and generating a few tokens").
        timeout: seconds before the child is killed (None: no limit).
        hint: appended to a crash message.

    Raises:
        EngineError: the child crashed (the signal and llama.cpp's last line), timed out, printed no JSON, or
            reported an error.
    """
    cmd = [sys.executable, "-c", _CHILD_BOOT, module, *args]
    env = os.environ | {"GGML_NO_BACKTRACE": "1"}  # ggml_abort would otherwise attach gdb for a backtrace
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError(f"{label}: llama.cpp did not finish {doing} within {timeout:.0f} s") from None
    last = _cause(r.stderr)
    if r.returncode < 0:
        try:
            sig = signal.Signals(-r.returncode).name
        except ValueError:
            sig = f"signal {-r.returncode}"
        raise EngineError(f"{label}: llama.cpp crashed ({sig}) {doing}: {last[:300]}{hint}")
    try:
        doc = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EngineError(f"{label}: the llama.cpp child process failed (exit {r.returncode}): {last[:300]}") from None
    if "error" in doc:
        raise EngineError(str(doc["error"]))
    return dict(doc)


def _cause(stderr: str) -> str:
    """The line of a child's stderr that says why it died: GGML_ASSERT, a C++ ``what():``, an error; else the last."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for mark in ("GGML_ASSERT", "what()", "error"):
        for ln in reversed(lines):
            if mark in ln:
                return re.sub(r"\S*/(?=[\w.-]+:\d+: )", "", ln)  # the build machine's source path says nothing
    return lines[-1] if lines else "no message"


def _vocab(path: Path, label: str) -> dict[str, object]:
    from ggufmix.engine.llamalib import last_error, llama

    lib = llama()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise EngineError(f"{label}: llama.cpp cannot read it: {last_error()}")
    try:
        return {"n_vocab": int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model)))}
    finally:
        lib.llama_model_free(model)


def _smoke(path: Path, label: str) -> dict[str, object]:
    from ggufmix.engine.generate import smoke_test

    return {"text": smoke_test(path, label=label)}


def main(argv: list[str]) -> int:
    """Child entry point: ``TASK PATH LABEL``; one JSON line on stdout."""
    task, path, label = argv
    return reply(lambda: {"vocab": _vocab, "smoke": _smoke}[task](Path(path), label), EngineError)


def reply(compute: Callable[[], dict[str, Any]], refusal: type[Exception]) -> int:
    """A child's answer to ``run_child``: ``compute()``'s document, or ``{"error": ...}`` when llama.cpp refused
    (``refusal``), as one JSON line on stdout."""
    try:
        doc = compute()
    except refusal as e:
        doc = {"error": str(e)}
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
