"""Operator at fleet scale: N RLHFJobs applied at once to the emulated API server, then at rest,
then the active replica killed.

Two real operator processes (`python -m rlhf_operator --leader-election`, production settings:
60 s resync, 10 s lease) run against KMock's emulator with the simulated KubeRay of
tests/operator/kube_sim.py (clusters ready on its next tick, every RayJob succeeds in three
ticks). Times are taken inside the emulator, when it answers the write (no polling error).
Printed beside the targets (issue #13):

  - job applied -> its RayCluster created, p50/p99         target p99 <= 10 s
  - its RayCluster ready -> its first RayJob created, p50/p99   target p99 <= 1 s
  - N finished jobs at rest: active operator CPU, RSS      target <= 2 % of one core, <= 300 MB
  - failover: SIGKILL the active replica, then apply a job: seconds to the Lease changing
    hands and to the job's RayCluster; children created twice              target 0

    .venv/bin/python bench/operator_scale.py [--jobs 1000] [--rest 30]

A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import time
import urllib.request
from collections import Counter
from typing import Any

import psutil
from emulated_operator import (
    FastEmulator,
    emulated_operator,
)  # first: puts tests/operator on sys.path
from kmock import action, resource
from kube_sim import JOBS, RAYCLUSTERS, RAYJOBS, RLHFEmulator, SimulatedKubeRay, create_job
from kube_sim import sample_job as _sample_job

TARGET_CLUSTER_P99_S = 10.0
TARGET_RAYJOB_P99_S = 1.0
TARGET_REST_CPU = 2.0
TARGET_RSS_MB = 300.0
TARGET_TAKEOVER_S = 15.0
NAMESPACE = "bench"
LEASE = "coordination.k8s.io/v1/leases"


def sample_job(name: str) -> dict[str, Any]:
    """One stage (SFT): the figures are about the operator, not about how long stages run."""
    return _sample_job(
        name,
        namespace=NAMESPACE,
        stages={
            "reward": {"enabled": False},
            "ppo": {"enabled": False},
            "evaluation": {"enabled": False},
        },
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Recorder:
    """Timestamps, taken in the emulator as it answers: job applied, RayCluster created,
    RayCluster marked ready, RayJob created; and every successful create per name (a name
    created twice is a duplicated child)."""

    def __init__(self, api: RLHFEmulator) -> None:
        self.applied: dict[str, float] = {}
        self.cluster: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.rayjob: dict[str, float] = {}
        self.creates: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str, str]] = Counter()  # answered < 300, by kind
        self.refused: Counter[tuple[str, str]] = Counter()  # writes answered 409, by kind
        self.kinds = {resource(r): r for r in (JOBS, RAYCLUSTERS, RAYJOBS)}
        api.recorder = self  # type: ignore[attr-defined]

    def record(self, request: Any) -> None:
        resource = request.resource.plural if request.resource is not None else "-"
        self.requests[(str(request.action), resource, request.subresource or "")] += 1
        kind = self.kinds.get(request.resource)
        if kind is None:
            return
        now = time.monotonic()
        data = request.data if isinstance(request.data, dict) else {}
        if request.action == action.CREATE:
            name = (data.get("metadata") or {}).get("name", "")
            self.creates[(kind, name)] += 1
            job = ((data.get("metadata") or {}).get("labels") or {}).get("rlhf.dev/job", name)
            target = {JOBS: self.applied, RAYCLUSTERS: self.cluster, RAYJOBS: self.rayjob}[kind]
            target.setdefault(job, now)
        elif (
            kind == RAYCLUSTERS
            and request.subresource == "status"
            and (data.get("status") or {}).get("state") == "ready"
        ):
            self.ready.setdefault(request.name.removesuffix("-ray"), now)

    def duplicates(self) -> int:
        return sum(count - 1 for count in self.creates.values() if count > 1)


class RecordingEmulator(FastEmulator):
    """The emulator, telling its `recorder` about every write it accepted."""

    recorder: Recorder | None = None

    async def _handle(self, request: Any) -> Any:
        try:
            response = await super()._handle(request)
        except Exception as exc:  # KMock's errors are raised: 409, 404, 422
            if self.recorder is not None and getattr(exc, "status", None) == 409:
                plural = request.resource.plural if request.resource is not None else "-"
                self.recorder.refused[(str(request.action), plural)] += 1
            raise
        if self.recorder is not None and getattr(response, "status", 500) < 300:
            self.recorder.record(request)
        return response


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def _phase(api: RLHFEmulator, names: list[str], phase: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(
            ((api.get(JOBS, NAMESPACE, n) or {}).get("status") or {}).get("phase") == phase
            for n in names
        )
        if done == len(names):
            return done
        await asyncio.sleep(1)
    return done


def _holder(api: RLHFEmulator) -> str | None:
    lease = api.get(LEASE, NAMESPACE, "rlhf-operator") or {}
    return (lease.get("spec") or {}).get("holderIdentity")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reconciles(port: int) -> float:
    """The replica's reconciles so far (its rlhf_operator_reconciles_total, all phases)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return float("nan")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("rlhf_operator_reconciles_total{")
    )


async def _kubelet(emulated: Any, args: dict[str, tuple[str, ...]], killed: set[str]) -> None:
    """Restart a replica that exited by itself (a leader that lost its Lease on a stalled
    machine exits 1 and comes back as a standby), as the kubelet would; never a killed one."""
    names = ["operator", "standby"]
    while True:
        for i, process in enumerate(list(emulated.processes[:2])):
            if process.poll() is not None and names[i] not in killed:
                emulated.processes[i] = emulated.start_replica(names[i], *args[names[i]])
                emulated.processes.pop()  # start_replica appended it; it replaces slot i
                emulated.restarts += 1
        await asyncio.sleep(0.5)


async def run(jobs: int, rest: float, timeout: float) -> int:
    election = ("--leader-election", f"--lease-namespace={NAMESPACE}")
    ports = {name: _free_port() for name in ("operator", "standby")}
    args = {name: (*election, f"--metrics-port={port}") for name, port in ports.items()}
    async with emulated_operator(None, *args["operator"], emulator=RecordingEmulator) as emulated:
        api = emulated.api
        rec = Recorder(api)
        emulated.restarts = 0
        killed: set[str] = set()
        async with SimulatedKubeRay(api, tick=0.1):
            while _holder(api) != "operator":
                await asyncio.sleep(0.2)
            emulated.start_replica("standby", *args["standby"])
            kubelet = asyncio.create_task(_kubelet(emulated, args, killed))
            emulated.stop_first.append(kubelet)  # never restart a replica during teardown
            await asyncio.sleep(5)  # the standby starts and reads the Lease
            names = [f"job-{i:04d}" for i in range(jobs)]
            replicas = [psutil.Process(p.pid) for p in emulated.processes]
            cpu_before = [_cpu_seconds(p) for p in replicas]
            reconciles_before = {name: _reconciles(port) for name, port in ports.items()}
            bench_cpu = time.process_time()
            start = time.monotonic()
            await asyncio.gather(*(create_job(api, sample_job(n)) for n in names))
            applied = time.monotonic() - start
            finished = await _phase(api, names, "Succeeded", timeout)
            wall = time.monotonic() - start

            _print_scale(rec, names, jobs, applied, finished, wall)
            spent = []
            for process, before in zip(replicas, cpu_before, strict=True):
                try:
                    spent.append(f"{1000 * (_cpu_seconds(process) - before) / jobs:.0f}")
                except psutil.NoSuchProcess:
                    spent.append("(restarted)")
            emulator_ms = 1000 * (time.process_time() - bench_cpu) / jobs
            print(
                f"  CPU per job until all Succeeded: operator replicas {' and '.join(spent)} ms, "
                f"emulator + simulated KubeRay {emulator_ms:.0f} ms",
                flush=True,
            )
            # a replica restarted meanwhile counts from 0 again: its figure is then a lower bound
            reconciles = " and ".join(
                f"{max(0.0, _reconciles(port) - reconciles_before[name]) / jobs:.1f}"
                for name, port in ports.items()
            )
            refused = ", ".join(
                f"{action.split('.')[-1].lower()} {plural} {n / jobs:.2f}"
                for (action, plural), n in rec.refused.most_common(4)
            )
            print(
                f"  per job: reconciles by the replicas {reconciles}; writes refused with 409: "
                f"{refused or 'none'}",
                flush=True,
            )

            await asyncio.sleep(3)  # the last status writes and Events settle
            rest_cpu = rss = float("nan")
            for _ in range(3):  # the leader may change (a loaded machine): measure it again
                leader = _holder(api) or "operator"
                slot = ["operator", "standby"].index(leader)
                try:
                    active = psutil.Process(emulated.processes[slot].pid)
                    cpu0, t0 = _cpu_seconds(active), time.monotonic()
                    await asyncio.sleep(rest)
                    rest_cpu = 100 * (_cpu_seconds(active) - cpu0) / (time.monotonic() - t0)
                    rss = active.memory_info().rss / 2**20
                    break
                except psutil.NoSuchProcess:
                    continue
            print(
                f"  at rest ({jobs} finished, {rest:.0f} s): CPU {rest_cpu:5.2f} % of one core, "
                f"RSS {rss:.0f} MB   target: <= {TARGET_REST_CPU:.0f} %, <= {TARGET_RSS_MB:.0f} MB",
                flush=True,
            )

            leader = _holder(api) or "operator"
            other = "standby" if leader == "operator" else "operator"
            killed.add(leader)
            emulated.processes[["operator", "standby"].index(leader)].send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await create_job(api, sample_job("after-failover"))
            while _holder(api) != other and time.monotonic() - killed_at < 120:
                await asyncio.sleep(0.05)
            takeover = time.monotonic() - killed_at
            while "after-failover" not in rec.cluster and time.monotonic() - killed_at < 120:
                await asyncio.sleep(0.05)
            next_action = rec.cluster.get("after-failover", float("nan")) - killed_at
            await _phase(api, ["after-failover"], "Succeeded", 60)
            kubelet.cancel()

    print(
        f"  failover: Lease taken {takeover:5.1f} s, next action (RayCluster of a job applied "
        f"at the kill) {next_action:5.1f} s after SIGKILL   target: <= {TARGET_TAKEOVER_S:.0f} s"
    )
    print(f"  children created twice {rec.duplicates()}   target: 0")
    print(f"  replicas restarted after losing the Lease on the loaded machine: {emulated.restarts}")
    print(f"  operator logs           {emulated.workdir}")
    print(f"  at the end: {_load()}")
    return 0


def _print_scale(
    rec: Recorder, names: list[str], jobs: int, applied: float, finished: int, wall: float
) -> None:
    to_cluster = [rec.cluster[n] - rec.applied[n] for n in names if n in rec.cluster]
    to_rayjob = [rec.rayjob[n] - rec.ready[n] for n in names if n in rec.rayjob and n in rec.ready]
    print(f"operator scale: {jobs} RLHFJobs applied at once (in {applied:.1f} s), 2 replicas")
    print(f"  {finished}/{jobs} jobs Succeeded after {wall:.1f} s; {_load()}")
    top = ", ".join(
        f"{action.split('.')[-1].lower()} {plural}{'/' + sub if sub else ''} {n / jobs:.1f}"
        for (action, plural, sub), n in rec.requests.most_common(8)
    )
    print(f"  API writes and reads per job (all clients): {top}")
    for label, values, target in (
        ("apply -> RayCluster", to_cluster, TARGET_CLUSTER_P99_S),
        ("ready -> first RayJob", to_rayjob, TARGET_RAYJOB_P99_S),
    ):
        if values:
            print(
                f"  {label:22s} p50 {statistics.median(values):6.2f} s  p99 "
                f"{_percentile(values, 0.99):6.2f} s   target: p99 <= {target:.0f} s "
                f"({len(values)}/{jobs} jobs)",
                flush=True,
            )


def _load() -> str:
    """The machine's load (the figures depend on it: a shared machine)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000, help="RLHFJobs to apply (1000)")
    parser.add_argument("--rest", type=float, default=30, help="seconds measured at rest (30)")
    parser.add_argument("--timeout", type=float, default=900, help="give up after (s)")
    args = parser.parse_args()
    return asyncio.run(run(args.jobs, args.rest, args.timeout))


if __name__ == "__main__":
    raise SystemExit(main())
