"""``--ray``: every tensor scored as a Ray task on a real local cluster gives the same scores and file as one
machine, also when a worker is killed mid-run (and the KLD oracle's actors likewise); without Ray installed, ``--ray`` is a one-line error.

The cluster is a real one: ``ray start --head --block --num-cpus 2`` bound to 127.0.0.1 with its own temp
folder, in its own process group, stopped by killing that group (never ``ray stop``, which stops every Ray
cluster of the user on the machine). Ray's start-up costs ~10-20 s, once per module.
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
# Ray turns 127.0.0.1 into the machine's outward address unless told it runs a one-machine cluster; and
# whether it wants a token depends on a ~/.ray/auth_token left by any earlier local ray.init: not here.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, **LOOPBACK, "PYTHONPATH": str(REPO), "GGUFMIX_CACHE": str(tmp / "cache")}


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


def _ray_start(*args: str) -> subprocess.Popen:
    """``ray start --block ...`` in its own process group (so that the group can be stopped, and only it)."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-agent-listen-port", str(_free_port()), "--object-store-memory", str(80 * 2**20),
           "--disable-usage-stats", *args]
    return subprocess.Popen(cmd, env={**os.environ, **LOOPBACK}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A Ray head of 2 CPUs (two worker processes) bound to 127.0.0.1, stopped afterwards by killing its process
    group (Ray's own SIGTERM path drains for 30 s). One node: Ray 2.60 binds 127.0.0.1 only with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, and then refuses a second node ("Multi-node Ray clusters are not
    supported"); without it, it rewrites 127.0.0.1 to the machine's outward address."""
    pytest.importorskip("ray")
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    address = f"127.0.0.1:{port}"
    nodes = [_ray_start("--head", "--port", str(port), "--num-cpus", "2", "--temp-dir", temp,
                        "--include-dashboard", "false")]
    try:
        _wait_for(address)
        _wait_for_cpus(address, 2)
        yield address, nodes
    finally:
        pids = [p for n in nodes for p in (n.pid, *_descendants(n.pid))]
        for n in nodes:
            os.killpg(n.pid, signal.SIGKILL)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for n in nodes:
            n.wait(30)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_cpus(address: str, cpus: int, timeout: float = 120) -> None:
    code = ("import ray, time, sys; ray.init(address=sys.argv[1], include_dashboard=False, logging_level='ERROR'); "
            "end = time.time() + float(sys.argv[3]); "
            "[time.sleep(0.5) for _ in iter(lambda: ray.cluster_resources().get('CPU', 0) < int(sys.argv[2]) "
            "and time.time() < end, False)]; print(ray.cluster_resources().get('CPU', 0))")
    res = subprocess.run([sys.executable, "-c", code, address, str(cpus), str(timeout)],
                         env={**os.environ, **LOOPBACK}, capture_output=True, text=True, timeout=timeout + 60)
    assert res.returncode == 0 and float(res.stdout.split()[-1]) >= cpus, res.stderr[-2000:]


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


def test_ray_scores_and_file_equal_one_machine(cluster: tuple[str, list[subprocess.Popen]], tiny_model: Path,
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


def test_killed_worker_is_retried(cluster: tuple[str, list[subprocess.Popen]], tiny_model: Path, tmp_path: Path) -> None:
    """A worker killed by its pid while it scores a tensor: Ray runs that task again, the scores are unchanged
    (complete and equal: the killed task's tensor can only have come from a second run)."""
    address, nodes = cluster
    model = tiny_model
    _ggufmix(tmp_path, "score", str(model), "-o", str(tmp_path / "one.json"), "--rows", "64")
    run = subprocess.Popen([sys.executable, "-m", "ggufmix", "-q", "score", str(model), "-o",
                            str(tmp_path / "ray.json"), "--rows", "64", "--ray", address], env=_env(tmp_path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = _busy_worker([n.pid for n in nodes], run)
    os.kill(victim, signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert not Path(f"/proc/{victim}").exists()
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "one.json").read_bytes()


def _busy_worker(node_pids: list[int], run: subprocess.Popen, timeout: float = 300, task: str = "score_tensor") -> int:
    """The pid of a Ray worker of this cluster while it runs ``task`` (its title names the task)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and run.poll() is None:
        for pid in (p for n in node_pids for p in _descendants(n)):
            if _title(pid).startswith(f"ray::{task}"):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker ran {task} (driver exit {run.poll()}: {run.stderr and run.stderr.read()})")


def test_kld_oracle_on_ray_equals_one_machine_with_a_worker_killed(cluster: tuple[str, list[subprocess.Popen]],
                                                                   tmp_path: Path) -> None:
    """``--strategy kld --ray``: one oracle actor per cluster CPU, each with the source loaded once, measures its
    share of the (tensor, type) pairs. One actor killed while it measures is restarted (it loads the source
    again) and its pairs run again: the scores equal one machine's to the byte."""
    import numpy as np
    from tinymodel import write_tiny_llama

    address, nodes = cluster
    model = write_tiny_llama(tmp_path / "kld.f16.gguf", n_layer=2, n_embd=256, n_ff=256, n_vocab=384, seed=4)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex the jolly judges".split()
    (tmp_path / "calib.txt").write_text(" ".join(np.random.default_rng(0).choice(words, 3000)))
    args = ["score", str(model), "--strategy", "kld", "--calib", str(tmp_path / "calib.txt"), "--calib-chunks", "1",
            "--oracle", "chunks=1,ctx=128"]
    _ggufmix(tmp_path, *args, "-o", str(tmp_path / "one.json"))
    shutil.rmtree(tmp_path / "cache")  # nothing measured may be reused: the cluster measures every pair itself
    run = subprocess.Popen([sys.executable, "-m", "ggufmix", "-q", *args, "-o", str(tmp_path / "ray.json"),
                            "--ray", address], env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    victim = _busy_worker([n.pid for n in nodes], run, task="OracleWorker.measure")
    os.kill(victim, signal.SIGKILL)
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    assert not Path(f"/proc/{victim}").exists()
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "one.json").read_bytes()


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


def test_ray_without_address_starts_and_stops_a_local_cluster(tiny_model: Path, tmp_path: Path) -> None:
    """``--ray`` alone: ggufmix starts a cluster of --threads workers, scores (a relative path: the workers run
    elsewhere) and shuts it down."""
    pytest.importorskip("ray")
    shutil.copy(tiny_model, tmp_path / "rel.gguf")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's own session folder (short: socket paths)
    try:
        for name, extra in (("one", ()), ("ray", ("--threads", "2", "--ray"))):
            res = subprocess.run([sys.executable, "-m", "ggufmix", "-q", "score", "rel.gguf", "-o", f"{name}.json",
                                  "--rows", "16", *extra], env={**_env(tmp_path), "RAY_TMPDIR": temp}, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stderr
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "one.json").read_bytes()


def test_a_task_error_is_one_line_naming_the_tensor(cluster: tuple[str, list[subprocess.Popen]],
                                                    tmp_path: Path) -> None:
    import numpy as np
    from tinymodel import write_tiny_llama

    from ggufmix.io.gguf_source import open_gguf

    path = write_tiny_llama(tmp_path / "nan.gguf", n_layer=1, seed=3)
    at = open_gguf(path).offsets["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    data[at:at + 2] = np.float16(np.nan).tobytes()
    path.write_bytes(bytes(data))
    res = _ggufmix(tmp_path, "score", str(path), "-o", str(tmp_path / "s.json"), "--ray", cluster[0], check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [
        f"ggufmix: error: {path}: tensor 'blk.0.ffn_up.weight' has NaN or infinite weights (row 0); the source is damaged"]


def test_lost_driver_resumes_from_its_journal(cluster: tuple[str, list[subprocess.Popen]], tiny_model: Path,
                                              tmp_path: Path) -> None:
    """The driver killed mid-run (SIGKILL: no clean-up) leaves the tensors it had received in the journal; the
    same command again scores only the rest and writes the same scores as one machine."""
    address, _ = cluster
    _ggufmix(tmp_path, "score", str(tiny_model), "-o", str(tmp_path / "one.json"), "--rows", "64")
    cmd = [sys.executable, "-m", "ggufmix", "-q", "score", str(tiny_model), "-o", str(tmp_path / "ray.json"),
           "--rows", "64", "--ray", address]
    driver = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal_dir = tmp_path / "cache" / "score-journal"
    end = time.monotonic() + 300
    while time.monotonic() < end and driver.poll() is None and _journal_lines(journal_dir) < 3:
        time.sleep(0.05)
    driver.kill()
    driver.wait(30)
    done = _journal_lines(journal_dir)
    assert 3 <= done < 30 and not (tmp_path / "ray.json").exists()  # tiny_model has 30 quantizable tensors
    _ggufmix(tmp_path, "score", str(tiny_model), "-o", str(tmp_path / "ray.json"), "--rows", "64", "--ray", address)
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "one.json").read_bytes()
    assert _journal_lines(journal_dir) == 0  # finished: the journal is gone


def _journal_lines(folder: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl")) if folder.is_dir() else 0


def test_unreachable_cluster_is_one_line_at_once(tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    port = _free_port()  # nothing listens there
    res = _ggufmix(tmp_path, "score", str(tiny_model), "-o", str(tmp_path / "s.json"), "--ray", f"127.0.0.1:{port}",
                   check=False)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"ggufmix: error: --ray 127.0.0.1:{port}: no Ray cluster answers there "
                                               "(Connection refused); start one with `ray start --head`"]
