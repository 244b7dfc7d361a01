"""A reconcile decided on a stale copy of the job lands nothing.

kopf hands the timer the job as its watch last saw it; under load that copy can predate the
operator's own last status write. The status patch is a diff against the status that was read,
so merged onto the newer one it used to leave a mix of both: seen in CI as a job running on its
own new cluster with `status.cluster.reused: true` (the claim of a warm cluster, recorded a
tick earlier, and the stale tick's "create my own" merged together). Each reconcile here is
the operator's real one (`driver.reconcile_job`, as the kopf timer calls it) against the
emulated API server, which refuses a write whose resourceVersion is stale, as the real one does.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from kube_sim import JOBS, RAYCLUSTERS, RLHFEmulator, create_job, sample_job
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
    )
    return {(NS, signature): (warm,)}


async def test_a_decision_on_a_stale_copy_of_the_job_writes_and_creates_nothing(
    api: RLHFEmulator,
) -> None:
    kube.configure()  # $KUBECONFIG points at the emulator (conftest)
    created = await create_job(api, sample_job("demo", warmPool={"keepAliveSeconds": 300}))

    # Tick 1: a warm cluster fits; the job records it in status, then claims it. The claim
    # fails (another job took it and it is gone: 404), so status names it, reused, unclaimed.
    await reconcile(created, warm_cluster_for(created))
    after_claim = copy.deepcopy(api.get(JOBS, NS, "demo"))
    assert after_claim["status"]["cluster"] == {
        "name": "warm-ray",
        "reused": True,
        "dashboardURL": "http://warm-ray-head-svc.ns.svc:8265",
    }

    # Tick 2 runs on the copy the watch had before tick 1's write (the pool is empty now).
    decision, posted = await reconcile(created)
    # (it used to write {name: demo-ray, reused: true}: its own cluster, marked as claimed)
    assert api.get(JOBS, NS, "demo")["status"]["cluster"] == after_claim["status"]["cluster"]
    assert api.get(JOBS, NS, "demo") == after_claim  # not a byte written
    assert api.live(RAYCLUSTERS) == []
    assert posted == []
    assert decision is None  # decided on an old copy: dropped, not an error

    # Tick 3 runs on the current job: it gives up the lost claim and creates its own cluster.
    decision, posted = await reconcile(copy.deepcopy(api.get(JOBS, NS, "demo")))
    assert decision is not None
    assert api.get(JOBS, NS, "demo")["status"]["cluster"] == {
        "name": "demo-ray",
        "reused": False,
        "dashboardURL": "http://demo-ray-head-svc.ns.svc:8265",
    }
    assert [c["metadata"]["name"] for c in api.live(RAYCLUSTERS)] == ["demo-ray"]
    assert posted.count(names.CLUSTER_CREATED) == 1


async def test_a_stale_copy_repeats_no_transition(api: RLHFEmulator) -> None:
    """The same copy reconciled twice (the watch has not delivered the first write yet): the
    second run does not announce the start again nor touch the job."""
    kube.configure()
    created = await create_job(api, sample_job("twice"))
    _, first = await reconcile(created)
    assert names.CLUSTER_CREATED in first
    written = copy.deepcopy(api.get(JOBS, NS, "twice"))

    decision, again = await reconcile(created)
    assert again == []
    assert api.get(JOBS, NS, "twice") == written
    assert decision is None
