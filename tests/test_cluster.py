"""``--ray``: every tensor scored as a Ray task on a real local cluster gives the same scores and file as one
machine, also when a worker is killed mid-run; without Ray installed, ``--ray`` is a one-line error.

The cluster is a real one: ``ray start --head --block`` bound to 127.0.0.1 in its own process group with
its own temp folder, stopped by signalling that group (never ``ray stop``, which stops every Ray cluster
of the user on the machine). Ray's start-up costs ~10 s, once per module.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "GGUFMIX_CACHE": str(tmp / "cache"), "RAY_USAGE_STATS_ENABLED": "0"}


def _ggufmix(tmp: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "ggufmix", "-q", *args], env=_env(tmp), capture_output=True,
                         text=True, timeout=600)
    if check:
        assert res.returncode == 0, res.stderr
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: children of each thread)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, subprocess.Popen]]:
    """A 2-CPU Ray head on 127.0.0.1 (two worker processes); its whole process group is stopped afterwards."""
    pytest.importorskip("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", "--node-ip-address",
           "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--temp-dir", temp, "--include-dashboard", "false",
           "--dashboard-agent-listen-port", str(_free_port()), "--object-store-memory", str(100 * 2**20),
           "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        _wait_for(address)
        yield address, head
    finally:
        pids = _descendants(head.pid)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass
        for p in [head.pid, *pids]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for(address: str, timeout: float = 120) -> None:
    host, port = address.split(":")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex((host, int(port))) == 0:
                time.sleep(2)  # the GCS listens before the raylet has registered
                return
        time.sleep(0.5)
    raise RuntimeError(f"no Ray head at {address} after {timeout} s")


def test_ray_scores_and_file_equal_one_machine(cluster: tuple[str, subprocess.Popen], tiny_model: Path,
                                              tmp_path: Path) -> None:
    address, _ = cluster
    for strategy in ("measured", "ewq"):
        _ggufmix(tmp_path, "score", str(tiny_model), "-o", str(tmp_path / f"{strategy}.json"), "--strategy",
                 strategy, "--rows", "32")
        _ggufmix(tmp_path, "score", str(tiny_model), "-o", str(tmp_path / f"{strategy}.ray.json"), "--strategy",
                 strategy, "--rows", "32", "--ray", address)
        assert (tmp_path / f"{strategy}.ray.json").read_bytes() == (tmp_path / f"{strategy}.json").read_bytes()
    for name, extra in (("one", ()), ("ray", ("--ray", address))):
        _ggufmix(tmp_path, "build", str(tiny_model), "-o", str(tmp_path / f"{name}.gguf"), "--budget", "4.5bpw",
                 "--rows", "32", "--no-smoke", *extra)
    assert (tmp_path / "ray.gguf").read_bytes() == (tmp_path / "one.gguf").read_bytes()
    assert (tmp_path / "ray.recipe.txt").read_text() == (tmp_path / "one.recipe.txt").read_text()


@pytest.mark.slow
def test_killed_worker_is_retried(cluster: tuple[str, subprocess.Popen], tmp_path: Path) -> None:
    """A worker killed by its pid while it scores a tensor: Ray runs that task again, the scores are unchanged."""
    from tinymodel import write_tiny_llama

    address, head = cluster
    model = write_tiny_llama(tmp_path / "kill.f16.gguf", n_layer=8, n_embd=256, n_ff=1024, n_vocab=512, seed=4)
    _ggufmix(tmp_path, "score", str(model), "-o", str(tmp_path / "one.json"), "--rows", "64")
    run = subprocess.Popen([sys.executable, "-m", "ggufmix", "-q", "score", str(model), "-o",
                            str(tmp_path / "ray.json"), "--rows", "64", "--ray", address], env=_env(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _busy_worker(head.pid, run)
    os.kill(victim, signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert not Path(f"/proc/{victim}").exists()
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "one.json").read_bytes()


def _busy_worker(head_pid: int, run: subprocess.Popen, timeout: float = 300) -> int:
    """The pid of a Ray worker of this cluster while it runs a scoring task (its title names the task)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and run.poll() is None:
        for pid in _descendants(head_pid):
            if _title(pid).startswith("ray::score_tensor"):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker ran score_tensor (driver exit {run.poll()}: {run.stderr and run.stderr.read()})")


def test_ray_without_ray_installed_is_one_line(tiny_model: Path, tmp_path: Path) -> None:
    # ray made unimportable in a fresh interpreter, as on a machine without the extra
    code = ("import sys; sys.modules['ray'] = None; from ggufmix.cli import main; "
            f"sys.argv = ['ggufmix', 'score', {str(tiny_model)!r}, '-o', {str(tmp_path / 's.json')!r}, '--ray']; main()")
    res = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 6
    assert res.stderr.strip().splitlines() == ["ggufmix: error: --ray needs Ray: pip install 'ggufmix[cluster]'"]
    assert not (tmp_path / "s.json").exists()


def test_import_ggufmix_does_not_import_ray(tmp_path: Path) -> None:
    code = ("import sys, ggufmix, ggufmix.cli, ggufmix.score.measure, ggufmix.score.cluster; "
            "print('ray' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
