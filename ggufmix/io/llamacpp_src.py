"""llama.cpp's own ``convert_hf_to_gguf.py``: find it, fetch it on first use, run it in a subprocess.

The converter must match the llama.cpp inside the installed llama-cpp-python (new architectures and
tokenizer hashes arrive with each release), so it comes from that release's source package on PyPI,
which carries llama.cpp's tree under ``vendor/llama.cpp``. Only the converter, its ``conversion``
package, its own ``gguf-py`` and the licence are extracted, into ``${GGUFMIX_CACHE}/llama.cpp-<version>``.
Nothing of llama.cpp is part of ggufmix. The converter runs with its own gguf-py first on the path
(it inserts it itself), never with the gguf pinned for ggufmix.

Where it comes from, first match wins: ``--llama-cpp-dir``, ``$GGUFMIX_LLAMA_CPP``, the cache.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ggufmix.artifacts import cache_root, dir_beside, temp_beside
from ggufmix.errors import EngineError, InputError, MissingDependencyError

logger = logging.getLogger(__name__)

ENV_VAR = "GGUFMIX_LLAMA_CPP"
SCRIPT = "convert_hf_to_gguf.py"
SDIST_SUBDIR = "vendor/llama.cpp"
# What the converter imports from its own tree (convert_hf_to_gguf.py: `from conversion import ...`,
# and gguf-py put on sys.path by the script itself).
_MEMBERS = (SCRIPT, "conversion/", "gguf-py/gguf/", "LICENSE")
# The converter's hard imports at start-up; sentencepiece is needed later, for SentencePiece vocabularies.
REQUIRED_MODULES = ("torch", "transformers", "numpy")
INSTALL_HINT = "pip install 'ggufmix[hf]'"
OUTTYPES = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class Converter:
    """A llama.cpp tree holding ``convert_hf_to_gguf.py``; ``version`` says where it came from."""

    root: Path
    version: str

    @property
    def script(self) -> Path:
        return self.root / SCRIPT


def llama_cpp_python_version() -> str:
    """The installed llama-cpp-python version (the engine ggufmix runs)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise MissingDependencyError("llama-cpp-python is not installed: pip install ggufmix") from None


def locate_converter(llama_cpp_dir: Path | None = None, fetch: bool = True) -> Converter:
    """The converter to use, fetching the matching release into the cache when none is given.

    Args:
        llama_cpp_dir: a llama.cpp checkout (``--llama-cpp-dir``); overrides ``$GGUFMIX_LLAMA_CPP``.
        fetch: download the cached release if it is not there yet (False: only say where it would be).

    Returns:
        The converter; its ``version`` (part of the conversion cache key) is the llama-cpp-python
        version, or for a checkout its path and the script's size and modification time.

    Raises:
        InputError: a given folder without ``convert_hf_to_gguf.py``.
        EngineError: the source package could not be fetched or holds no converter.
    """
    given = llama_cpp_dir or (Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else None)
    if given is not None:
        script = given / SCRIPT
        if not script.is_file():
            where = "--llama-cpp-dir" if llama_cpp_dir else f"${ENV_VAR}"
            raise InputError(f"{given}: no {SCRIPT} there ({where} must point to a llama.cpp checkout)")
        st = script.stat()
        return Converter(given.resolve(), f"checkout:{given.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    version = llama_cpp_python_version()
    root = cache_root() / f"llama.cpp-{version}"
    if fetch and not (root / SCRIPT).is_file():
        fetch_converter(version, root)
    return Converter(root, version)


def fetch_converter(version: str, dest: Path) -> Path:
    """Download llama-cpp-python ``version``'s source package with pip and extract the converter into ``dest``.

    Raises:
        EngineError: pip failed (no network, no such version) or the package holds no converter.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("fetching llama.cpp's %s from llama-cpp-python %s's source package (first use only)",
                   SCRIPT, version)
    with tempfile.TemporaryDirectory(prefix="ggufmix-sdist-") as tmp:
        sdist = download_sdist(version, Path(tmp))
        staging = dir_beside(dest)
        try:
            extract_converter(sdist, staging)
            if not (dest / SCRIPT).is_file():
                shutil.rmtree(dest, ignore_errors=True)
                _install(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest


def _install(staging: Path, dest: Path) -> None:
    """Rename the extracted tree into place (atomic: a half-extracted tree never looks complete)."""
    try:
        os.replace(staging, dest)
    except OSError:
        if not (dest / SCRIPT).is_file():  # not another process that got there first
            raise


def download_sdist(version: str, into: Path) -> Path:
    """``pip download --no-deps --no-binary :all: llama-cpp-python==version``; the .tar.gz it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "-d", str(into), f"llama-cpp-python=={version}"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(f"could not download llama-cpp-python=={version}'s source package from PyPI ({tail}); "
                          f"point --llama-cpp-dir or ${ENV_VAR} to a llama.cpp checkout instead")
    return found[0]


def extract_converter(sdist: Path, dest: Path) -> None:
    """Extract only the converter's files from ``<pkg>/vendor/llama.cpp/`` of ``sdist`` into ``dest``.

    Raises:
        EngineError: the package holds no converter.
    """
    with tarfile.open(sdist, "r:gz") as tar:
        picked = []
        for m in tar.getmembers():
            rel = _converter_path(m.name)
            if m.isfile() and rel:
                m.name = rel
                picked.append(m)
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse links and paths out of dest
            tar.extractall(dest, members=picked, filter="data")
        else:
            tar.extractall(dest, members=[m for m in picked if ".." not in Path(m.name).parts])
    if not (dest / SCRIPT).is_file():
        raise EngineError(f"{sdist.name}: no {SDIST_SUBDIR}/{SCRIPT} inside; "
                          "point --llama-cpp-dir to a llama.cpp checkout")


def _converter_path(member: str) -> str:
    """``pkg-1.2/vendor/llama.cpp/conversion/x.py`` -> ``conversion/x.py`` for a file the converter needs, else ""."""
    _, _, inside = member.partition("/")
    if not inside.startswith(SDIST_SUBDIR + "/"):
        return ""
    rel = inside[len(SDIST_SUBDIR) + 1:]
    return rel if any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in _MEMBERS) else ""


def check_dependencies() -> None:
    """Fail early, in one line, when the converter's hard imports are missing from this Python.

    Raises:
        MissingDependencyError: names the missing packages and the install command.
    """
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"llama.cpp's {SCRIPT} needs {', '.join(missing)}, not installed here: "
                                     f"{INSTALL_HINT}")


def run_converter(conv: Converter, folder: Path, out: Path, outtype: str, progress: bool = True,
                  label: str | None = None) -> None:
    """Convert the Hugging Face ``folder`` to an ``outtype`` GGUF at ``out`` (temporary file, then rename).

    The converter's log and progress bar pass through to stderr when ``progress``; its tail is kept
    to explain a failure, which names ``label`` (the user's name for the model) or ``folder``.

    Raises:
        MissingDependencyError: the converter stopped on an import of a package that is not installed.
        EngineError: any other failure of the converter, with its last error line.
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: one of {OUTTYPES}")
    check_dependencies()
    tmp = temp_beside(out)
    cmd = [sys.executable, str(conv.script), str(folder), "--outtype", outtype, "--outfile", str(tmp)]
    try:
        code, tail = _stream(cmd, _converter_env(), progress)
        if code != 0:
            raise _failure(label or str(folder), code, tail)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _converter_env() -> dict[str, str]:
    """Offline (everything is local already, and no remote code can be fetched) and with its own gguf-py."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)
    return env


def _stream(cmd: list[str], env: dict[str, str], progress: bool, keep: int = 16384) -> tuple[int, str]:
    """Run ``cmd``, copying its output to stderr as it comes (bars use \\r, so bytes, not lines)."""
    logger.debug("running %s", " ".join(cmd))
    tail = b""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env) as proc:
        assert proc.stdout is not None
        echo = getattr(sys.stderr, "buffer", None) if progress else None
        try:
            while chunk := proc.stdout.read1(4096):
                if echo is not None:
                    echo.write(chunk)
                    echo.flush()
                tail = (tail + chunk)[-keep:]
        except BaseException:
            proc.kill()
            raise
    return proc.returncode, tail.decode("utf-8", "replace")


_MISSING = re.compile(r"(?:ModuleNotFoundError|ImportError): No module named '([\w.]+)'")


def _failure(folder: str, code: int, tail: str) -> Exception:
    """The one-line error for a failed conversion."""
    missing = _MISSING.findall(tail)
    if missing:
        pkg = missing[-1].split(".")[0]
        return MissingDependencyError(f"{folder}: llama.cpp's {SCRIPT} needs the Python package {pkg!r}, "
                                      f"not installed here: {INSTALL_HINT} (or pip install {pkg})")
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or ln.startswith("ERROR")]
    last = (errors or lines or ["no output"])[-1]
    return EngineError(f"{folder}: llama.cpp's {SCRIPT} failed (exit {code}): {last}")
