"""The operator under what real KubeRay and Kubernetes do, that a kind test double would not:
RayJobs that linger behind KubeRay's finalizer and the late garbage collector, a submitter that
gives up while its Ray job runs on, RayJobs KubeRay refuses, clusters that never get ready.

Each test fails on an operator that trusts names, retries beside a running driver, waits
forever, or says nothing about why (see the notes on each).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from kube_sim import (
    HANG,
    JOBS,
    MERGE_PATCH,
    NO_GPUS,
    PODS,
    RAYCLUSTERS,
    RAYJOBS,
    SUBMITTER_GAVE_UP,
    SUCCEED,
    GarbageCollector,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    delete_job,
    eventually,
    image_not_found,
    job_url,
    missing_service_account,
    sample_job,
    stage_of,
)
from rlhf_operator import names

NS = "ns"
SFT_REWARD = {"ppo": {"enabled": False}, "evaluation": {"enabled": False}}


def status(api: RLHFEmulator, name: str) -> dict[str, Any]:
    return (api.get(JOBS, NS, name) or {}).get("status") or {}


def condition(api: RLHFEmulator, name: str, type_: str) -> dict[str, Any]:
    return next((c for c in status(api, name).get("conditions", []) if c["type"] == type_), {})


def phase_is(api: RLHFEmulator, name: str, phase: str):
    return lambda: status(api, name).get("phase") == phase


def owner(obj: dict[str, Any]) -> str:
    return obj["metadata"]["ownerReferences"][0]["uid"]


async def rewind_wait(api: RLHFEmulator, name: str, patch: dict[str, Any]) -> None:
    """Move a recorded wait start back in time (the status subresource, as a clock would):
    provisionTimeoutSeconds is at least 60 s, which a test does not sleep through."""
    url = job_url(NS, name) + "/status"
    async with api.patch(url, json={"status": patch}, headers=MERGE_PATCH) as resp:
        assert resp.status == 200, await resp.text()


def long_ago() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_reapplied_job_never_adopts_its_predecessors_rayjob(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, gc: GarbageCollector, operator: OperatorRunner
) -> None:
    # `kubectl delete` + `kubectl apply` of the same name while the first job's finished
    # "redo-sft-1" still exists (the garbage collector is late). An operator that goes by
    # names would take its SUCCEEDED status for the new job's SFT and skip training.
    kuberay.plan = lambda rj: HANG if stage_of(rj)[0] == "reward" else SUCCEED
    first = await create_job(api, sample_job("redo", stages=SFT_REWARD))
    await eventually(lambda: (api.get(RAYJOBS, NS, "redo-reward-1") or {}).get("status"))
    gc.paused = True
    await delete_job(api, NS, "redo")
    await eventually(lambda: api.get(JOBS, NS, "redo") is None)
    old = api.get(RAYJOBS, NS, "redo-sft-1")
    assert owner(old) == first["metadata"]["uid"] and old["status"]["jobStatus"] == "SUCCEEDED"

    kuberay.plan = lambda rj: SUCCEED
    second = await create_job(api, sample_job("redo", stages=SFT_REWARD))
    await eventually(lambda: "Waiting for RayJob redo-sft-1 to go" in status(api, "redo").get(
        "message", ""))  # fmt: skip
    # what `kubectl get rlhf` / describe show: the object in the way and what to do about it
    message = status(api, "redo")["message"]
    assert first["metadata"]["uid"] in message and "kubectl delete rayjob redo-sft-1" in message
    assert status(api, "redo")["stages"]["sft"]["state"] == "Running"  # not adopted, not skipped
    await eventually(lambda: names.RAYJOB_CONFLICT in api.reasons_for("redo"))
    assert api.get(RAYJOBS, NS, "redo-sft-1")["metadata"]["uid"] == old["metadata"]["uid"]
    assert not api.get(RAYJOBS, NS, "redo-sft-1")["metadata"].get("deletionTimestamp")  # not ours

    gc.paused = False  # the collector removes the first job's children; the new job goes on
    await eventually(phase_is(api, "redo", "Succeeded"))
    for stage in ("sft", "reward"):
        rayjob = api.get(RAYJOBS, NS, f"redo-{stage}-1")
        assert owner(rayjob) == second["metadata"]["uid"]
    assert kuberay.submitted.count("redo-sft-1") == 2  # trained again, for the new job


async def test_a_submitter_that_gives_up_never_gets_a_second_driver_beside_the_first(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    # KubeRay marks the RayJob Failed/SubmissionFailed while its Ray job still RUNS. A retry
    # started at once would run two drivers on the same GPUs and checkpoint directory.
    kuberay.plan = lambda rj: SUBMITTER_GAVE_UP if stage_of(rj) == ("sft", 1) else SUCCEED
    await create_job(api, sample_job("twice", stages=SFT_REWARD))
    await eventually(phase_is(api, "twice", "Succeeded"))

    assert kuberay.peak_drivers[(NS, "twice-ray")] == 1
    first = next(uid for uid, run in kuberay.runs.items() if run.cluster == (NS, "twice-ray"))
    assert kuberay.runs[first].status == "STOPPED"  # stopped through KubeRay's finalizer
    sft = status(api, "twice")["stages"]["sft"]
    assert (sft["attempts"], sft["failures"]) == (2, 1)
    retried = lambda: [e["message"] for e in api.events_for("twice")  # noqa: E731
                       if e["reason"] == names.STAGE_RETRIED]  # fmt: skip
    await eventually(retried)
    assert "SubmissionFailed" in retried()[0]
    assert kuberay.submitted[:2] == ["twice-sft-1", "twice-sft-2"]


async def test_a_rayjob_kuberay_refuses_fails_the_job_with_kuberays_message(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    refusal = "The RayJob spec is invalid: submitterPodTemplate is not allowed by this KubeRay"
    kuberay.reject = lambda rj: refusal if stage_of(rj)[0] == "reward" else None
    await create_job(api, sample_job("strict", stages=SFT_REWARD))  # backoffLimit 1
    await eventually(phase_is(api, "strict", "Failed"))

    message = status(api, "strict")["message"]
    assert refusal in message and "ValidationFailed" in message
    assert condition(api, "strict", "Failed")["reason"] == names.STAGE_FAILED
    reward = status(api, "strict")["stages"]["reward"]
    assert (reward["state"], reward["attempts"]) == ("Failed", 1)  # terminal: never retried
    assert "strict-reward-2" not in [r["metadata"]["name"] for r in api.live(RAYJOBS)]
    await eventually(lambda: not api.live(RAYCLUSTERS))  # released


async def test_a_cluster_without_gpus_says_why_then_fails_at_its_deadline_and_is_freed(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    # The head (no GPU) runs; the GPU workers never schedule. KubeRay's own conditions only
    # say "provisioning": the reason is in the pods and the scheduler's Events.
    kuberay.provisioning = lambda cluster: NO_GPUS
    gpus = {"workers": {"replicas": 2, "gpusPerWorker": 1}, "provisionTimeoutSeconds": 60}
    await create_job(api, sample_job("starved", cluster=gpus))
    waiting = lambda: "Insufficient nvidia.com/gpu" in condition(  # noqa: E731
        api, "starved", "ClusterReady").get("message", "")  # fmt: skip
    await eventually(waiting)
    ready = condition(api, "starved", "ClusterReady")
    assert ready["status"] == "False" and "FailedScheduling" in ready["message"]
    assert "starved-ray-workers-worker-" in ready["message"]  # names a pod to look at
    assert status(api, "starved")["phase"] == "Provisioning"
    assert "Insufficient nvidia.com/gpu" in status(api, "starved")["message"]  # kubectl get

    await rewind_wait(api, "starved", {"cluster": {"waitingSince": long_ago()}})
    await eventually(phase_is(api, "starved", "Failed"))
    failed = condition(api, "starved", "Failed")
    assert failed["reason"] == names.PROVISION_TIMEOUT
    assert "provisionTimeoutSeconds (60s)" in failed["message"]
    assert "Insufficient nvidia.com/gpu" in failed["message"]
    await eventually(lambda: not api.live(RAYCLUSTERS))  # what was scheduled is freed
    await eventually(lambda: not api.live(PODS))  # (its pods by the garbage collector)
    assert not api.live(RAYJOBS)


async def test_an_image_that_cannot_be_pulled_is_named_while_the_job_waits(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    image = "registry.example/trainer:typo"
    kuberay.provisioning = lambda cluster: image_not_found(image)
    await create_job(api, sample_job("pull", cluster={"image": image}))
    message = lambda: condition(api, "pull", "ClusterReady").get("message", "")  # noqa: E731
    # KubeRay's HeadPodReady says "ContainersNotReady"; the kubelet's Event says why
    await eventually(lambda: "ContainersNotReady" in message() and "(and 2 more)" in message())
    assert "pod pull-ray-head-" in message()
    assert f'Failed to pull image "{image}": rpc error: code = NotFound' in message()


async def test_a_missing_service_account_is_named_from_kuberays_replica_failure(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.provisioning = lambda cluster: missing_service_account(NS, "trainer")
    await create_job(api, sample_job("nosa", cluster={"serviceAccountName": "trainer"}))
    message = lambda: condition(api, "nosa", "ClusterReady").get("message", "")  # noqa: E731
    await eventually(lambda: "ReplicaFailure: FailedCreateHeadPod" in message())
    assert 'serviceaccount "trainer" not found' in message()
    assert not api.live(PODS)  # the API server refused the pods: nothing else to read


async def test_a_foreign_rayjob_at_our_name_is_waited_for_only_until_the_deadline(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, gc: GarbageCollector, operator: OperatorRunner
) -> None:
    # A RayJob at "stuck-sft-1" that is not ours and does not go (e.g. someone else's, or a
    # finalizer that never finishes): never adopted nor deleted, and not waited for forever.
    foreign = {
        "apiVersion": names.RAY_API_VERSION,
        "kind": names.RAYJOB_KIND,
        "metadata": {"name": "stuck-sft-1", "namespace": NS},
        "spec": {"clusterSelector": {names.LABEL_RAY_CLUSTER: "elsewhere"}, "entrypoint": "x"},
    }
    async with api.post(f"/apis/ray.io/v1/namespaces/{NS}/rayjobs", json=foreign) as resp:
        assert resp.status < 300, await resp.text()
    await create_job(api, sample_job("stuck", cluster={"provisionTimeoutSeconds": 60}))
    await eventually(lambda: status(api, "stuck").get("stages", {}).get("sft", {}).get(
        "waitingSince"))  # fmt: skip

    await rewind_wait(api, "stuck", {"stages": {"sft": {"waitingSince": long_ago()}}})
    await eventually(phase_is(api, "stuck", "Failed"))
    failed = condition(api, "stuck", "Failed")
    assert failed["reason"] == names.RAYJOB_CONFLICT
    assert "RayJob stuck-sft-1" in failed["message"]
    assert "kubectl delete rayjob stuck-sft-1 -n ns" in failed["message"]
    assert api.get(RAYJOBS, NS, "stuck-sft-1") is not None  # still not ours to delete
    await eventually(lambda: not api.live(RAYCLUSTERS))
