"""Import llama_cpp once, route llama.cpp's log into Python, keep the last lines for error messages."""
from __future__ import annotations

import collections
import ctypes
import functools
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TypeVar

from ggufmix.errors import EngineError

logger = logging.getLogger(__name__)

_INTERRUPTED = threading.Event()  # see _log and raise_pending_interrupt
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=200)
_LISTENERS: list[Callable[[str], None]] = []
_CALLBACK: list[object] = []  # the ctypes callback must stay referenced: a collected one segfaults
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]")
_LOADING = threading.RLock()
T = TypeVar("T")


def loaded_once(load: Callable[[], T]) -> Callable[[], T]:
    """``load`` run once per process, under one lock shared by every loader of llama.cpp's libraries.

    The scorers' threads reach the loaders at the same moment on the first tensors: ``functools.cache`` alone
    let two threads import llama_cpp, run ``llama_backend_init``, install the log callback and dlopen libggml
    together, which corrupted the heap now and then (glibc aborts: "unaligned tcache chunk", found by
    tests/test_fuzz_build.py, about one build in fifteen).
    """
    cached = functools.cache(load)

    @functools.wraps(load)
    def once() -> T:
        with _LOADING:
            return cached()

    return once


@loaded_once
def llama() -> ModuleType:
    """The llama_cpp module, with llama.cpp's log sent to ``logging`` (DEBUG) instead of stderr."""
    try:
        import llama_cpp
    except ImportError as e:
        raise EngineError(f"llama-cpp-python is not installed ({e}); pip install llama-cpp-python==0.3.36") from None

    @llama_cpp.llama_log_callback
    def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        try:
            line = text.decode("utf-8", "replace")
            _LOG_TAIL.append(line)
            for fn in list(_LISTENERS):
                fn(line)
            if level in (2, 3):
                logger.debug("llama.cpp: %s", line.rstrip())
        except KeyboardInterrupt:
            # Ctrl-C or `kill` (cli._terminate) landed while llama.cpp was logging: ctypes would print the exception
            # and drop it, and the build would go on. raise_pending_interrupt() raises it once llama.cpp returns.
            _INTERRUPTED.set()

    _CALLBACK.append(_log)
    llama_cpp.llama_log_set(_log, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        _without_extra_buffers(llama_cpp)
    return llama_cpp


def _without_extra_buffers(llama_cpp: ModuleType) -> None:
    """Load every model without llama.cpp's extra CPU buffer types (AMX, repack).

    On Sapphire Rapids-class CPUs llama.cpp moves quantized weights into an AMX buffer, and on some of those
    machines the first decode then segfaults in ggml_backend_amx_mul_mat (llama.cpp #20824, still open; seen
    here with every quantized type on a tiny model). ``Llama()`` takes its parameters from
    ``llama_model_default_params``, so the default itself changes, in the one place llama_cpp is imported.
    """
    default = llama_cpp.llama_cpp.llama_model_default_params

    def params_without_extra_buffers():  # noqa: ANN202 - mirrors llama_cpp's own signature
        params = default()
        params.use_extra_bufts = False
        return params

    logger.debug("llama.cpp reports AMX: models load without extra buffer types (llama.cpp #20824)")
    llama_cpp.llama_cpp.llama_model_default_params = params_without_extra_buffers
    llama_cpp.llama_model_default_params = params_without_extra_buffers


def raise_pending_interrupt() -> None:
    """Raise the Ctrl-C or ``kill`` that arrived while llama.cpp was logging (ctypes drops exceptions raised in a
    callback); call it when a long llama.cpp call returns.

    Raises:
        KeyboardInterrupt: one arrived during the call.
    """
    if _INTERRUPTED.is_set():
        _INTERRUPTED.clear()
        raise KeyboardInterrupt


def lib_dir() -> Path:
    """The folder of llama-cpp-python's shared libraries (libllama, libggml, libggml-base)."""
    return Path(llama().__file__).parent / "lib"


def log_tail(n: int = 20) -> list[str]:
    """The last ``n`` pieces of llama.cpp's log."""
    return list(_LOG_TAIL)[-n:]


def last_error() -> str:
    """The most recent llama.cpp line that looks like an error, for one-line messages."""
    text = "".join(_LOG_TAIL)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    recent = lines[-20:]
    # llama.cpp logs the cause ("error loading model: missing tensor ...") before the generic "failed to load"
    for word in ("error", "failed"):
        for ln in reversed(recent):
            if word in ln.lower():
                return ln
    return lines[-1] if lines else "no message from llama.cpp"


class LogProgress:
    """Feeds llama.cpp's ``[ i/ n]`` per-tensor lines to a callback while active."""

    def __init__(self, on_step: Callable[[int, int], None]) -> None:
        self._on_step = on_step

    def _listen(self, line: str) -> None:
        m = _PROGRESS.search(line)
        if m:
            self._on_step(int(m.group(1)), int(m.group(2)))

    def __enter__(self) -> LogProgress:
        _LISTENERS.append(self._listen)
        return self

    def __exit__(self, *exc: object) -> None:
        _LISTENERS.remove(self._listen)


def version() -> str:
    """llama-cpp-python's version (it pins the llama.cpp it ships)."""
    try:
        from importlib.metadata import version as v

        return v("llama-cpp-python")
    except Exception:  # noqa: BLE001 - metadata is informative only
        return "unknown"
