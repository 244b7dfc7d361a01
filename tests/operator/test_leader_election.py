"""Leader election: two replicas against one API, only the Lease holder acts.

The Lease semantics (claim, renew, expiry, release, conflicts) are checked with two electors and
a controlled clock against the emulated API server; the failover is checked end to end with two
real operator processes (`python -m rlhf_operator --leader-election`), the active one killed with
SIGKILL while jobs run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kube_sim import (
    ALL_VERBS,
    JOBS,
    RAYCLUSTERS,
    RAYJOBS,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    eventually,
    sample_job,
)
from kubernetes.client.exceptions import ApiException
from rlhf_operator import kube, leader

NS = "ns"
LEASES = "coordination.k8s.io/v1/leases"
KUBECONFIG = os.environ["KUBECONFIG"]
LEASE_SECONDS = 10
"""The replicas' lease duration here (as in production): a killed leader's Lease expires after
it, and the standby tries every 0.2 x that; bench/operator_scale.py measures the failover with
the production timing."""


@pytest.fixture()
def leases(api: RLHFEmulator) -> RLHFEmulator:
    """The emulator serving coordination.k8s.io Leases too; the kubernetes client pointed at it."""
    api.resources[LEASES] = kmock.ResourceInfo(kind="Lease", namespaced=True, verbs=ALL_VERBS)
    kube.configure()
    return api


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def holder(api: RLHFEmulator, name: str = leader.DEFAULT_LEASE) -> str | None:
    lease = api.get(LEASES, NS, name)
    return ((lease or {}).get("spec") or {}).get("holderIdentity")


async def test_one_replica_holds_the_lease_and_the_other_takes_over_only_after_expiry(
    leases: RLHFEmulator,
) -> None:
    clock = Clock()
    config = leader.LeaseConfig(namespace=NS, duration=10, renew_deadline=7, retry_period=2)
    a = leader.LeaderElector(
        leader.LeaseConfig(**{**config.__dict__, "identity": "a"}), clock=clock
    )
    b = leader.LeaderElector(
        leader.LeaseConfig(**{**config.__dict__, "identity": "b"}), clock=clock
    )

    assert await asyncio.to_thread(a.try_acquire_or_renew) and holder(leases) == "a"
    assert (
        not await asyncio.to_thread(b.try_acquire_or_renew) and b.contacted
    )  # held: b stands by, ready
    clock.now += 5
    assert await asyncio.to_thread(a.try_acquire_or_renew)  # a renews
    clock.now += 1
    assert not await asyncio.to_thread(b.try_acquire_or_renew)  # b sees the renewal (its clock)
    clock.now += 9
    assert not await asyncio.to_thread(b.try_acquire_or_renew)  # unchanged for 9 s: still a's
    clock.now += 2  # a died: unchanged for 11 s > leaseDurationSeconds
    assert await asyncio.to_thread(b.try_acquire_or_renew) and holder(leases) == "b"
    assert leases.get(LEASES, NS, leader.DEFAULT_LEASE)["spec"]["leaseTransitions"] == 1
    assert (
        not await asyncio.to_thread(a.try_acquire_or_renew) and not a.leading
    )  # a came back: b holds it now


async def test_a_released_lease_is_taken_at_once(leases: RLHFEmulator) -> None:
    clock = Clock()
    a = leader.LeaderElector(leader.LeaseConfig(namespace=NS, identity="a"), clock=clock)
    b = leader.LeaderElector(leader.LeaseConfig(namespace=NS, identity="b"), clock=clock)
    assert await asyncio.to_thread(a.try_acquire_or_renew)
    assert not await asyncio.to_thread(b.try_acquire_or_renew)
    await asyncio.to_thread(a.release)
    assert holder(leases) == ""
    assert await asyncio.to_thread(b.try_acquire_or_renew) and holder(leases) == "b"


async def test_two_replicas_claiming_an_expired_lease_at_once_get_one_winner(
    leases: RLHFEmulator,
) -> None:
    """Both read the expired Lease, both write: the second write is refused (409)."""
    clock = Clock()
    old = leader.LeaderElector(leader.LeaseConfig(namespace=NS, identity="old"), clock=clock)
    assert await asyncio.to_thread(old.try_acquire_or_renew)
    a = leader.LeaderElector(leader.LeaseConfig(namespace=NS, identity="a"), clock=clock)
    b = leader.LeaderElector(leader.LeaseConfig(namespace=NS, identity="b"), clock=clock)
    assert not await asyncio.to_thread(a.try_acquire_or_renew) and not await asyncio.to_thread(
        b.try_acquire_or_renew
    )
    clock.now += 11
    stale = await asyncio.to_thread(kube.read_lease, NS, leader.DEFAULT_LEASE)
    assert await asyncio.to_thread(a.try_acquire_or_renew)
    # b decides on the copy read before a's claim landed: the API server refuses it
    taken = b._lease(stale["spec"], stale)
    with pytest.raises(ApiException) as refused:
        await asyncio.to_thread(kube.patch_lease, NS, leader.DEFAULT_LEASE, taken)
    assert refused.value.status == 409
    assert not await asyncio.to_thread(b.try_acquire_or_renew) and holder(leases) == "a"


def test_lease_timing_must_leave_the_leader_time_to_stop() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        leader.LeaseConfig(namespace=NS, duration=5, renew_deadline=6, retry_period=1)


# --------------------------------------------------------------------------- two real replicas


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Replica:
    """`python -m rlhf_operator --leader-election` as its own process (as in a pod)."""

    def __init__(self, name: str, log: Path) -> None:
        self.name, self.port, self.log = name, _free_port(), log
        self.killed, self.restarts = False, 0
        self.start()

    def start(self) -> None:
        env = {**os.environ, "POD_NAME": self.name, "KUBECONFIG": KUBECONFIG}
        with self.log.open("a") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rlhf_operator",
                    "--leader-election",
                    f"--lease-namespace={NS}",
                    f"--lease-duration={LEASE_SECONDS}",
                    f"--liveness=http://127.0.0.1:{self.port}/healthz",
                    "--metrics-port=0",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill; the kubelet does not bring it back."""
        self.killed = True
        self.process.send_signal(signal.SIGKILL)

    def restart_if_exited(self) -> None:
        """What the kubelet does for a container that exited (e.g. a leader that lost its
        Lease on a stalled machine exits 1 and comes back as a standby)."""
        if not self.killed and self.process.poll() is not None:
            self.restarts += 1
            self.start()

    def probe(self, path: str) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of /healthz or /readyz; (0, {}) while nothing answers."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except OSError:
            return 0, {}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def probed(replica: Replica, path: str, ok: Any, timeout: float = 60) -> Any:
    """Probe (off the event loop, which serves the emulator) until `ok(answer)`."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await asyncio.to_thread(replica.probe, path)
        if ok(answer):
            return answer
        assert time.monotonic() < deadline, f"{replica.name} {path}: {answer}"
        await asyncio.sleep(0.2)


@pytest.fixture()
async def replicas(tmp_path: Path) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []

    async def kubelet() -> None:
        while True:
            for replica in started:
                replica.restart_if_exited()
            await asyncio.sleep(0.5)

    task = asyncio.create_task(kubelet())
    yield started
    task.cancel()
    for replica in started:
        replica.stop()
        tail = replica.log.read_text().splitlines()[-40:]
        print(f"--- {replica.name} (exit {replica.process.returncode}, restarts "
              f"{replica.restarts}):", *tail, sep="\n")  # fmt: skip


class Creations:
    """Every object of the children's kinds ever seen, by name -> uids (a name with two uids
    was created twice)."""

    def __init__(self, api: RLHFEmulator) -> None:
        self.api = api
        self.uids: dict[tuple[str, str], set[str]] = {}

    async def watch(self) -> None:
        while True:
            for resource in (RAYCLUSTERS, RAYJOBS):
                for obj in self.api.live(resource):
                    meta = obj["metadata"]
                    self.uids.setdefault((resource, meta["name"]), set()).add(meta["uid"])
            await asyncio.sleep(0.1)


@pytest.fixture()
async def creations(api: RLHFEmulator) -> AsyncIterator[Creations]:
    seen = Creations(api)
    task = asyncio.create_task(seen.watch())
    yield seen
    task.cancel()


RUN_A_SECOND = [
    {"jobDeploymentStatus": "Initializing"},
    *[{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}] * 20,
    {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
]


async def test_killing_the_active_replica_hands_over_and_creates_nothing_twice(
    leases: RLHFEmulator,
    kuberay: SimulatedKubeRay,
    replicas: list[Replica],
    creations: Creations,
    tmp_path: Path,
) -> None:
    api = leases
    kuberay.plan = lambda rayjob: RUN_A_SECOND
    active = Replica("replica-a", tmp_path / "a.log")
    replicas.append(active)
    await eventually(lambda: holder(api) == "replica-a")
    standby = Replica("replica-b", tmp_path / "b.log")
    replicas.append(standby)
    # The standby is live and ready, and says it does not lead; the active one says it does.
    standby_ready = await probed(standby, "/readyz", lambda answer: answer[0] == 200)
    assert standby_ready[1] == {"leader": False, "identity": "replica-b", "lost": False}
    assert (await probed(standby, "/healthz", lambda answer: answer[0] == 200))[0] == 200
    await probed(active, "/readyz", lambda answer: answer == (200, {**answer[1], "leader": True}))

    jobs = [f"job-{i}" for i in range(2)]
    for name in jobs:
        await create_job(api, sample_job(name))
    await eventually(lambda: all(api.get(RAYJOBS, NS, f"{n}-sft-1") for n in jobs))
    assert not [r for r in api.live(RAYJOBS) if r["metadata"]["name"].startswith("job-") and
                not r["metadata"]["name"].endswith("-sft-1")]  # fmt: skip

    active.kill()
    killed = time.monotonic()
    await eventually(lambda: holder(api) == "replica-b", timeout=60)
    takeover = time.monotonic() - killed
    # The new leader carries on: every job runs to its end.
    await eventually(
        lambda: all((api.get(JOBS, NS, n) or {}).get("status", {}).get("phase") == "Succeeded"
                    for n in jobs),
        timeout=120,
    )  # fmt: skip

    # the lease + one retry period (jittered), and the API's answers on a busy machine; the
    # promise with the production lease (10 s) is 15 s
    assert takeover < 15, f"the standby took over {takeover:.1f}s after the kill"
    twice = {key: uids for key, uids in creations.uids.items() if len(uids) > 1}
    assert not twice, f"created twice: {twice}"
    names_seen = {name for (_, name) in creations.uids}
    assert names_seen >= {f"{n}-ray" for n in jobs}
    assert {n for n in names_seen if n.endswith("-1")} == {
        f"{n}-{stage}-1" for n in jobs for stage in ("sft", "reward", "ppo", "evaluation")
    }


async def test_a_leader_that_cannot_renew_in_time_stops_acting(leases: RLHFEmulator) -> None:
    """The API hangs: the leader gives up at its renew deadline, before the Lease expires for
    the others (renew deadline < lease duration), even though its request never returns."""
    config = leader.LeaseConfig(namespace=NS, identity="a", duration=3, renew_deadline=1.5,
                                retry_period=0.3)  # fmt: skip
    elector = leader.LeaderElector(config)
    assert await asyncio.to_thread(elector.try_acquire_or_renew)
    lost = asyncio.Event()
    hold = leases.tripwire(lambda r: r.resource == kmock.resource(LEASES), landed=False)
    started = time.monotonic()
    keeper = asyncio.create_task(leader.keep(elector, lost.set))
    try:
        await asyncio.wait_for(lost.wait(), timeout=10)
        assert time.monotonic() - started < config.duration  # before anyone may take over
        assert not elector.leading
    finally:
        hold.release()
        keeper.cancel()
