"""A reconcile decided on a stale copy of the job never lands; it is decided again on the job
as stored.

kopf hands the timer the job as its watch last saw it; under load that copy can predate the
operator's own last status write. The status patch is a diff against the status that was read,
so merged onto the newer one it used to leave a mix of both: seen in CI as a job running on its
own new cluster with `status.cluster.reused: true` (the claim of a warm cluster, recorded a
tick earlier, and the stale tick's "create my own" merged together). And a new job's first
reconcile races kopf's own bookkeeping writes: that must not cost it a timer interval.

Each reconcile here is the operator's real one (`driver.reconcile_job`, as the kopf timer calls
it) against the emulated API server, which refuses a write whose resourceVersion is stale, as
the real one does.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import kmock
from kube_sim import JOBS, RAYCLUSTERS, RLHFEmulator, create_job, job_url, sample_job
from rlhf_operator import kube, names, warmpool
from rlhf_operator.reconcile import driver
from rlhf_operator.reconcile.model import Decision
from rlhf_operator.validation import validate

NS = "ns"


async def reconcile(
    body: dict[str, Any], pool: driver.Index | None = None
) -> tuple[Decision | None, list[str]]:
    """One reconcile of `body` with no children seen yet: (its decision, the Events posted)."""
    posted: list[str] = []
    decision = await asyncio.to_thread(
        driver.reconcile_job,
        copy.deepcopy(body),
        {},
        {},
        lambda _job, event: posted.append(event.reason),
        pool=pool or {},
    )
    return decision, posted


def warm_cluster_for(manifest: dict[str, Any]) -> driver.Index:
    """A pool index offering one warm cluster ("warm-ray") that fits the job."""
    job, problems = validate(driver.effective_manifest(manifest)[0])
    assert job is not None, problems
    signature = warmpool.pool_signature(job)
    warm = warmpool.PoolCluster(
        namespace=NS,
        name="warm-ray",
        resource_version="1",
        signature=signature,
        state=warmpool.STATE_AVAILABLE,
        expires_at=datetime.now(UTC) + timedelta(seconds=300),
        healthy=True,
        # intact: created with generation 1, never edited, its spec what this job builds
        generation=1,
        stamped_generation=1,
        spec_digest=warmpool.signature_material(job)["rayClusterSpec"],
    )
    return {(NS, signature): (warm,)}


def clusters_recorded(api: RLHFEmulator, name: str) -> list[tuple[str, bool]]:
    """(status.cluster.name, reused) in every stored version of the job, oldest first."""
    versions = api.objects[kmock.resource(JOBS), NS, name].history
    return [
        (cluster.get("name"), cluster.get("reused", False))
        for version in versions
        if version is not None
        and (cluster := (version.get("status") or {}).get("cluster") or {}).get("name")
    ]


async def test_a_decision_on_a_stale_copy_never_lands(api: RLHFEmulator) -> None:
    kube.configure()  # $KUBECONFIG points at the emulator (conftest)
    created = await create_job(api, sample_job("demo", warmPool={"keepAliveSeconds": 300}))

    # Tick 1: a warm cluster fits; the job records it in status, then claims it. The claim
    # fails (another job took it and it is gone: 404), so status names it, reused, unclaimed.
    await reconcile(created, warm_cluster_for(created))
    assert clusters_recorded(api, "demo") == [("warm-ray", True)]

    # Tick 2 runs on the copy the watch had before tick 1's write (the pool is empty now). Its
    # decision (start over: create demo-ray) is refused; the one made on the job as stored
    # gives up the lost claim and creates the job's own cluster.
    decision, posted = await reconcile(created)
    assert decision is not None
    # (it used to store ("demo-ray", True): the job's own new cluster, marked as claimed)
    assert clusters_recorded(api, "demo") == [("warm-ray", True), ("demo-ray", False)]
    assert [c["metadata"]["name"] for c in api.live(RAYCLUSTERS)] == ["demo-ray"]
    assert posted.count(names.CLUSTER_CREATED) == 1


async def test_a_stale_copy_repeats_no_transition(api: RLHFEmulator) -> None:
    """The same copy reconciled twice (the watch has not delivered the first write yet): the
    second run neither announces the start again nor starts it over."""
    kube.configure()
    created = await create_job(api, sample_job("twice"))
    _, first = await reconcile(created)
    assert names.CLUSTER_CREATED in first
    started = api.get(JOBS, NS, "twice")["status"]["startTime"]

    _, again = await reconcile(created)
    assert again == []
    assert api.get(JOBS, NS, "twice")["status"]["startTime"] == started
    assert [c["metadata"]["name"] for c in api.live(RAYCLUSTERS)] == ["twice-ray"]


async def test_a_write_by_someone_else_costs_no_tick(api: RLHFEmulator) -> None:
    """kopf's own bookkeeping (finalizer, annotations) lands between the watch's copy and the
    first reconcile: the job still starts in that reconcile."""
    kube.configure()
    created = await create_job(api, sample_job("quick"))
    annotate = {"metadata": {"annotations": {"kopf.zalando.org/touched": "yes"}}}
    merge = {"Content-Type": "application/merge-patch+json"}
    async with api.patch(job_url(NS, "quick"), json=annotate, headers=merge) as resp:
        assert resp.status == 200

    decision, posted = await reconcile(created)
    assert decision is not None
    assert api.get(JOBS, NS, "quick")["status"]["phase"] == "Provisioning"
    assert [c["metadata"]["name"] for c in api.live(RAYCLUSTERS)] == ["quick-ray"]
    assert names.CLUSTER_CREATED in posted


async def test_a_job_deleted_meanwhile_is_left_alone(api: RLHFEmulator) -> None:
    kube.configure()
    created = await create_job(api, sample_job("gone"))
    async with api.delete(job_url(NS, "gone")) as resp:
        assert resp.status == 200

    decision, posted = await reconcile(created)
    assert (decision, posted, api.live(RAYCLUSTERS)) == (None, [], [])
