"""Warm pools: 20 jobs with the same signature in sequence, without and with a warm pool.

The real operator runs as a subprocess (`python -m rlhf_operator`, production reconcile interval
unless overridden) against KMock's emulator with the simulated KubeRay of
tests/operator/kube_sim.py, which makes a new RayCluster ready after `--provision` seconds (a
real GPU cluster takes minutes: nodes, a multi-GB image, Ray). Each job is one SFT stage; the
next job is applied when the previous one has finished and let go of its cluster. Both
sequences run at once, in two namespaces (no cross-namespace reuse), so the two columns share
the same operator and the same load. Printed side by side with the targets:

  - RayClusters created                                   target: 1 for the warm sequence
  - seconds from apply to the job's first RayJob, per job target: <= 2 s for every warm job
                                                          (jobs 2..N; job 1 finds the pool empty)

    .venv/bin/python bench/warm_pool.py [--jobs 20] [--provision 5] [--interval 5]

A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import kmock
from emulated_operator import emulated_operator  # first: puts tests/operator on sys.path
from kube_sim import (
    JOBS,
    RAYCLUSTERS,
    RAYJOBS,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    sample_job,
)
from rlhf_operator import warmpool

TARGET_WARM_CLUSTERS = 1
TARGET_WARM_FIRST_RAYJOB_S = 2.0
KEEP_ALIVE_S = 600
TICK_S = 0.1  # simulated KubeRay
POLL_S = 0.02
SFT_ONLY = {
    "reward": {"enabled": False},
    "ppo": {"enabled": False},
    "evaluation": {"enabled": False},
}
COLD, WARM = "cold", "warm"


def job_manifest(name: str, namespace: str, keep_alive: int) -> dict[str, Any]:
    return sample_job(name, namespace, stages=SFT_ONLY, warmPool={"keepAliveSeconds": keep_alive})


async def until(check, timeout: float) -> float:
    """Poll `check` until truthy; the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the operator did not get there in time")
        await asyncio.sleep(POLL_S)
    return time.monotonic()


def let_go(api: RLHFEmulator, namespace: str, cluster: str) -> bool:
    """The finished job's cluster is deleted (cold) or waits in the pool (warm)."""
    obj = api.get(RAYCLUSTERS, namespace, cluster)
    if obj is None:
        return True
    meta = obj["metadata"]
    state = (meta.get("labels") or {}).get(warmpool.LABEL_STATE)
    return state == warmpool.STATE_AVAILABLE and not meta.get("ownerReferences")


def phase(api: RLHFEmulator, namespace: str, name: str) -> str | None:
    return ((api.get(JOBS, namespace, name) or {}).get("status") or {}).get("phase")


async def one_job(
    api: RLHFEmulator, namespace: str, name: str, keep_alive: int, timeout: float
) -> tuple[float, str, bool]:
    """Apply one job and see it through: (apply -> first RayJob s, its cluster, reused)."""
    applied = time.monotonic()
    await create_job(api, job_manifest(name, namespace, keep_alive))
    first = await until(lambda: api.get(RAYJOBS, namespace, f"{name}-sft-1"), timeout)
    await until(lambda: phase(api, namespace, name) == "Succeeded", timeout)
    cluster = api.get(JOBS, namespace, name)["status"]["cluster"]
    await until(lambda: let_go(api, namespace, cluster["name"]), timeout)
    return first - applied, cluster["name"], bool(cluster.get("reused"))


async def sequence(
    api: RLHFEmulator, namespace: str, jobs: int, keep_alive: int, timeout: float
) -> list[tuple[float, str, bool]]:
    """Run `jobs` jobs one after the other (see `one_job`)."""
    return [
        await one_job(api, namespace, f"job-{i:02d}", keep_alive, timeout)
        for i in range(1, jobs + 1)
    ]


def clusters_created(api: RLHFEmulator, namespace: str) -> int:
    wanted = kmock.resource(RAYCLUSTERS)
    return len({name for (res, ns, name) in api.objects if res == wanted and ns == namespace})


async def run(jobs: int, provision: float, interval: float | None, timeout: float) -> int:
    async with emulated_operator(interval) as emulated:
        api = emulated.api
        ready_after = max(1, round(provision / TICK_S))
        async with SimulatedKubeRay(api, tick=TICK_S, ready_after=ready_after):
            await asyncio.sleep(3)  # let the operator start and list (empty) resources
            started = time.monotonic()
            cold, warm = await asyncio.gather(
                sequence(api, COLD, jobs, 0, timeout),
                sequence(api, WARM, jobs, KEEP_ALIVE_S, timeout),
            )
            wall = time.monotonic() - started
        made = {COLD: clusters_created(api, COLD), WARM: clusters_created(api, WARM)}

    report(jobs, provision, interval, cold, warm, made, wall)
    print(f"  operator log            {emulated.log}")
    return 0


def report(
    jobs: int,
    provision: float,
    interval: float | None,
    cold: list[tuple[float, str, bool]],
    warm: list[tuple[float, str, bool]],
    made: dict[str, int],
    wall: float,
) -> None:
    print(f"warm pool: {jobs} RLHFJobs with one signature, in sequence (SFT only), {wall:.0f} s")
    print(
        f"  reconcile interval {interval or 'production (5)'} s, simulated provisioning "
        f"{provision:g} s, real operator subprocess"
    )
    print(f"  {'':24}{'without pool':>14}{'with pool':>14}   target")
    target = f"{TARGET_WARM_CLUSTERS} (with pool)"
    print(f"  {'RayClusters created':24}{made[COLD]:>14}{made[WARM]:>14}   {target}")
    print("  apply -> first RayJob (s)")
    for i, ((c, _, _), (w, cluster, reused)) in enumerate(zip(cold, warm, strict=True), 1):
        note = f"   <= {TARGET_WARM_FIRST_RAYJOB_S:g} s" if i > 1 else "   (pool empty)"
        tag = f" {'reused ' + cluster if reused else 'new ' + cluster}"
        print(f"    job {i:02d}{'':15}{c:>14.2f}{w:>14.2f}{note}{tag}")
    warm_jobs = [w for w, _, _ in warm[1:]]
    cold_jobs = [c for c, _, _ in cold]
    if warm_jobs:
        print(
            f"  {'median (jobs 2..N)':24}{statistics.median(cold_jobs[1:]):>14.2f}"
            f"{statistics.median(warm_jobs):>14.2f}"
        )
        within = sum(w <= TARGET_WARM_FIRST_RAYJOB_S for w in warm_jobs)
        print(
            f"  {'max (jobs 2..N)':24}{max(cold_jobs[1:]):>14.2f}{max(warm_jobs):>14.2f}"
            f"   <= {TARGET_WARM_FIRST_RAYJOB_S:g} s: {within}/{len(warm_jobs)} warm jobs"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per sequence (20)")
    parser.add_argument(
        "--provision", type=float, default=5.0, help="simulated cluster provisioning, s (5)"
    )
    parser.add_argument(
        "--interval", type=float, default=None, help="reconcile interval (default: production)"
    )
    parser.add_argument("--timeout", type=float, default=120, help="per-step give-up time (s)")
    args = parser.parse_args()
    return asyncio.run(run(args.jobs, args.provision, args.interval, args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
