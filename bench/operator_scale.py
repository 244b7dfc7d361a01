"""Operator at scale: N RLHFJobs applied at once to the emulated API server.

The real operator runs as a subprocess (`python -m rlhf_operator`, production settings unless
overridden) against KMock's emulator with the simulated KubeRay of tests/operator/kube_sim.py,
which marks clusters ready on its next tick. Printed beside the targets:

  - seconds until every job has its RayCluster           target: all 200 within 30 s
  - per-job latency, create -> first RayJob (p50, p99)   (reconcile interval bound)
  - operator peak RSS                                    target: < 300 MB

    .venv/bin/python bench/operator_scale.py [--jobs 200] [--interval 5]

A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import psutil
from emulated_operator import emulated_operator  # first: puts tests/operator on sys.path
from kube_sim import (
    RAYCLUSTERS,
    RAYJOBS,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    sample_job,
)

TARGET_ALL_CLUSTERS_S = 30.0
TARGET_RSS_MB = 300.0
NAMESPACE = "bench"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _sample_rss(proc: psutil.Process, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            rss = proc.memory_info().rss + sum(
                child.memory_info().rss for child in proc.children(recursive=True)
            )
            peak[0] = max(peak[0], rss / 2**20)
        except psutil.NoSuchProcess:
            return
        await asyncio.sleep(0.2)


def _first_seen(api: RLHFEmulator, resource: str, seen: dict[str, float], key) -> None:
    now = time.monotonic()
    for obj in api.live(resource, NAMESPACE):
        job = key(obj)
        if job is not None and job not in seen:
            seen[job] = now


async def run(jobs: int, interval: float | None, timeout: float) -> int:
    async with emulated_operator(interval) as emulated:
        api, operator = emulated.api, emulated.process
        stop, peak = asyncio.Event(), [0.0]
        sampler = asyncio.create_task(_sample_rss(psutil.Process(operator.pid), peak, stop))
        try:
            async with SimulatedKubeRay(api, tick=0.1):
                await asyncio.sleep(3)  # let the operator start and list (empty) resources
                names = [f"job-{i:04d}" for i in range(jobs)]
                created: dict[str, float] = {}

                async def apply(name: str) -> None:
                    await create_job(api, sample_job(name, namespace=NAMESPACE))
                    created[name] = time.monotonic()

                start = time.monotonic()
                await asyncio.gather(*(apply(name) for name in names))
                applied = time.monotonic() - start
                clusters: dict[str, float] = {}
                rayjobs: dict[str, float] = {}

                def job_of(obj: dict) -> str:
                    return obj["metadata"]["labels"]["rlhf.dev/job"]

                report = start
                me, op = psutil.Process(), psutil.Process(operator.pid)
                me.cpu_percent(), op.cpu_percent()
                while len(rayjobs) < jobs and time.monotonic() - start < timeout:
                    _first_seen(api, RAYCLUSTERS, clusters, job_of)
                    _first_seen(api, RAYJOBS, rayjobs, job_of)
                    if time.monotonic() - report > 5:
                        report = time.monotonic()
                        print(
                            f"  ... {report - start:5.1f} s: {len(clusters)} clusters, "
                            f"{len(rayjobs)} first RayJobs, RSS {peak[0]:.0f} MB, CPU "
                            f"operator {op.cpu_percent():.0f}% emulator {me.cpu_percent():.0f}%",
                            flush=True,
                        )
                    await asyncio.sleep(0.1)
        finally:
            stop.set()
            await sampler

    all_clusters = max(clusters.values()) - start if len(clusters) == jobs else float("nan")
    latencies = [rayjobs[n] - created[n] for n in names if n in rayjobs]
    print(f"operator scale: {jobs} RLHFJobs applied at once (in {applied:.1f} s)")
    print(f"  reconcile interval      {interval or 'default'} s (RLHF_RECONCILE_INTERVAL)")
    print(
        f"  all RayClusters created {all_clusters:6.1f} s    target: all {jobs} within "
        f"{TARGET_ALL_CLUSTERS_S:.0f} s ({len(clusters)}/{jobs} seen)"
    )
    if latencies:
        print(
            f"  create -> first RayJob  p50 {statistics.median(latencies):.2f} s, "
            f"p99 {_percentile(latencies, 0.99):.2f} s ({len(latencies)}/{jobs} jobs)"
        )
    print(f"  operator peak RSS       {peak[0]:6.0f} MB    target: < {TARGET_RSS_MB:.0f} MB")
    print(f"  operator log            {emulated.log}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="RLHFJobs to apply (200)")
    parser.add_argument(
        "--interval", type=float, default=None, help="reconcile interval (default: production)"
    )
    parser.add_argument("--timeout", type=float, default=180, help="give up after (s)")
    args = parser.parse_args()
    return asyncio.run(run(args.jobs, args.interval, args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
