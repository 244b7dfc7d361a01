"""Warm pools across jobs: the real operator against the emulated API and a simulated KubeRay.

What a user sees: which RayClusters ever existed, which one each job ran on
(`status.cluster`), the pool labels on the cluster between jobs, and the Events.
"""

from __future__ import annotations

import json
from typing import Any

import kmock
import pytest
from kube_sim import (
    HANG,
    JOBS,
    MERGE_PATCH,
    RAYCLUSTERS,
    RAYJOBS,
    SUCCEED,
    GarbageCollector,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    always,
    create_job,
    create_jobs_while_down,
    delete_job,
    eventually,
    sample_job,
)
from rlhf_operator import metrics, names
from rlhf_operator import warmpool as wp

NS = "ns"
KEEP = {"keepAliveSeconds": 300}
SFT_ONLY = {
    "reward": {"enabled": False},
    "ppo": {"enabled": False},
    "evaluation": {"enabled": False},
}
SUBMISSION_FAILED: list[dict[str, Any]] = [
    {"jobDeploymentStatus": "Initializing"},
    {
        "jobDeploymentStatus": "Failed",
        "reason": "SubmissionFailed",
        "message": "failed to submit the job: the Ray head did not answer",
    },
]
APP_FAILED: list[dict[str, Any]] = [
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"},
]


def job(name: str, namespace: str = NS, warm_pool: dict | None = None, **spec: Any) -> dict:
    """A one-stage (SFT) job that keeps its cluster warm for 300 s unless told otherwise."""
    spec.setdefault("stages", SFT_ONLY)
    return sample_job(name, namespace, warmPool=KEEP if warm_pool is None else warm_pool, **spec)


def status(api: RLHFEmulator, name: str, namespace: str = NS) -> dict[str, Any]:
    return (api.get(JOBS, namespace, name) or {}).get("status") or {}


def ran_on(api: RLHFEmulator, name: str, namespace: str = NS) -> tuple[str, bool]:
    """(status.cluster.name, status.cluster.reused): the cluster the job ran on, and whether it
    came from the pool (`reused` defaults to false: the CRD's default, not written)."""
    cluster_status = status(api, name, namespace).get("cluster") or {}
    return cluster_status.get("name"), cluster_status.get("reused", False)


def phase_is(api: RLHFEmulator, name: str, phase: str, namespace: str = NS):
    return lambda: status(api, name, namespace).get("phase") == phase


def cluster(api: RLHFEmulator, name: str, namespace: str = NS) -> dict[str, Any]:
    return api.get(RAYCLUSTERS, namespace, name) or {}


def labels(api: RLHFEmulator, name: str, namespace: str = NS) -> dict[str, str]:
    return cluster(api, name, namespace).get("metadata", {}).get("labels") or {}


def pooled(api: RLHFEmulator, name: str, namespace: str = NS):
    """The cluster waits in the pool: available, owned by nobody, no job label."""

    def check() -> bool:
        meta = cluster(api, name, namespace).get("metadata") or {}
        return (
            (meta.get("labels") or {}).get(wp.LABEL_STATE) == wp.STATE_AVAILABLE
            and not meta.get("ownerReferences")
            and names.LABEL_JOB not in (meta.get("labels") or {})
        )

    return check


def ever_existed(api: RLHFEmulator, resource: str) -> list[tuple[str, str]]:
    wanted = kmock.resource(resource)
    return sorted((ns, name) for (res, ns, name) in api.objects if res == wanted)


async def finished_and_pooled(api: RLHFEmulator, name: str, cluster_name: str) -> None:
    await eventually(phase_is(api, name, "Succeeded"))
    await eventually(pooled(api, cluster_name))


# --------------------------------------------------------------------------- reuse


async def test_two_sequential_jobs_with_the_same_signature_share_one_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, job("first"))
    await finished_and_pooled(api, "first", "first-ray")
    meta = cluster(api, "first-ray")["metadata"]
    assert meta["annotations"][wp.ANNOTATION_RELEASED_BY] == f"{NS}/first"
    assert wp.ANNOTATION_EXPIRES_AT in meta["annotations"]
    await eventually(lambda: names.CLUSTER_POOLED in api.reasons_for("first"))

    (second,) = await create_jobs_while_down(api, operator, job("second"))
    await eventually(phase_is(api, "second", "Succeeded"))

    assert ever_existed(api, RAYCLUSTERS) == [(NS, "first-ray")]
    assert ran_on(api, "second") == ("first-ray", True)
    assert ran_on(api, "first") == ("first-ray", False)
    await eventually(lambda: names.WARM_POOL_HIT in api.reasons_for("second"))
    assert names.CLUSTER_CREATED not in api.reasons_for("second")
    rayjob = api.get(RAYJOBS, NS, "second-sft-1")
    assert rayjob["spec"]["clusterSelector"] == {names.LABEL_RAY_CLUSTER: "first-ray"}
    # The second job's identity travels with its RayJob, not with the (first job's) cluster.
    env = json.loads(rayjob["spec"]["runtimeEnvYAML"])["env_vars"]
    assert env["RLHF_JOB_NAME"] == "second"
    assert "first" not in json.dumps(cluster(api, "first-ray")["spec"])
    # While it ran, the cluster was the second job's (deleting the job would have cleaned it up).
    claimed = [
        v
        for v in api.objects[RAYCLUSTERS, NS, "first-ray"].history
        if v is not None and (v.get("metadata", {}).get("labels") or {}).get(wp.LABEL_CLAIMED_BY)
    ]
    assert claimed[-1]["metadata"]["labels"][wp.LABEL_CLAIMED_BY] == second["metadata"]["uid"]
    assert claimed[-1]["metadata"]["ownerReferences"][0]["name"] == "second"
    # ... and it went back to the pool when the second job finished.
    await eventually(pooled(api, "first-ray"))
    assert (
        cluster(api, "first-ray")["metadata"]["annotations"][wp.ANNOTATION_RELEASED_BY]
        == f"{NS}/second"
    )


async def test_a_job_without_keep_alive_deletes_its_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, job("plain", warm_pool={}))
    await eventually(phase_is(api, "plain", "Succeeded"))
    await eventually(lambda: not api.live(RAYCLUSTERS))
    await eventually(lambda: names.CLUSTER_DELETED in api.reasons_for("plain"))  # the last one
    assert names.WARM_POOL_MISS not in api.reasons_for("plain")


@pytest.mark.parametrize(
    ("namespace", "change"),
    [
        ("other-ns", {}),
        (NS, {"cluster": {"serviceAccountName": "other-team"}}),
        (NS, {"cluster": {"image": "registry.example/trainer:2"}}),
        (NS, {"cluster": {"workers": {"replicas": 4}}}),
        (NS, {"storage": {"uri": "s3://bucket/rlhf", "secretRef": {"name": "other-creds"}}}),
    ],
    ids=["namespace", "service-account", "image", "workers", "storage-secret"],
)
async def test_different_signatures_do_not_share(
    api: RLHFEmulator,
    kuberay: SimulatedKubeRay,
    operator: OperatorRunner,
    namespace: str,
    change: dict[str, Any],
) -> None:
    await create_job(api, job("first"))
    await finished_and_pooled(api, "first", "first-ray")

    await create_jobs_while_down(api, operator, job("other", namespace, **change))
    await eventually(phase_is(api, "other", "Succeeded", namespace))

    assert ran_on(api, "other", namespace) == ("other-ray", False)
    await eventually(lambda: names.WARM_POOL_MISS in api.reasons_for("other"))
    assert pooled(api, "first-ray")()  # untouched, still waiting for a matching job
    assert sorted(ever_existed(api, RAYCLUSTERS)) == sorted(
        [(NS, "first-ray"), (namespace, "other-ray")]
    )


async def test_an_explicit_pool_name_narrows_sharing(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, job("team-a", warm_pool={**KEEP, "pool": "team-a"}))
    await finished_and_pooled(api, "team-a", "team-a-ray")
    # Same shape, no pool name: not the team's pool.
    await create_jobs_while_down(api, operator, job("anyone"))
    await eventually(phase_is(api, "anyone", "Succeeded"))
    assert ran_on(api, "anyone") == ("anyone-ray", False)


# --------------------------------------------------------------------------- races


async def test_two_jobs_racing_for_one_pool_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, job("first"))
    await finished_and_pooled(api, "first", "first-ray")

    # Hold the first claim until the second one arrives: both carry the version they read.
    api.gate(
        lambda r: (
            r.action == kmock.action.UPDATE
            and r.resource == kmock.resource(RAYCLUSTERS)
            and ((r.data or {}).get("metadata") or {}).get("labels", {}).get(wp.LABEL_STATE)
            == wp.STATE_CLAIMED
        ),
        count=2,
    )
    await create_jobs_while_down(api, operator, job("left"), job("right"))
    await eventually(phase_is(api, "left", "Succeeded"))
    await eventually(phase_is(api, "right", "Succeeded"))

    clusters = {name: ran_on(api, name) for name in ("left", "right")}
    winners = [name for name, (_, reused) in clusters.items() if reused]
    assert len(winners) == 1, clusters
    loser = ({"left", "right"} - set(winners)).pop()
    assert clusters[winners[0]] == ("first-ray", True)
    assert clusters[loser] == (f"{loser}-ray", False)
    assert ever_existed(api, RAYCLUSTERS) == sorted([(NS, "first-ray"), (NS, f"{loser}-ray")])
    # Never two owners: every stored version of the pool cluster had at most one.
    versions = [v for v in api.objects[RAYCLUSTERS, NS, "first-ray"].history if v is not None]
    assert all(len(v.get("metadata", {}).get("ownerReferences") or []) <= 1 for v in versions)


# --------------------------------------------------------------------------- expiry


async def test_an_unclaimed_pool_cluster_is_deleted_when_it_expires(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    expiries = expiries_total()
    await create_job(api, job("brief", warm_pool={"keepAliveSeconds": 1}))
    await eventually(phase_is(api, "brief", "Succeeded"))
    await eventually(lambda: not api.live(RAYCLUSTERS))
    versions = [v for v in api.objects[RAYCLUSTERS, NS, "brief-ray"].history if v is not None]
    was_pooled = [
        v
        for v in versions
        if (v["metadata"].get("labels") or {}).get(wp.LABEL_STATE) == "available"
    ]
    assert was_pooled, "deleted without having waited in the pool"
    # The sweep counts the expiry once the API answered its delete: after the cluster is gone.
    await eventually(lambda: expiries_total() == expiries + 1)


async def test_an_expired_cluster_is_never_claimed(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, job("old"))
    await finished_and_pooled(api, "old", "old-ray")
    await operator.stop()
    expired = {"metadata": {"annotations": {wp.ANNOTATION_EXPIRES_AT: "2020-01-01T00:00:00Z"}}}
    await _patch_cluster(api, "old-ray", expired)
    # Hold the sweep's delete: the expired cluster is still there when the new job decides.
    sweep = api.tripwire(
        lambda r: r.action == kmock.action.DELETE and r.name == "old-ray", landed=False
    )
    await create_jobs_while_down(api, operator, job("new"))
    await eventually(phase_is(api, "new", "Succeeded"))
    assert ran_on(api, "new") == ("new-ray", False)
    await eventually(sweep.tripped.is_set)  # the sweep did try to delete it
    assert cluster(api, "old-ray")  # still there: the new job passed it over as expired
    sweep.release()  # the sweep's delete fails once (503); the next sweep deletes it
    await eventually(lambda: cluster(api, "old-ray") == {})


# --------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("plan", "pooled_after"),
    [(SUBMISSION_FAILED, False), (APP_FAILED, True)],
    ids=["cluster-to-blame", "job-to-blame"],
)
async def test_a_job_that_failed_because_of_its_cluster_does_not_pool_it(
    api: RLHFEmulator,
    kuberay: SimulatedKubeRay,
    operator: OperatorRunner,
    plan: list[dict[str, Any]],
    pooled_after: bool,
) -> None:
    kuberay.plan = always(plan)
    await create_job(api, job("broken", runPolicy={"backoffLimit": 0}))
    await eventually(phase_is(api, "broken", "Failed"))
    if pooled_after:
        await eventually(pooled(api, "broken-ray"))
    else:
        await eventually(lambda: not api.live(RAYCLUSTERS))
        await eventually(lambda: names.CLUSTER_DELETED in api.reasons_for("broken"))
        assert names.CLUSTER_POOLED not in api.reasons_for("broken")


async def test_an_unhealthy_cluster_is_not_pooled(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = always(HANG)
    await create_job(api, job("sick", runPolicy={"backoffLimit": 0}))
    await eventually(lambda: api.get(RAYJOBS, NS, "sick-sft-1"))
    # The head pod dies for good (KubeRay reports it; nothing heals it), and the stage fails.
    kuberay.ready_after = 10**9
    unhealthy = {"state": "failed", "conditions": [{"type": "HeadPodReady", "status": "False"}]}
    await _patch_status(api, RAYCLUSTERS, "sick-ray", unhealthy)
    await _patch_status(api, RAYJOBS, "sick-sft-1", APP_FAILED[-1])
    await eventually(phase_is(api, "sick", "Failed"))
    await eventually(lambda: not api.live(RAYCLUSTERS))
    await eventually(lambda: names.CLUSTER_DELETED in api.reasons_for("sick"))
    assert names.CLUSTER_POOLED not in api.reasons_for("sick")


# --------------------------------------------------------------------------- deletion


async def test_deleting_a_running_job_releases_its_cluster_to_the_pool(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = always(HANG)
    await create_job(api, job("doomed"))
    await eventually(lambda: api.get(RAYJOBS, NS, "doomed-sft-1"))
    await delete_job(api, NS, "doomed")
    await eventually(lambda: api.get(JOBS, NS, "doomed") is None)
    assert api.get(RAYJOBS, NS, "doomed-sft-1") is None  # the stage was stopped first
    assert pooled(api, "doomed-ray")()

    kuberay.plan = always(SUCCEED)
    await create_jobs_while_down(api, operator, job("retry"))
    await eventually(phase_is(api, "retry", "Succeeded"))
    assert ran_on(api, "retry") == ("doomed-ray", True)
    assert ever_existed(api, RAYCLUSTERS) == [(NS, "doomed-ray")]


async def test_deleting_a_job_without_keep_alive_deletes_its_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = always(HANG)
    await create_job(api, job("gone", warm_pool={}))
    await eventually(lambda: api.get(RAYJOBS, NS, "gone-sft-1"))
    await delete_job(api, NS, "gone")
    await eventually(lambda: api.get(JOBS, NS, "gone") is None)
    assert not api.live(RAYCLUSTERS)


async def test_a_new_job_named_like_the_pool_clusters_first_job_gets_its_own_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, gc: GarbageCollector, operator: OperatorRunner
) -> None:
    # "again-ray" waits in the pool for another shape; a new job "again" cannot use that name.
    first = await create_job(api, job("again"))
    await finished_and_pooled(api, "again", "again-ray")
    gc.paused = True  # the garbage collector is late: the first job's RayJob stays a while
    await delete_job(api, NS, "again")
    await eventually(lambda: api.get(JOBS, NS, "again") is None)
    old = api.get(RAYJOBS, NS, "again-sft-1")
    assert old["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]

    created = await create_job(api, job("again", cluster={"image": "registry.example/t:2"}))
    # its cluster is its own; its RayJob's name is taken by the first job's: it waits
    await eventually(lambda: names.RAYJOB_CONFLICT in api.reasons_for("again"))
    assert api.get(RAYJOBS, NS, "again-sft-1")["metadata"]["uid"] == old["metadata"]["uid"]
    gc.paused = False
    await eventually(phase_is(api, "again", "Succeeded"))
    assert ran_on(api, "again") == (f"again-{created['metadata']['uid'][:5]}-ray", False)
    assert pooled(api, "again-ray")()  # the pool's cluster was left alone
    # its own stage ran (the first job's RayJob at that name was never adopted)
    rayjob = api.get(RAYJOBS, NS, "again-sft-1")
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert kuberay.submitted.count("again-sft-1") == 2


# --------------------------------------------------------------------------- helpers


async def _patch_cluster(api: RLHFEmulator, name: str, patch: dict[str, Any]) -> None:
    url = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{name}"
    headers = {"Content-Type": "application/merge-patch+json"}
    async with api.patch(url, json=patch, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def _patch_status(
    api: RLHFEmulator, resource: str, name: str, status: dict[str, Any]
) -> None:
    url = f"/apis/ray.io/v1/namespaces/{NS}/{resource.rsplit('/', 1)[1]}/{name}/status"
    headers = {"Content-Type": "application/merge-patch+json"}
    async with api.patch(url, json={"status": status}, headers=headers) as resp:
        assert resp.status == 200, await resp.text()


def expiries_total() -> float | None:
    return metrics.METRICS.registry.get_sample_value("rlhf_operator_warm_pool_expiries_total")


async def test_a_pooled_cluster_edited_by_hand_is_never_claimed(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    """`kubectl edit` of a waiting cluster (here: another image) changes what a job would run
    on: the API server bumps its generation, and the next job with the same signature passes
    it over, says so, and builds its own."""
    await create_job(api, job("first"))
    await finished_and_pooled(api, "first", "first-ray")
    url = f"/apis/{names.RAY_API_VERSION}/namespaces/{NS}/{names.RAYCLUSTERS}/first-ray"
    edit = {"spec": {"headGroupSpec": {"rayStartParams": {"object-store-memory": "1"}}}}
    async with api.patch(url, json=edit, headers=MERGE_PATCH) as resp:
        assert resp.status < 300, await resp.text()
        assert (await resp.json())["metadata"]["generation"] == 2

    await create_jobs_while_down(api, operator, job("second"))
    await eventually(phase_is(api, "second", "Succeeded"))
    assert ran_on(api, "second") == ("second-ray", False)
    assert names.WARM_POOL_TAMPERED in api.reasons_for("second")
