"""Scoring throughput with Ray: 1 vs 2 local workers against one machine's threads, and each worker's peak RSS.

    python scripts/bench_ray.py MODEL.gguf [--strategy measured] [--rows 128] [--workers 1,2]

Every row scores the whole model once with no journal to resume from (GB/s = source file size / seconds).
Ray rows start a local cluster of N CPUs first and warm each worker up (start, import llama.cpp) before the
clock starts, as a long run amortises that; the cluster is shut down after each row. Every Ray result is
checked against the one-machine scores, to the bit. Peak RSS is what each worker process reports
(``getrusage``), against the issue's bound of 2x the largest tensor + 300 MB. "CPU s" is the CPU time the
scoring used (this process's for the one-machine rows; the workers' own, less their warm-up, for Ray):
on a machine shared with other jobs, wall seconds x workers well above it means the workers waited for a core.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path


def cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def score(path: Path, strategy: str, rows: int, runner: object | None, threads: int = 1) -> tuple[float, object]:
    from ggufmix.engine import kernels
    from ggufmix.layout.slots import build_layout
    from ggufmix.score.base import Kernels
    from ggufmix.score.measure import open_source
    from ggufmix.score.stream import score_model
    from ggufmix.types import DEFAULT_TYPES

    src = open_source(path, False)
    layout = build_layout(src.arch, src.tensors.values(), DEFAULT_TYPES)
    k = Kernels(kernels.quantize_rows, kernels.dequantize_rows, kernels.f16_to_f32)
    t0 = time.perf_counter()
    scores = score_model(src, layout, strategy, k, max_rows=rows, threads=threads, progress=False, runner=runner)
    return time.perf_counter() - t0, scores


def warm_up(ray: object, n: int) -> dict[int, float]:
    """Start ``n`` workers and load llama.cpp's library in each (one task per CPU, held together); their pid ->
    CPU seconds used by then."""
    @ray.remote(num_cpus=1)
    def load() -> tuple[int, float]:
        from ggufmix.engine import kernels  # noqa: F401

        time.sleep(1.0)
        u = resource.getrusage(resource.RUSAGE_SELF)
        return os.getpid(), u.ru_utime + u.ru_stime

    warm = dict(ray.get([load.remote() for _ in range(n)]))
    if len(warm) != n:
        print(f"(warm-up reached {len(warm)} of {n} workers)")
    return warm


def ray_row(path: Path, strategy: str, rows: int, n: int) -> tuple[float, object, dict[int, int], float]:
    from ggufmix.score.cluster import LOCAL, RayRunner, connect, import_ray

    ray = import_ray()
    connect(ray, LOCAL, n)
    try:
        warm = warm_up(ray, n)
        runner = RayRunner(LOCAL, n)
        sec, scores = score(path, strategy, rows, runner)
        used = sum(c - warm.get(pid, 0.0) for pid, c in runner.cpu_seconds.items())
        return sec, scores, runner.peak_rss, used
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--strategy", default="measured")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--threads", default="1,2", help="one-machine rows (threads); empty for none")
    args = ap.parse_args()
    os.environ["GGUFMIX_CACHE"] = tempfile.mkdtemp(prefix="ggufmix-bench-ray-")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a one-machine cluster on 127.0.0.1
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only; no token left in ~/.ray
    from ggufmix.io.gguf_source import open_gguf

    gb = args.model.stat().st_size / 1e9
    largest = max(t.n_bytes for t in open_gguf(args.model).tensors.values())
    print(f"{args.model.name}: {gb:.3f} GB, largest tensor {largest / 1e6:.1f} MB "
          f"(RSS bound 2x + 300 MB = {(2 * largest + 300e6) / 1e6:.0f} MB), --strategy {args.strategy}, "
          f"--rows {args.rows}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start\n")
    print(f"| {'run':<26} | {'seconds':>8} | {'GB/s':>6} | {'x 1 worker':>10} | {'CPU s':>6} | "
          f"{'peak RSS/worker MB':>18} | same scores |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 8}|{'-' * 12}|{'-' * 8}|{'-' * 20}|{'-' * 13}|")
    c0 = cpu()
    ref_sec, ref = score(args.model, args.strategy, args.rows, None, 1)
    ref_cpu = cpu() - c0
    for t in [int(x) for x in args.threads.split(",") if x.strip()]:
        c0 = cpu()
        sec, s = (ref_sec, ref) if t == 1 else score(args.model, args.strategy, args.rows, None, t)
        used = ref_cpu if t == 1 else cpu() - c0
        print(f"| {f'one machine, {t} thread(s)':<26} | {sec:8.2f} | {gb / sec:6.3f} | {'-':>10} | {used:6.1f} | "
              f"{'-':>18} | {'yes' if s.tensors == ref.tensors else 'NO':>11} |")
    base = None
    for n in [int(x) for x in args.workers.split(",") if x.strip()]:
        sec, s, rss, used = ray_row(args.model, args.strategy, args.rows, n)
        base = base or sec
        peak = "/".join(f"{v / 1e6:.0f}" for _, v in sorted(rss.items()))
        print(f"| {f'Ray, {n} worker(s)':<26} | {sec:8.2f} | {gb / sec:6.3f} | {base / sec:10.2f} | {used:6.1f} | "
              f"{peak:>18} | {'yes' if s.tensors == ref.tensors else 'NO':>11} |")


if __name__ == "__main__":
    main()
