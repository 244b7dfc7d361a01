"""Operator restarts: killed at each point that matters, started again, same outcome.

"Killed" is `OperatorRunner.kill()`: every task of the operator is cancelled where it stands
and no cleanup runs, as with SIGKILL. The kill points are made exact with the emulator's
tripwires: the write the operator was making is held, and either lands (the operator died
before it read the answer) or never does (it died before sending it). Then a fresh operator
starts from what the API holds, and the job must end exactly as an uninterrupted run does: no
second RayCluster or RayJob, no pool cluster leaked (still owned by a finished job, or claimed
twice), no status lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import kmock
import pytest
from emulator import Tripwire
from kmock._internal.rendering import Request
from kube_sim import (
    HANG,
    JOBS,
    RAYCLUSTERS,
    RAYJOBS,
    SUCCEED,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    create_jobs_while_down,
    eventually,
    sample_job,
    stage_of,
)
from rlhf_operator import names
from rlhf_operator import warmpool as wp

NS = "ns"
STAGES = ("sft", "reward", "ppo", "evaluation")
KEEP = {"keepAliveSeconds": 300}


def status(api: RLHFEmulator, name: str) -> dict[str, Any]:
    return (api.get(JOBS, NS, name) or {}).get("status") or {}


def outcome(api: RLHFEmulator, name: str) -> dict[str, Any]:
    """What a user reads once the job is over, without times and free-text messages."""
    st = status(api, name)
    return {
        "phase": st.get("phase"),
        "stage": st.get("stage"),
        "progress": st.get("progress"),
        "cluster": (st["cluster"]["name"], st["cluster"].get("reused", False)),
        "stages": {
            stage: (s.get("state"), s.get("attempts"), s.get("rayJob"), s.get("artifact"))
            for stage, s in st.get("stages", {}).items()
        },
        "conditions": {c["type"]: c["status"] for c in st.get("conditions", [])},
        "finished": bool(st.get("startTime") and st.get("completionTime")),
    }


def uninterrupted(name: str, cluster: str, reused: bool = False) -> dict[str, Any]:
    """The outcome of a four-stage job that nothing interrupted (checked by the first test)."""
    return {
        "phase": "Succeeded",
        "stage": "evaluation",
        "progress": "done",
        "cluster": (cluster, reused),
        "stages": {
            stage: ("Succeeded", 1, f"{name}-{stage}-1", f"s3://bucket/rlhf/{name}/{stage}")
            for stage in STAGES
        },
        "conditions": {
            "Valid": "True",
            "ClusterReady": "False",  # released at the end
            **{names.stage_condition(stage): "True" for stage in STAGES},
            "Succeeded": "True",
            "Failed": "False",
        },
        "finished": True,
    }


def ever_existed(api: RLHFEmulator, resource: str) -> list[str]:
    wanted = kmock.resource(resource)
    return sorted(name for (res, _, name) in api.objects if res == wanted)


def creates(resource: str, name: str | None = None) -> Callable[[Request], bool]:
    def matches(r: Request) -> bool:
        body = r.data if isinstance(r.data, dict) else {}
        return (
            r.action == kmock.action.CREATE
            and r.resource == kmock.resource(resource)
            and (name is None or body.get("metadata", {}).get("name") == name)
        )

    return matches


def relabels(resource: str, name: str, state: str) -> Callable[[Request], bool]:
    """A merge-patch that moves a RayCluster to pool state `state` (claim or release)."""

    def matches(r: Request) -> bool:
        labels = ((r.data if isinstance(r.data, dict) else {}).get("metadata") or {}).get(
            "labels"
        ) or {}
        return (
            r.action == kmock.action.UPDATE
            and r.resource == kmock.resource(resource)
            and r.name == name
            and labels.get(wp.LABEL_STATE) == state
        )

    return matches


def finishes_stage(job: str, stage: str) -> Callable[[Request], bool]:
    """The status write that records `stage` of `job` as succeeded."""

    def matches(r: Request) -> bool:
        stages = (((r.data if isinstance(r.data, dict) else {}).get("status")) or {}).get(
            "stages"
        ) or {}
        return (
            r.action == kmock.action.UPDATE
            and r.resource == kmock.resource(JOBS)
            and r.subresource == "status"
            and r.name == job
            and (stages.get(stage) or {}).get("state") == "Succeeded"
        )

    return matches


async def kill_at(operator: OperatorRunner, wire: Tripwire) -> None:
    """Wait for the tripwire, kill the operator there, start a fresh one."""
    await eventually(wire.tripped.is_set)
    await operator.kill(then=wire.release)
    await operator.start()


def leaks(api: RLHFEmulator) -> list[str]:
    """RayClusters neither owned by exactly one unfinished job nor waiting in the pool."""
    found = []
    for cluster in api.live(RAYCLUSTERS):
        meta = cluster["metadata"]
        owners = meta.get("ownerReferences") or []
        state = (meta.get("labels") or {}).get(wp.LABEL_STATE)
        if state == wp.STATE_AVAILABLE and not owners:
            continue
        if len(owners) != 1:
            found.append(f"{meta['name']}: owners {owners}")
        elif status(api, owners[0]["name"]).get("phase") in ("Succeeded", "Failed"):
            found.append(f"{meta['name']}: held by the finished job {owners[0]['name']}")
    return found


async def no_leaks(api: RLHFEmulator) -> None:
    """Once the operator has settled, every cluster is a running job's or the pool's."""
    try:
        await eventually(lambda: not leaks(api))
    except AssertionError:
        raise AssertionError(f"leaked clusters: {leaks(api)}") from None


# --------------------------------------------------------------------------- reference


async def test_the_uninterrupted_outcome(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, sample_job("calm"))
    await eventually(lambda: status(api, "calm").get("phase") == "Succeeded")
    await eventually(lambda: not api.live(RAYCLUSTERS))
    assert outcome(api, "calm") == uninterrupted("calm", "calm-ray")


# --------------------------------------------------------------------------- kill points


@pytest.mark.parametrize("landed", [True, False], ids=["after-create", "before-create"])
async def test_killed_while_creating_the_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner, landed: bool
) -> None:
    wire = api.tripwire(creates(RAYCLUSTERS), landed=landed)
    await create_job(api, sample_job("boot"))
    await kill_at(operator, wire)
    await eventually(lambda: status(api, "boot").get("phase") == "Succeeded")
    await eventually(lambda: not api.live(RAYCLUSTERS))

    assert outcome(api, "boot") == uninterrupted("boot", "boot-ray")
    assert ever_existed(api, RAYCLUSTERS) == ["boot-ray"]
    assert ever_existed(api, RAYJOBS) == sorted(f"boot-{s}-1" for s in STAGES)


@pytest.mark.parametrize("landed", [True, False], ids=["after-status", "before-status"])
async def test_killed_between_stages_while_recording_one_as_done(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner, landed: bool
) -> None:
    wire = api.tripwire(finishes_stage("hop", "sft"), landed=landed)
    await create_job(api, sample_job("hop"))
    await kill_at(operator, wire)
    await eventually(lambda: status(api, "hop").get("phase") == "Succeeded")

    assert outcome(api, "hop") == uninterrupted("hop", "hop-ray")
    assert ever_existed(api, RAYJOBS) == sorted(f"hop-{s}-1" for s in STAGES)
    assert kuberay.submitted.count("hop-reward-1") == 1


@pytest.mark.parametrize("landed", [True, False], ids=["after-create", "before-create"])
async def test_killed_between_stages_while_creating_the_next_rayjob(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner, landed: bool
) -> None:
    wire = api.tripwire(creates(RAYJOBS, "step-reward-1"), landed=landed)
    await create_job(api, sample_job("step"))
    await kill_at(operator, wire)
    await eventually(lambda: status(api, "step").get("phase") == "Succeeded")

    assert outcome(api, "step") == uninterrupted("step", "step-ray")
    assert ever_existed(api, RAYJOBS) == sorted(f"step-{s}-1" for s in STAGES)
    assert ever_existed(api, RAYCLUSTERS) == ["step-ray"]


async def test_killed_mid_stage_while_the_stage_finishes_and_the_next_one_is_due(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    release_ppo = False
    kuberay.plan = lambda rj: HANG if stage_of(rj)[0] == "ppo" and not release_ppo else SUCCEED
    await create_job(api, sample_job("midway"))
    await eventually(
        lambda: (
            ((api.get(RAYJOBS, NS, "midway-ppo-1") or {}).get("status") or {}).get("jobStatus")
            == "RUNNING"
        ),
    )
    await operator.kill()
    release_ppo = True  # the stage ends while no operator runs
    await eventually(
        lambda: api.get(RAYJOBS, NS, "midway-ppo-1")["status"].get("jobStatus") == "SUCCEEDED"
    )
    await operator.start()
    await eventually(lambda: status(api, "midway").get("phase") == "Succeeded")

    assert outcome(api, "midway") == uninterrupted("midway", "midway-ray")
    assert ever_existed(api, RAYJOBS) == sorted(f"midway-{s}-1" for s in STAGES)


async def test_a_killed_or_stopped_operator_leaves_nothing_running(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    # Killed while a handler thread waits on a held request (kopf cannot cancel a thread).
    wire = api.tripwire(creates(RAYJOBS), landed=True)
    await create_job(api, sample_job("brief"))
    await eventually(wire.tripped.is_set)
    assert operator.threads()
    await operator.kill(then=wire.release)
    assert operator.threads() == []
    # Stopped after a run: nothing of it keeps reconciling (or failing) into the next test.
    await operator.start()
    await eventually(lambda: status(api, "brief").get("phase") == "Succeeded")
    await operator.stop()
    assert operator.threads() == []


# --------------------------------------------------------------------------- warm pools


async def _pooled_cluster_of(api: RLHFEmulator, job: str) -> None:
    """Run `job` (with a warm pool) to the end: its cluster waits in the pool afterwards."""
    await create_job(api, sample_job(job, warmPool=KEEP))
    await eventually(lambda: status(api, job).get("phase") == "Succeeded")
    await eventually(
        lambda: (
            ((api.get(RAYCLUSTERS, NS, f"{job}-ray") or {}).get("metadata") or {})
            .get("labels", {})
            .get(wp.LABEL_STATE)
            == wp.STATE_AVAILABLE
        ),
    )


@pytest.mark.parametrize("landed", [True, False], ids=["after-claim", "before-claim"])
async def test_killed_while_claiming_a_pool_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner, landed: bool
) -> None:
    await _pooled_cluster_of(api, "donor")
    wire = api.tripwire(relabels(RAYCLUSTERS, "donor-ray", wp.STATE_CLAIMED), landed=landed)
    await create_jobs_while_down(api, operator, sample_job("heir", warmPool=KEEP))
    await kill_at(operator, wire)
    await eventually(lambda: status(api, "heir").get("phase") == "Succeeded")
    await eventually(
        lambda: (
            (api.get(RAYCLUSTERS, NS, "donor-ray")["metadata"].get("annotations") or {}).get(
                wp.ANNOTATION_RELEASED_BY
            )
            == f"{NS}/heir"
        ),
    )

    assert outcome(api, "heir") == uninterrupted("heir", "donor-ray", reused=True)
    assert ever_existed(api, RAYCLUSTERS) == ["donor-ray"]
    await no_leaks(api)


async def test_killed_while_two_jobs_claim_the_same_pool_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await _pooled_cluster_of(api, "donor")
    claims = relabels(RAYCLUSTERS, "donor-ray", wp.STATE_CLAIMED)
    api.gate(claims, count=2)  # both read the same version; one claim lands
    wire = api.tripwire(claims, landed=True)
    await create_jobs_while_down(
        api, operator, sample_job("ann", warmPool=KEEP), sample_job("bob", warmPool=KEEP)
    )
    await kill_at(operator, wire)
    for job in ("ann", "bob"):
        await eventually(lambda job=job: status(api, job).get("phase") == "Succeeded")

    reused = {job: status(api, job)["cluster"].get("reused", False) for job in ("ann", "bob")}
    assert sorted(reused.values()) == [False, True], reused
    loser = next(job for job, r in reused.items() if not r)
    assert ever_existed(api, RAYCLUSTERS) == sorted(["donor-ray", f"{loser}-ray"])
    await eventually(lambda: len(api.live(RAYCLUSTERS)) == 2)
    await no_leaks(api)


@pytest.mark.parametrize("landed", [True, False], ids=["after-release", "before-release"])
async def test_killed_while_releasing_the_cluster_to_the_pool(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner, landed: bool
) -> None:
    wire = api.tripwire(relabels(RAYCLUSTERS, "last-ray", wp.STATE_AVAILABLE), landed=landed)
    await create_job(api, sample_job("last", warmPool=KEEP))
    await kill_at(operator, wire)
    await eventually(
        lambda: (
            ((api.get(RAYCLUSTERS, NS, "last-ray") or {}).get("metadata") or {})
            .get("labels", {})
            .get(wp.LABEL_STATE)
            == wp.STATE_AVAILABLE
        ),
    )
    assert outcome(api, "last") == uninterrupted("last", "last-ray")
    await no_leaks(api)

    # ... and the pool serves the next job.
    await create_jobs_while_down(api, operator, sample_job("next", warmPool=KEEP))
    await eventually(lambda: status(api, "next").get("phase") == "Succeeded")
    assert outcome(api, "next") == uninterrupted("next", "last-ray", reused=True)
    assert ever_existed(api, RAYCLUSTERS) == ["last-ray"]
