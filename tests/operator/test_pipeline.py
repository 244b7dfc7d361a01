"""The real operator (kopf) against the emulated API server and a simulated KubeRay.

Each test creates RLHFJobs the way `kubectl apply` would and asserts what a user sees: phase,
conditions, Events, and which RayClusters/RayJobs exist or ever existed.
"""

from __future__ import annotations

import asyncio
import json
import shlex
from typing import Any

import kmock
from kube_sim import (
    BAD_INPUT,
    FAIL,
    HANG,
    JOBS,
    MERGE_PATCH,
    PROGRESSES,
    RAYCLUSTERS,
    RAYJOBS,
    SUCCEED,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    delete_job,
    eventually,
    job_url,
    patch_job,
    sample_job,
    stage_of,
)
from rlhf_operator import names
from rlhf_operator.api import PLURAL as JOBS_PLURAL

NS = "ns"
STAGES = ("sft", "reward", "ppo", "evaluation")


def status(api: RLHFEmulator, name: str) -> dict[str, Any]:
    return (api.get(JOBS, NS, name) or {}).get("status") or {}


def phase_is(api: RLHFEmulator, name: str, phase: str):
    return lambda: status(api, name).get("phase") == phase


def conditions(api: RLHFEmulator, name: str) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status(api, name).get("conditions", [])}


def ever_existed(api: RLHFEmulator, resource: str) -> list[str]:
    """Names of every object of `resource` that was ever created (deleted ones too)."""
    wanted = kmock.resource(resource)
    return sorted(name for (res, _, name) in api.objects if res == wanted)


def entrypoint(api: RLHFEmulator, rayjob: str) -> list[str]:
    return shlex.split(api.get(RAYJOBS, NS, rayjob)["spec"]["entrypoint"])


def running(api: RLHFEmulator, rayjob: str):
    return lambda: (
        ((api.get(RAYJOBS, NS, rayjob) or {}).get("status") or {}).get("jobStatus") == "RUNNING"
    )


async def test_happy_path_runs_all_four_stages_on_one_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, sample_job("happy"))
    await eventually(phase_is(api, "happy", "Succeeded"))

    assert kuberay.submitted == [f"happy-{stage}-1" for stage in STAGES]
    assert ever_existed(api, RAYCLUSTERS) == ["happy-ray"]
    # Ray token auth on the cluster, and a NetworkPolicy owned by it (deleted with it).
    created = api.objects[kmock.resource(RAYCLUSTERS), NS, "happy-ray"].history[0]
    assert created["spec"]["authOptions"] == {"mode": "token"}
    policy = api.get("networking.k8s.io/v1/networkpolicies", NS, "happy-ray")
    assert policy is not None, "the cluster's NetworkPolicy was not created"
    (owner,) = policy["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"]) == ("RayCluster", created["metadata"]["uid"])
    for stage in STAGES:
        spec = api.get(RAYJOBS, NS, f"happy-{stage}-1")["spec"]
        assert spec["clusterSelector"] == {names.LABEL_RAY_CLUSTER: "happy-ray"}
        assert "backoffLimit" not in spec
    await eventually(lambda: not api.live(RAYCLUSTERS))  # released at the end

    job = status(api, "happy")
    assert job["observedGeneration"] == 1
    assert {s: job["stages"][s]["state"] for s in STAGES} == dict.fromkeys(STAGES, "Succeeded")
    assert job["stages"]["ppo"]["artifact"] == "s3://bucket/rlhf/happy/ppo"
    conds = conditions(api, "happy")
    assert conds["Valid"][0] == conds["Succeeded"][0] == conds["SftComplete"][0] == "True"
    assert conds["Failed"][0] == "False"
    await eventually(lambda: "ClusterDeleted" in api.reasons_for("happy"))
    reasons = api.reasons_for("happy")
    for reason in ("ClusterCreated", "ClusterReady", "StageSucceeded", "JobSucceeded"):
        assert reason in reasons
    assert reasons.count("StageStarted") == 4
    # the job's spec is pinned at start; kopf keeps its state in annotations, not in status
    annotations = api.get(JOBS, NS, "happy")["metadata"]["annotations"]
    assert names.ANNOTATION_PINNED_SPEC in annotations
    assert "kopf" not in job


async def test_a_stage_that_fails_once_is_retried_from_its_checkpoint(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: FAIL if stage_of(rj) == ("ppo", 1) else SUCCEED
    # keepAttempts 2: attempt 1's RayJob stays (with 1 it is pruned once attempt 2 runs)
    await create_job(api, sample_job("flaky", runPolicy={"backoffLimit": 1, "keepAttempts": 2}))
    await eventually(phase_is(api, "flaky", "Succeeded"))

    assert "flaky-ppo-1" in kuberay.submitted and "flaky-ppo-2" in kuberay.submitted
    args = entrypoint(api, "flaky-ppo-2")
    assert args[args.index("--attempt") + 1] == "2"
    assert args[args.index("--resume-from") + 1] == "s3://bucket/rlhf/flaky/ppo/checkpoints"
    assert "--resume-from" not in entrypoint(api, "flaky-ppo-1")
    ppo = status(api, "flaky")["stages"]["ppo"]
    assert (ppo["attempts"], ppo["failures"], ppo["state"]) == (2, 1, "Succeeded")
    # Events are posted in order, after the status write: once the last one is in, all are.
    await eventually(lambda: "JobSucceeded" in api.reasons_for("flaky"))
    assert api.reasons_for("flaky").count("StageRetried") == 1
    assert ever_existed(api, RAYCLUSTERS) == ["flaky-ray"]


async def test_a_stage_that_exhausts_its_retries_fails_the_job_with_the_reason(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: FAIL if stage_of(rj)[0] == "sft" else SUCCEED
    await create_job(api, sample_job("doomed"))  # backoffLimit 1: two attempts
    await eventually(phase_is(api, "doomed", "Failed"))

    job = status(api, "doomed")
    assert "Stage sft failed after 2 attempt(s)" in job["message"]
    assert "CUDA out of memory" in job["message"]
    assert conditions(api, "doomed")["Failed"] == ("True", "StageFailed")
    assert conditions(api, "doomed")["SftComplete"][0] == "False"
    assert kuberay.submitted == ["doomed-sft-1", "doomed-sft-2"]  # no later stage ran
    await eventually(lambda: not api.live(RAYCLUSTERS))
    await eventually(lambda: "JobFailed" in api.reasons_for("doomed"))
    assert "StageFailed" in api.reasons_for("doomed")


async def test_a_stage_that_refuses_its_input_fails_the_job_at_once_naming_the_field(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    """Exit 2 (bad input, CONTRACTS §6) is not retried: a new attempt would read the same
    input and fail the same way, after paying for it again."""
    kuberay.plan = lambda rj: BAD_INPUT if stage_of(rj)[0] == "sft" else SUCCEED
    await create_job(api, sample_job("typo", runPolicy={"backoffLimit": 3}))
    await eventually(phase_is(api, "typo", "Failed"))

    job = status(api, "typo")
    assert "Stage sft failed after 1 attempt(s)" in job["message"]
    assert "error: spec.stages.sft.dataset.promptField: column 'prompt'" in job["message"]
    assert "not retried" in job["message"] and "re-create the RLHFJob" in job["message"]
    assert kuberay.submitted == ["typo-sft-1"]
    assert status(api, "typo")["stages"]["sft"]["failures"] == 1
    await eventually(lambda: "JobFailed" in api.reasons_for("typo"))
    assert "StageRetried" not in api.reasons_for("typo")


async def test_an_operator_restart_mid_stage_resumes_without_duplicates(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    finish_ppo = False
    kuberay.plan = lambda rj: HANG if stage_of(rj)[0] == "ppo" and not finish_ppo else SUCCEED
    await create_job(api, sample_job("phoenix"))
    await eventually(running(api, "phoenix-ppo-1"))

    await operator.stop()
    finish_ppo = True  # the stage ends while no operator watches
    await eventually(lambda: api.get(RAYJOBS, NS, "phoenix-ppo-1")["status"].get("jobStatus")
                     == "SUCCEEDED")  # fmt: skip
    await operator.start()
    await eventually(phase_is(api, "phoenix", "Succeeded"))

    assert ever_existed(api, RAYCLUSTERS) == ["phoenix-ray"]
    assert ever_existed(api, RAYJOBS) == sorted(f"phoenix-{s}-1" for s in STAGES)
    assert status(api, "phoenix")["stages"]["ppo"]["attempts"] == 1


async def test_an_operator_killed_right_after_creating_a_rayjob_creates_no_second_one(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    # The RayJob create lands, but the operator dies before it sees the answer.
    wire = api.tripwire(
        lambda r: r.action == kmock.action.CREATE and r.resource == kmock.resource(RAYJOBS),
        landed=True,
    )
    await create_job(api, sample_job("crash"))
    await eventually(wire.tripped.is_set)
    stopping = operator.stop()
    wire.release()
    await stopping
    await operator.start()
    await eventually(phase_is(api, "crash", "Succeeded"))

    assert ever_existed(api, RAYJOBS) == sorted(f"crash-{s}-1" for s in STAGES)
    assert ever_existed(api, RAYCLUSTERS) == ["crash-ray"]


async def test_deleting_a_running_job_stops_its_rayjob_and_deletes_its_cluster(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: HANG
    await create_job(api, sample_job("gone"))
    await eventually(running(api, "gone-sft-1"))
    assert names.FINALIZER in api.get(JOBS, NS, "gone")["metadata"]["finalizers"]

    uid = api.get(RAYJOBS, NS, "gone-sft-1")["metadata"]["uid"]
    await delete_job(api, NS, "gone")
    await eventually(lambda: api.get(JOBS, NS, "gone") is None)
    assert not api.live(RAYCLUSTERS)
    # KubeRay's finalizer stops the Ray job, then lets the RayJob go
    await eventually(lambda: not api.live(RAYJOBS))
    assert kuberay.runs[uid].status == "STOPPED"


async def test_an_invalid_spec_fails_with_a_message_and_creates_nothing(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, sample_job("local", storage={"uri": "/tmp/out", "secretRef": None}))
    await eventually(phase_is(api, "local", "Failed"))

    assert conditions(api, "local")["Valid"] == ("False", "InvalidSpec")
    message = status(api, "local")["message"]
    assert "spec.storage.uri" in message and "pvc://" in message
    # spec.storage is immutable (CRD rule): the message says what to do instead of an edit
    assert "delete it and apply the corrected manifest again" in message
    await eventually(lambda: "InvalidSpec" in api.reasons_for("local"))
    warning = next(e for e in api.events_for("local") if e["reason"] == "InvalidSpec")
    assert warning["type"] == "Warning" and "pvc://" in warning["message"]
    assert ever_existed(api, RAYCLUSTERS) == ever_existed(api, RAYJOBS) == []

    # ... and the API server refuses the edit, as it would on a real cluster
    fix = {"spec": {"storage": {"uri": "s3://bucket/x"}}}
    async with api.patch(job_url(NS, "local"), json=fix, headers=MERGE_PATCH) as resp:
        assert resp.status == 422
        assert "spec.storage is immutable" in (await resp.json())["message"]


async def test_an_invalid_spec_fixed_by_an_edit_starts_the_job(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    bad = [{"key": "gpu", "operator": "Exists", "value": "a100"}]
    await create_job(api, sample_job("typo", cluster={"workers": {"tolerations": bad}}))
    await eventually(phase_is(api, "typo", "Failed"))
    assert "spec.cluster.workers.tolerations[0].value" in status(api, "typo")["message"]

    good = [{"key": "gpu", "operator": "Exists"}]
    await patch_job(api, NS, "typo", {"spec": {"cluster": {"workers": {"tolerations": good}}}})
    await eventually(phase_is(api, "typo", "Succeeded"))
    pinned = api.get(JOBS, NS, "typo")["metadata"]["annotations"][names.ANNOTATION_PINNED_SPEC]
    assert json.loads(pinned)["cluster"]["workers"]["tolerations"] == good  # re-pinned


async def test_suspend_releases_everything_and_resume_continues_the_stage(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: HANG if stage_of(rj) == ("reward", 1) else SUCCEED
    await create_job(api, sample_job("nap"))
    await eventually(running(api, "nap-reward-1"))

    await patch_job(api, NS, "nap", {"spec": {"runPolicy": {"suspend": True}}})
    await eventually(phase_is(api, "nap", "Suspended"))
    gone = lambda: not api.live(RAYCLUSTERS) and api.get(RAYJOBS, NS, "nap-reward-1") is None  # noqa: E731
    await eventually(gone)  # the running stage stopped, the cluster released
    assert status(api, "nap")["stages"]["sft"]["state"] == "Succeeded"

    await patch_job(api, NS, "nap", {"spec": {"runPolicy": {"suspend": False}}})
    await eventually(phase_is(api, "nap", "Succeeded"))
    reward = status(api, "nap")["stages"]["reward"]
    assert (reward["attempts"], reward["failures"]) == (2, 0)  # a resume is not a failure
    assert "--resume-from" in entrypoint(api, "nap-reward-2")
    assert "nap-sft-2" not in kuberay.submitted  # finished stages do not rerun
    await eventually(lambda: "JobSucceeded" in api.reasons_for("nap"))
    reasons = api.reasons_for("nap")
    assert "JobSuspended" in reasons and "JobResumed" in reasons


async def test_active_deadline_fails_the_job_and_stops_its_rayjob(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: HANG
    await create_job(api, sample_job("late", runPolicy={"activeDeadlineSeconds": 2}))
    await eventually(phase_is(api, "late", "Failed"))

    assert conditions(api, "late")["Failed"] == ("True", "DeadlineExceeded")
    assert "activeDeadlineSeconds" in status(api, "late")["message"]
    await eventually(lambda: not api.live(RAYJOBS) and not api.live(RAYCLUSTERS))


async def test_a_finished_job_is_deleted_after_its_ttl(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    await create_job(api, sample_job("brief", runPolicy={"ttlSecondsAfterFinished": 1}))
    await eventually(lambda: api.get(JOBS, NS, "brief") is None)
    assert ever_existed(api, RAYJOBS) == sorted(f"brief-{s}-1" for s in STAGES)


async def test_stage_changes_after_start_are_ignored_with_a_warning(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    kuberay.plan = lambda rj: HANG if stage_of(rj)[0] == "sft" else SUCCEED
    await create_job(api, sample_job("steady"))
    await eventually(running(api, "steady-sft-1"))

    await patch_job(api, NS, "steady", {"spec": {"stages": {"ppo": {"steps": 7}}}})
    await eventually(lambda: "SpecChangeIgnored" in api.reasons_for("steady"))
    kuberay.plan = lambda rj: SUCCEED
    await eventually(phase_is(api, "steady", "Succeeded"))
    args = entrypoint(api, "steady-ppo-1")
    assert '"steps":100' in args[args.index("--job") + 1]  # the spec it started with
    assert status(api, "steady")["observedGeneration"] == 2


async def test_the_trainers_report_reaches_the_job_through_its_progress_object(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, operator: OperatorRunner
) -> None:
    """The trainer (its real sink) writes only the job's RLHFJobProgress; the operator mirrors
    the numbers into the RLHFJob, columns included, and nothing the report says steers it."""
    from kubernetes import client
    from rlhf_trainer.progress import ProgressReporter
    from rlhf_trainer.status_sink import KubernetesStatusSink

    kuberay.plan = lambda rj: HANG if stage_of(rj)[0] == "sft" else SUCCEED
    await create_job(api, sample_job("tracked"))
    await eventually(running(api, "tracked-sft-1"))
    progress = await eventually(lambda: api.get(PROGRESSES, NS, "tracked"))
    assert progress["metadata"]["ownerReferences"][0]["name"] == "tracked"

    configuration = client.Configuration(host=str(api.url).rstrip("/"))
    sink = KubernetesStatusSink("tracked", NS, "sft", api_client=client.ApiClient(configuration))
    reporter = ProgressReporter("sft", 10, [sink], interval_s=0)
    await asyncio.to_thread(reporter.update, 4, {"loss": 1.5})
    await eventually(lambda: status(api, "tracked").get("progress") == "sft 1/4 40%")
    sft = status(api, "tracked")["stages"]["sft"]
    assert sft["metrics"] == {"loss": 1.5} and sft["progress"]["step"] == 4
    assert status(api, "tracked")["phase"] == "Running"
    # The only rlhf.dev writes besides the operator's own to RLHFJobs: the trainer's report.
    patched = [r for r in api if r.method.value == "PATCH" and r.resource is not None]
    ours = {(r.resource.plural, r.subresource) for r in patched if r.resource.group == "rlhf.dev"}
    assert ours - {(JOBS_PLURAL, None), (JOBS_PLURAL, "status")} == {
        ("rlhfjobprogresses", "status")
    }
