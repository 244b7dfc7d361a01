"""The test Kubernetes and KubeRay are no kinder than the real ones: the API server refuses edits
of immutable fields, the garbage collector is late, KubeRay's finalizer holds a deleted RayJob
until it stopped the Ray job, and KubeRay refuses a RayJob its validation rejects."""

from __future__ import annotations

from typing import Any

from kube_sim import (
    HANG,
    JOBS,
    MERGE_PATCH,
    RAYCLUSTERS,
    RAYJOB_FINALIZER,
    RAYJOBS,
    GarbageCollector,
    RLHFEmulator,
    SimulatedKubeRay,
    always,
    create_job,
    eventually,
    job_url,
    sample_job,
)
from rlhf_operator import names

NS = "ns"
BASE = f"/apis/{names.RAY_API_VERSION}/namespaces/{NS}"


async def _post(api: RLHFEmulator, plural: str, body: dict[str, Any]) -> dict[str, Any]:
    async with api.post(f"{BASE}/{plural}", json=body) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


def _child(kind: str, name: str, owner: dict[str, Any] | None = None, **spec: Any) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                    "name": owner["metadata"]["name"],
                                    "uid": owner["metadata"]["uid"]}]  # fmt: skip
    return {"apiVersion": names.RAY_API_VERSION, "kind": kind, "metadata": meta, "spec": spec}


async def test_immutable_fields_are_refused_and_mutable_ones_are_not(api: RLHFEmulator) -> None:
    await create_job(api, sample_job("frozen"))
    for field, value in (("storage", {"uri": "s3://elsewhere"}), ("model", {"base": "gpt2-xl"}),
                         ("parallelism", {"zeroStage": 3})):  # fmt: skip
        patch = {"spec": {field: value}}
        async with api.patch(job_url(NS, "frozen"), json=patch, headers=MERGE_PATCH) as resp:
            assert resp.status == 422, field
            assert f"spec.{field} is immutable" in (await resp.json())["message"]
    patch = {"spec": {"runPolicy": {"suspend": True}}}
    async with api.patch(job_url(NS, "frozen"), json=patch, headers=MERGE_PATCH) as resp:
        assert resp.status == 200
    assert api.get(JOBS, NS, "frozen")["spec"]["storage"]["uri"] == "s3://bucket/rlhf"


async def test_the_garbage_collector_is_late_and_goes_by_uid(api: RLHFEmulator) -> None:
    owner = await _post(api, "rayclusters", _child("RayCluster", "owner"))
    child = await _post(api, "rayjobs", _child("RayJob", "child", owner))
    async with GarbageCollector(api, delay=0.5, tick=0.05):
        async with api.delete(f"{BASE}/rayclusters/owner") as resp:
            assert resp.status < 300
        # a new owner of the same name is not the old one: the child is still an orphan
        await _post(api, "rayclusters", _child("RayCluster", "owner"))
        assert api.get(RAYJOBS, NS, "child")["metadata"]["uid"] == child["metadata"]["uid"]
        await eventually(lambda: api.get(RAYJOBS, NS, "child") is None)
    assert api.get(RAYCLUSTERS, NS, "owner") is not None


async def test_a_deleted_rayjob_lingers_until_kuberay_stopped_its_ray_job(
    api: RLHFEmulator,
) -> None:
    cluster = _child("RayCluster", "c", workerGroupSpecs=[{"groupName": "w", "replicas": 1}])
    await _post(api, "rayclusters", cluster)
    spec = {"clusterSelector": {names.LABEL_RAY_CLUSTER: "c"}, "entrypoint": "python train.py"}
    rayjob = await _post(api, "rayjobs", _child("RayJob", "rj", **spec))
    async with SimulatedKubeRay(api, always(HANG), stop_after=5) as kuberay:
        running = lambda: (api.get(RAYJOBS, NS, "rj").get("status") or {}).get(  # noqa: E731
            "jobStatus") == "RUNNING"  # fmt: skip
        await eventually(running)
        assert RAYJOB_FINALIZER in api.get(RAYJOBS, NS, "rj")["metadata"]["finalizers"]
        assert kuberay.drivers(NS, "c") == [rayjob["metadata"]["uid"]]
        async with api.delete(f"{BASE}/rayjobs/rj") as resp:
            assert resp.status < 300
        assert api.get(RAYJOBS, NS, "rj")["metadata"]["deletionTimestamp"]  # still there
        await eventually(lambda: api.get(RAYJOBS, NS, "rj") is None)
        assert kuberay.runs[rayjob["metadata"]["uid"]].status == "STOPPED"
        assert kuberay.drivers(NS, "c") == []


async def test_kuberay_refuses_an_invalid_rayjob_without_a_finalizer(api: RLHFEmulator) -> None:
    async with SimulatedKubeRay(api):
        await _post(api, "rayjobs", _child("RayJob", "nowhere", entrypoint="x"))
        status = lambda: api.get(RAYJOBS, NS, "nowhere").get("status") or {}  # noqa: E731
        await eventually(lambda: status().get("jobDeploymentStatus") == "ValidationFailed")
        assert status()["message"] == (
            "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set"
        )
        assert not api.get(RAYJOBS, NS, "nowhere")["metadata"].get("finalizers")
