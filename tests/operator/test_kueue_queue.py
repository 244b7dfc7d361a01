"""A job whose RayCluster waits in a Kueue LocalQueue: Queued (with why) until admitted.

Kueue is stood in for by what it does to a RayCluster (kueue.sigs.k8s.io/docs/tasks/run/
rayclusters): its mutating webhook sets spec.suspend on a cluster labelled with a
kueue.x-k8s.io/queue-name at creation, and admission un-suspends it. The simulated KubeRay
creates no pods for a suspended cluster (it never becomes ready), as KubeRay.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import kmock
import pytest
from kmock._internal import rendering
from kube_sim import (
    JOBS,
    MERGE_PATCH,
    RAYCLUSTERS,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    eventually,
    sample_job,
    write_kubeconfig,
)
from rlhf_operator import names

NS = "ns"


@attrs.define(kw_only=True)
class KueueWebhookEmulator(RLHFEmulator):
    """The API server with Kueue's RayCluster webhook: a queued cluster is created suspended."""

    async def _handle_semantics(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        if (
            request.action == kmock.action.CREATE
            and request.resource == kmock.resource(RAYCLUSTERS)
            and isinstance(data, dict)
            and names.LABEL_KUEUE_QUEUE in ((data.get("metadata") or {}).get("labels") or {})
        ):
            data = {**data, "spec": {**data["spec"], "suspend": True}}
            object.__setattr__(request, "data", data)
        return await super()._handle_semantics(request)


@pytest.fixture()
async def api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RLHFEmulator]:
    async with KueueWebhookEmulator() as emulator, kmock.Server(emulator) as server:
        write_kubeconfig(str(server.url).rstrip("/"), Path(os.environ["KUBECONFIG"]))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield emulator
        emulator.release_all()


def status(api: RLHFEmulator, name: str) -> dict[str, Any]:
    return (api.get(JOBS, NS, name) or {}).get("status") or {}


async def admit(api: RLHFEmulator, cluster: str) -> None:
    """What Kueue does once the ClusterQueue has quota for the whole gang."""
    url = f"/apis/ray.io/v1/namespaces/{NS}/rayclusters/{cluster}"
    async with api.patch(url, json={"spec": {"suspend": False}}, headers=MERGE_PATCH) as resp:
        assert resp.status < 300, await resp.text()


async def test_a_queued_job_waits_for_kueue_then_runs(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: Any
) -> None:
    manifest = sample_job("queued", cluster={"queueName": "team-a"})
    await create_job(api, manifest)
    await eventually(lambda: status(api, "queued").get("phase") == "Queued")
    st = status(api, "queued")
    assert "LocalQueue team-a" in st["message"] and st["progress"] == "queue team-a"
    cluster = api.get(RAYCLUSTERS, NS, "queued-ray")
    assert cluster["metadata"]["labels"][names.LABEL_KUEUE_QUEUE] == "team-a"
    assert not kuberay.submitted  # nothing runs while Kueue holds the cluster
    await eventually(lambda: "Queued" in api.reasons_for("queued"))  # Events are posted async

    await admit(api, "queued-ray")  # the cluster's change wakes the job: no timer involved
    await eventually(lambda: status(api, "queued").get("phase") == "Succeeded")
    await eventually(lambda: "Admitted" in api.reasons_for("queued"))
