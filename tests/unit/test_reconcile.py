"""The state machine, pure: given a job, its status and what its children look like, the next
status, actions and events. Each test is one transition a user would care about."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kube_sim import sample_job
from rlhf_operator import names
from rlhf_operator.api import RLHFJob, RLHFJobStatus
from rlhf_operator.reconcile import (
    ClusterObservation,
    CreateCluster,
    CreateRayJob,
    DeleteCluster,
    DeleteJob,
    DeleteRayJob,
    Observed,
    PinSpec,
    RayJobObservation,
    driver,
    kuberay,
    progress,
    reconcile,
    reject,
    status_patch,
)
from rlhf_operator.reconcile.kuberay import (
    MESSAGE_LIMIT,
    Outcome,
    cluster_ready,
    pod_problem,
    pods_to_explain,
    rayjob_outcome,
    shorten,
)
from rlhf_operator.reconcile.model import CreateProgress

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
UID = "uid-1"


def job(**spec: Any) -> RLHFJob:
    manifest = sample_job("demo", **spec)
    manifest["metadata"]["uid"] = UID
    return RLHFJob.from_manifest(manifest)


def ready_cluster(**kw: Any) -> ClusterObservation:
    kw = {"uid": "cluster-uid", "auth_mode": "token", **kw}
    return ClusterObservation(
        name="demo-ray", ready=True, state="ready", owner_uids=(UID,), job_label="demo", **kw
    )


def rayjob(name: str, job_status: str = "RUNNING", deployment: str = "Running", **kw: Any):
    """A RayJob of this job (owned by its uid) unless `owner_uids` says otherwise."""
    parts = name.split("-")  # demo-<stage>-<attempt>
    stage, attempt = (parts[1], int(parts[2])) if len(parts) == 3 else ("", 0)
    kw = {"owner_uids": (UID,), "stage": stage, "attempt": attempt, **kw}
    return RayJobObservation(name=name, job_status=job_status, deployment_status=deployment, **kw)


NOTHING = Observed()


def step(j: RLHFJob, status: RLHFJobStatus, observed: Observed = NOTHING, now=NOW, **kw):
    return reconcile(j, status, observed, now, generation=kw.pop("generation", 1), **kw)


def kinds(decision) -> list[str]:
    return [type(a).__name__ for a in decision.actions]


def reasons(decision) -> list[str]:
    return [e.reason for e in decision.events]


def running(stage: str = "sft", attempt: int = 1, **spec: Any) -> tuple[RLHFJob, RLHFJobStatus]:
    """A job whose `stage` runs its `attempt`, reached through the machine itself."""
    j = job(**spec)
    status = step(j, RLHFJobStatus(), pinned_spec="{}").status
    status = step(j, status, Observed(cluster=ready_cluster())).status
    for previous in j.spec.enabled_stages()[: j.spec.enabled_stages().index(stage)]:
        done = rayjob(f"demo-{previous}-1", "SUCCEEDED", "Complete")
        status = step(j, status, Observed(ready_cluster(), done)).status
    for n in range(1, attempt):
        failed = rayjob(f"demo-{stage}-{n}", "FAILED", "Failed", message="boom")
        status = step(j, status, Observed(ready_cluster(), failed)).status
    assert status.stages[stage].ray_job == f"demo-{stage}-{attempt}"
    return j, status


# --------------------------------------------------------------------------- start


def test_a_new_job_pins_its_spec_records_the_cluster_then_creates_it() -> None:
    d = step(job(), RLHFJobStatus(), pinned_spec='{"stages": {}}')
    assert kinds(d) == ["PinSpec", "CreateCluster"]  # the driver pins and writes status first
    assert d.status.phase == "Provisioning"
    assert d.status.cluster.name == "demo-ray"  # recorded before it exists
    assert d.actions[1].manifest["metadata"]["name"] == "demo-ray"
    assert d.status.stage == "sft"
    assert {s: st.state for s, st in d.status.stages.items()} == dict.fromkeys(
        ("sft", "reward", "ppo", "evaluation"), "Pending"
    )
    assert d.status.stages["ppo"].artifact == "s3://bucket/rlhf/demo/ppo"
    assert "ClusterCreated" in reasons(d)
    valid = next(c for c in d.status.conditions if c.type == "Valid")
    assert valid.status == "True"


def test_disabled_stages_are_skipped() -> None:
    j = job(stages={"evaluation": {"enabled": False}})
    d = step(j, RLHFJobStatus())
    assert d.status.stages["evaluation"].state == "Skipped"


DPO_PATH = {
    "reward": {"enabled": False, "model": "judge"},
    "ppo": {"enabled": False},
    "dpo": {"dataset": {"uri": "prefs"}, "batchSize": 8},
    "evaluation": {"prompts": {"uri": "held-out"}},
}


def test_the_dpo_path_runs_sft_then_dpo_then_evaluation() -> None:
    j = job(stages=DPO_PATH)
    status = step(j, RLHFJobStatus(), pinned_spec="{}").status
    assert {s: st.state for s, st in status.stages.items()} == {
        "sft": "Pending",
        "reward": "Skipped",
        "ppo": "Skipped",
        "dpo": "Pending",
        "evaluation": "Pending",
    }
    j, status = running("sft", stages=DPO_PATH)
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-1", "SUCCEEDED", "Complete")))
    assert d.status.stage == "dpo" and d.status.stages["dpo"].ray_job == "demo-dpo-1"
    assert d.status.progress == "dpo 2/3"
    entrypoint = d.actions[0].manifest["spec"]["entrypoint"]
    assert "rlhf_trainer stage dpo" in entrypoint
    assert d.status.stages["dpo"].artifact == "s3://bucket/rlhf/demo/dpo"


def test_a_cluster_that_is_not_ready_is_a_wait() -> None:
    j = job()
    status = step(j, RLHFJobStatus()).status
    provisioning = ClusterObservation("demo-ray", owner_uids=(UID,), auth_mode="token")
    d = step(j, status, Observed(cluster=provisioning))
    assert d.actions == [] and d.status.phase == "Provisioning"
    ready = next(c for c in d.status.conditions if c.type == "ClusterReady")
    assert (ready.status, ready.reason) == ("False", "ClusterProvisioning")


def test_a_recorded_cluster_that_is_missing_is_created_again() -> None:
    j = job()
    status = step(j, RLHFJobStatus()).status
    d = step(j, status, Observed(cluster=None))
    assert kinds(d) == ["CreateCluster"] and d.events == []  # create-if-absent, quietly


def test_a_ready_cluster_starts_the_first_stage() -> None:
    j = job()
    status = step(j, RLHFJobStatus()).status
    d = step(j, status, Observed(cluster=ready_cluster()))
    assert d.status.phase == "Running"
    # The cluster's NetworkPolicy (owned by the cluster's uid) before anything runs on it.
    assert kinds(d) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]
    policy = d.actions[0].manifest
    assert policy["metadata"]["ownerReferences"][0]["uid"] == "cluster-uid"
    assert policy["spec"]["podSelector"] == {"matchLabels": {names.LABEL_RAY_CLUSTER: "demo-ray"}}
    manifest = d.actions[2].manifest
    assert manifest["metadata"]["name"] == "demo-sft-1"
    assert manifest["spec"]["clusterSelector"] == {names.LABEL_RAY_CLUSTER: "demo-ray"}
    assert d.status.stages["sft"].ray_job == "demo-sft-1"
    assert d.status.stages["sft"].attempts == 1
    assert reasons(d) == ["ClusterReady", "StageStarted"]


@pytest.mark.parametrize("label", ["demo", None])
def test_someone_elses_cluster_with_our_name_is_waited_for_never_adopted(label) -> None:
    """E.g. the cluster of an earlier RLHFJob `demo` (deleted, re-applied) that the garbage
    collector has not removed yet: it even carries our job label, but not our uid."""
    j = job()
    status = step(j, RLHFJobStatus()).status
    foreign = ClusterObservation(
        "demo-ray", ready=True, state="ready", owner_uids=("old-uid",), job_label=label
    )
    d = step(j, status, Observed(cluster=foreign))
    assert d.status.phase == "Provisioning"  # no stage starts on it
    assert "CreateRayJob" not in kinds(d)
    assert not any(isinstance(a, DeleteCluster) for a in d.actions)  # never delete theirs
    assert "RayCluster demo-ray" in d.status.message and "old-uid" in d.status.message
    assert "delete it or give this job another name" in d.status.message
    assert reasons(d) == ["ClusterConflict"]
    again = step(j, d.status, Observed(cluster=foreign))
    assert reasons(again) == []  # said once
    gone = step(j, again.status, Observed(cluster=None))
    assert kinds(gone) == ["CreateCluster"]  # it went: ours is created


def test_a_cluster_never_ready_fails_with_kuberays_reason_and_is_deleted() -> None:
    j = job(cluster={"provisionTimeoutSeconds": 600})
    status = step(j, RLHFJobStatus()).status
    stuck = kuberay.observe_cluster(
        {
            "metadata": {"name": "demo-ray", "ownerReferences": [{"uid": UID}]},
            "spec": {"authOptions": {"mode": "token"}},
            "status": {
                "state": "",
                "conditions": [
                    {
                        "type": "ReplicaFailure",
                        "status": "True",
                        "reason": "FailedCreateWorkerPod",
                        "message": 'serviceaccount "trainer" not found',
                    },
                    {"type": "HeadPodReady", "status": "False", "reason": "HeadPodNotFound"},
                ],
            },
        }
    )
    waiting = step(j, status, Observed(cluster=stuck), now=NOW + timedelta(seconds=60))
    assert waiting.status.phase == "Provisioning"
    assert 'serviceaccount "trainer" not found' in waiting.status.conditions[-1].message
    assert waiting.status.cluster.waiting_since == "2026-01-01T12:00:00Z"
    late = step(j, waiting.status, Observed(cluster=stuck), now=NOW + timedelta(seconds=600))
    assert late.status.phase == "Failed"
    message = late.status.message
    assert "RayCluster demo-ray was not ready within spec.cluster.provisionTimeout" in message
    assert 'FailedCreateWorkerPod: serviceaccount "trainer" not found' in message
    assert "HeadPodNotFound" in message
    assert [a.name for a in late.actions if isinstance(a, DeleteCluster)] == ["demo-ray"]
    assert "ReleaseCluster" not in kinds(late)


def test_the_provisioning_deadline_counts_from_the_request_and_clears_once_ready() -> None:
    j = job(cluster={"provisionTimeoutSeconds": 600})
    status = step(j, RLHFJobStatus()).status
    d = step(j, status, Observed(cluster=ready_cluster()), now=NOW + timedelta(seconds=599))
    assert d.status.phase == "Running" and d.status.cluster.waiting_since is None


# --------------------------------------------------------------------------- running


@pytest.mark.parametrize(
    ("job_status", "deployment", "outcome"),
    [
        ("SUCCEEDED", "Complete", Outcome.SUCCEEDED),
        ("SUCCEEDED", "Running", Outcome.SUCCEEDED),  # drift: Ray done, KubeRay not yet
        ("FAILED", "Complete", Outcome.FAILED),
        ("STOPPED", "Complete", Outcome.FAILED),
        ("FAILED", "Running", Outcome.FAILED),
        ("", "Failed", Outcome.FAILED),  # submission failed: no Ray job at all
        ("RUNNING", "Failed", Outcome.FAILED),
        ("PENDING", "Complete", Outcome.FAILED),
        ("", "Initializing", Outcome.RUNNING),
        ("PENDING", "Running", Outcome.RUNNING),
        ("RUNNING", "Running", Outcome.RUNNING),
        ("", "", Outcome.RUNNING),
        ("", "ValidationFailed", Outcome.REJECTED),
    ],
)
def test_jobstatus_and_deployment_status_are_read_together(
    job_status: str, deployment: str, outcome: Outcome
) -> None:
    assert rayjob_outcome(rayjob("x", job_status, deployment))[0] is outcome


def test_a_stage_that_exited_2_is_bad_input_named_by_its_error_line() -> None:
    message = (
        "Job entrypoint command failed with exit code 2, last available logs (truncated to "
        "20,000 chars):\nINFO starting\nerror: spec.stages.sft.dataset.uri: no such file; fix it"
        "\n"
    )
    outcome, why = rayjob_outcome(rayjob("x", "FAILED", "Failed", message=message))
    assert outcome is Outcome.BAD_INPUT
    assert why.endswith("(exit code 2): error: spec.stages.sft.dataset.uri: no such file; fix it")
    for code in ("1", "21", "137"):  # any other exit is an ordinary, retried failure
        failed = rayjob("x", "FAILED", "Failed", message=message.replace("code 2", f"code {code}"))
        assert rayjob_outcome(failed)[0] is Outcome.FAILED


def test_failure_messages_carry_kuberays_reason() -> None:
    _, why = rayjob_outcome(rayjob("x", "", "Failed", reason="SubmissionFailed", message="no"))
    assert "SubmissionFailed" in why and "RayJob x" in why


@pytest.mark.parametrize(
    ("status", "ready"),
    [
        ({"state": "ready"}, True),
        ({"conditions": [{"type": "RayClusterProvisioned", "status": "True"}]}, True),
        ({"state": "ready", "conditions": [{"type": "HeadPodReady", "status": "False"}]}, False),
        ({"conditions": [{"type": "RayClusterProvisioned", "status": "False"}]}, False),
        ({}, False),
    ],
)
def test_cluster_readiness(status: dict, ready: bool) -> None:
    assert cluster_ready(status) is ready


def test_a_running_rayjob_changes_nothing() -> None:
    j, status = running("sft")
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-1")))
    assert d.actions == [] and d.events == []
    assert status_patch(status, d.status) == {}  # nothing changed: nothing is written


def test_a_recorded_rayjob_that_is_missing_is_created_again() -> None:
    j, status = running("reward")
    d = step(j, status, Observed(ready_cluster(), None))
    # create-if-absent both: a restart may have come between the status write and the creates
    assert kinds(d) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]
    assert d.actions[2].name == "demo-reward-1"
    assert status_patch(status, d.status) == {}


def test_success_moves_to_the_next_stage() -> None:
    j, status = running("sft")
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-1", "SUCCEEDED", "Complete")))
    assert d.status.stages["sft"].state == "Succeeded"
    assert d.status.stage == "reward" and d.status.stages["reward"].ray_job == "demo-reward-1"
    assert kinds(d) == ["CreateRayJob"]
    assert reasons(d) == ["StageSucceeded", "StageStarted"]
    assert any(c.type == "SftComplete" and c.status == "True" for c in d.status.conditions)


def test_the_last_success_finishes_the_job_and_releases_the_cluster() -> None:
    j, status = running("evaluation")
    status.stages["evaluation"].metrics = {"win_rate": 0.8, "mean_reward_sft": 0.1}
    done = rayjob("demo-evaluation-1", "SUCCEEDED", "Complete")
    d = step(j, status, Observed(ready_cluster(), done))
    assert d.status.phase == "Succeeded" and d.status.completion_time
    assert kinds(d) == ["DeleteCluster"]
    assert "JobSucceeded" in reasons(d) and "ClusterDeleted" in reasons(d)
    assert d.status.evaluation.win_rate == 0.8
    assert d.status.reward == "win 0.80"
    assert d.status.evaluation.judge is None and d.status.evaluation.judge_win_rate is None


def test_the_judges_win_rate_lands_in_status_beside_the_reward_models() -> None:
    judge = {"name": "true sentiment count", "lexicon": "s3://b/words.json"}
    j, status = running("evaluation", stages={"evaluation": {"judge": judge}})
    status.stages["evaluation"].metrics = {
        "win_rate": 0.9,
        "judge_win_rate": 0.35,
        "judge_mean_sft": 0.5,
        "judge_mean_rlhf": 0.25,
    }
    d = step(
        j, status, Observed(ready_cluster(), rayjob("demo-evaluation-1", "SUCCEEDED", "Complete"))
    )
    evaluation = d.status.evaluation
    assert (evaluation.win_rate, evaluation.judge_win_rate) == (0.9, 0.35)
    assert evaluation.judge == "true sentiment count"
    assert (evaluation.judge_mean_before, evaluation.judge_mean_after) == (0.5, 0.25)


def test_a_failure_retries_with_a_new_attempt_resuming_from_checkpoints() -> None:
    j, status = running("ppo")
    failed = rayjob("demo-ppo-1", "FAILED", "Failed", reason="AppFailed", message="OOM")
    d = step(j, status, Observed(ready_cluster(), failed))
    ppo = d.status.stages["ppo"]
    assert (ppo.attempts, ppo.failures, ppo.state) == (2, 1, "Running")
    assert kinds(d) == ["CreateRayJob"]
    entry = d.actions[0].manifest["spec"]["entrypoint"]
    assert "--attempt 2" in entry and "s3://bucket/rlhf/demo/ppo/checkpoints" in entry
    retried = next(e for e in d.events if e.reason == "StageRetried")
    assert retried.type == "Warning" and "OOM" in retried.message


def test_exhausted_retries_fail_the_job_with_the_reason() -> None:
    j, status = running("sft", attempt=2)  # backoffLimit 1: this is the last attempt
    failed = rayjob("demo-sft-2", "FAILED", "Failed", message="loss is NaN")
    d = step(j, status, Observed(ready_cluster(), failed))
    assert d.status.phase == "Failed"
    assert "Stage sft failed after 2 attempt(s)" in d.status.message
    assert "loss is NaN" in d.status.message
    assert "DeleteCluster" in kinds(d) and "CreateRayJob" not in kinds(d)
    assert reasons(d)[:2] == ["StageFailed", "JobFailed"]


def test_a_lost_cluster_is_recreated_and_the_stage_rerun_without_counting_a_failure() -> None:
    j, status = running("reward")
    d = step(j, status, Observed(cluster=None, rayjob=rayjob("demo-reward-1")))
    assert d.status.phase == "Provisioning"
    assert kinds(d) == ["DeleteRayJob", "CreateCluster"]
    assert d.status.stages["reward"].failures == 0
    assert "ClusterLost" in reasons(d)


# --------------------------------------------------------------------------- run policy


def test_active_deadline_fails_and_stops_the_running_stage() -> None:
    j, status = running("ppo", runPolicy={"activeDeadlineSeconds": 60, "backoffLimit": 1})
    later = NOW + timedelta(seconds=61)
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-ppo-1")), now=later)
    assert d.status.phase == "Failed"
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert failed.reason == "DeadlineExceeded"
    assert kinds(d) == ["DeleteRayJob", "DeleteCluster"]


def test_suspend_stops_the_stage_and_releases_the_cluster() -> None:
    _, status = running("ppo", runPolicy={"suspend": False})
    suspended = job(runPolicy={"suspend": True})
    d = step(suspended, status, Observed(ready_cluster(), rayjob("demo-ppo-1")))
    assert d.status.phase == "Suspended"
    assert kinds(d) == ["DeleteRayJob", "DeleteCluster"]
    assert d.status.stages["ppo"].state == "Pending"
    assert "JobSuspended" in reasons(d)


def test_resume_recreates_the_cluster_then_starts_a_new_attempt() -> None:
    j, status = running("ppo")
    status = step(job(runPolicy={"suspend": True}), status, Observed(ready_cluster())).status
    d = step(j, status, Observed(cluster=None), now=NOW + timedelta(hours=1))
    assert d.status.phase == "Provisioning" and kinds(d) == ["CreateCluster"]
    assert "JobResumed" in reasons(d)
    d = step(j, d.status, Observed(cluster=ready_cluster()))
    assert kinds(d) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]
    assert d.actions[2].name == "demo-ppo-2"
    assert d.status.stages["ppo"].failures == 0


def test_ttl_deletes_the_finished_job() -> None:
    j = job(runPolicy={"ttlSecondsAfterFinished": 30})
    status = RLHFJobStatus(phase="Succeeded", completion_time="2026-01-01T12:00:00Z")
    assert kinds(step(j, status, now=NOW + timedelta(seconds=29))) == []
    assert kinds(step(j, status, now=NOW + timedelta(seconds=30))) == ["DeleteJob"]


def test_a_finished_job_keeps_releasing_a_cluster_that_survived() -> None:
    j = job()
    status = RLHFJobStatus(phase="Failed", completion_time="2026-01-01T12:00:00Z")
    d = step(j, status, Observed(cluster=ready_cluster()))
    assert kinds(d) == ["DeleteCluster"] and d.events == []  # a retry, not news
    d = step(j, status, Observed(cluster=ready_cluster(deleting=True)))
    assert d.actions == []


# --------------------------------------------------------------------------- spec


def test_an_invalid_spec_fails_with_one_warning_and_no_actions() -> None:
    d = reject(RLHFJobStatus(), ["spec.stages.sft.epochs: too many"], NOW, 1)
    assert d.status.phase == "Failed" and d.actions == []
    assert [(e.type, e.reason) for e in d.events] == [("Warning", "InvalidSpec")]
    valid = next(c for c in d.status.conditions if c.type == "Valid")
    assert (valid.status, valid.message) == ("False", "spec.stages.sft.epochs: too many")
    again = reject(d.status, ["spec.stages.sft.epochs: too many"], NOW, 1)
    assert again.events == [] and status_patch(d.status, again.status) == {}


def test_an_invalid_immutable_field_says_to_recreate_the_job() -> None:
    # the API server refuses an edit of spec.storage (CEL self == oldSelf): an edit cannot fix it
    d = reject(RLHFJobStatus(), ["spec.storage.uri: local path"], NOW, 1)
    assert d.status.message == (
        "spec.storage.uri: local path spec.storage cannot be changed on an existing RLHFJob: "
        "delete it and apply the corrected manifest again."
    )


def test_a_fixed_spec_starts_over() -> None:
    failed = reject(RLHFJobStatus(), ["bad"], NOW, 1).status
    d = step(job(), failed, generation=2)
    assert d.status.phase == "Provisioning" and "CreateCluster" in kinds(d)


def test_spec_changes_after_start_warn_once_per_generation() -> None:
    j, status = running("sft")
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-1")), generation=2,
             spec_changed=True)  # fmt: skip
    assert reasons(d) == ["SpecChangeIgnored"]
    assert d.status.observed_generation == 2
    d = step(j, d.status, Observed(ready_cluster(), rayjob("demo-sft-1")), generation=2,
             spec_changed=True)  # fmt: skip
    assert d.events == []


def test_status_patch_holds_only_what_changed() -> None:
    j, status = running("sft")
    status.stages["sft"].metrics = {"loss": 1.0}  # reported by the trainer meanwhile
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-1", "SUCCEEDED", "Complete")))
    patch = status_patch(status, d.status)
    assert "metrics" not in patch["stages"]["sft"]  # never clobbers trainer reports
    assert patch["stages"]["sft"]["state"] == "Succeeded"
    assert "cluster" not in patch


def test_action_types_are_exported() -> None:
    assert {CreateCluster, CreateRayJob, DeleteCluster, DeleteJob, DeleteRayJob, PinSpec}


def test_a_long_failure_message_keeps_the_error_at_its_end() -> None:
    traceback = "RayJob j-sft-1: Ray job FAILED (" + "  frame\n" * 200 + "ValueError: bad column)"
    short = shorten(traceback)
    assert len(short) <= MESSAGE_LIMIT
    assert short.startswith("RayJob j-sft-1: Ray job FAILED")
    assert short.endswith("ValueError: bad column)")
    assert shorten("short") == "short"


# --------------------------------------------------------------------------- KubeRay semantics


def test_a_rayjob_at_our_name_that_is_not_ours_is_never_taken_for_our_stage() -> None:
    """`demo-sft-1` left SUCCEEDED by an earlier RLHFJob `demo`: sft must not count as done."""
    j, status = running("sft")
    old = rayjob("demo-sft-1", "SUCCEEDED", "Complete", owner_uids=("old-uid",))
    d = step(j, status, Observed(ready_cluster(), old))
    assert d.status.stages["sft"].state == "Running" and d.status.stage == "sft"
    assert d.actions == []  # neither adopted, nor deleted, nor created beside it
    assert "RayJob demo-sft-1" in d.status.message and "old-uid" in d.status.message
    assert reasons(d) == ["RayJobConflict"]
    gone = step(j, d.status, Observed(ready_cluster(), None))
    assert kinds(gone) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]


def test_submission_failed_while_the_ray_job_runs_stops_it_before_the_retry() -> None:
    """KubeRay: deployment Failed/SubmissionFailed while jobStatus is still RUNNING."""
    j, status = running("sft")
    lost = rayjob("demo-sft-1", "RUNNING", "Failed", reason="SubmissionFailed")
    d = step(j, status, Observed(ready_cluster(), lost))
    sft = d.status.stages["sft"]
    assert (sft.state, sft.attempts, sft.failures) == ("Retrying", 1, 1)
    assert kinds(d) == ["DeleteRayJob"] and d.actions[0].name == "demo-sft-1"
    assert "waiting for RayJob demo-sft-1" in d.status.message
    # KubeRay's finalizer holds the RayJob while it stops the Ray job: no attempt 2 yet
    stopping = rayjob("demo-sft-1", "RUNNING", "Failed", reason="SubmissionFailed", deleting=True)
    d = step(j, d.status, Observed(ready_cluster(), stopping))
    assert d.actions == [] and d.status.stages["sft"].failures == 1  # counted once
    d = step(j, d.status, Observed(ready_cluster(), None))  # gone
    assert kinds(d) == ["CreateRayJob"] and d.actions[0].name == "demo-sft-2"
    assert d.status.stages["sft"].state == "Running"


def test_validation_failed_fails_the_stage_without_retrying() -> None:
    j, status = running("sft")  # backoffLimit 1: a failure would be retried
    refused = rayjob(
        "demo-sft-1", "", "ValidationFailed", message="The RayJob spec is invalid: bad selector"
    )
    d = step(j, status, Observed(ready_cluster(), refused))
    assert d.status.phase == "Failed" and d.status.stages["sft"].state == "Failed"
    assert "CreateRayJob" not in kinds(d)
    assert "KubeRay rejected RayJob demo-sft-1: The RayJob spec is invalid" in d.status.message
    assert "not retried" in d.status.message


def test_earlier_attempts_are_pruned_keeping_the_newest() -> None:
    j, status = running("sft", attempt=2, runPolicy={"backoffLimit": 3})
    first = rayjob("demo-sft-1", "FAILED", "Failed")
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-2"), earlier=(first,)))
    assert kinds(d) == ["DeleteRayJob"] and d.actions[0].name == "demo-sft-1"
    foreign = rayjob("demo-sft-1", "FAILED", "Failed", owner_uids=("old-uid",))
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-2"), earlier=(foreign,)))
    assert d.actions == []  # never someone else's


def test_keep_attempts_keeps_more() -> None:
    j, status = running("sft", attempt=2, runPolicy={"backoffLimit": 3, "keepAttempts": 2})
    first = rayjob("demo-sft-1", "FAILED", "Failed")
    d = step(j, status, Observed(ready_cluster(), rayjob("demo-sft-2"), earlier=(first,)))
    assert d.actions == []


def _body(**status: Any) -> dict[str, Any]:
    manifest = sample_job("demo")
    manifest["metadata"].update(uid=UID, generation=1, resourceVersion="7")
    manifest["status"] = status
    return manifest


def test_decide_never_acts_on_a_job_being_deleted() -> None:
    body = _body()  # a new job: its first reconcile would pin it and create its cluster
    body["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    status, decision = driver.decide(body, {}, {}, NOW)
    assert decision.actions == [] and decision.events == []
    assert status_patch(status, decision.status) == {}


def test_starting_over_re_pins_the_fixed_spec() -> None:
    """A job pinned, then failed on an invalid spec, then fixed: it rebuilds from the fix."""
    body = _body()
    old = driver.effective_manifest(body)[2]
    body["metadata"]["annotations"] = {names.ANNOTATION_PINNED_SPEC: old}
    rejected = reject(RLHFJobStatus(), ["spec.storage.uri is bad."], NOW, 1).status
    body["status"] = rejected.to_wire()
    body["metadata"]["generation"] = 2
    body["spec"]["cluster"] = {"workers": {"replicas": 4}}
    _, decision = driver.decide(body, {}, {}, NOW)
    pin = next(a for a in decision.actions if isinstance(a, PinSpec))
    assert json.loads(pin.pinned)["cluster"] == {"workers": {"replicas": 4}}
    create = next(a for a in decision.actions if isinstance(a, CreateCluster))
    assert create.manifest["spec"]["workerGroupSpecs"][0]["replicas"] == 4


def test_a_foreign_rayjob_is_waited_for_only_until_the_provisioning_deadline() -> None:
    j, status = running("sft", cluster={"provisionTimeoutSeconds": 60})
    old = rayjob("demo-sft-1", "RUNNING", "Running", owner_uids=("old-uid",))
    d = step(j, status, Observed(ready_cluster(), old))
    assert d.status.stages["sft"].waiting_since == "2026-01-01T12:00:00Z"
    still = step(j, d.status, Observed(ready_cluster(), old), now=NOW + timedelta(seconds=59))
    assert still.status.phase == "Running" and still.actions == []
    late = step(j, d.status, Observed(ready_cluster(), old), now=NOW + timedelta(seconds=60))
    assert late.status.phase == "Failed"
    assert "kubectl delete rayjob demo-sft-1 -n ns" in late.status.message
    assert "DeleteRayJob" not in kinds(late)  # never ours to delete
    gone = step(j, d.status, Observed(ready_cluster(), None), now=NOW + timedelta(seconds=5))
    assert gone.status.stages["sft"].waiting_since is None
    assert kinds(gone) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]


def test_a_foreign_cluster_at_our_name_fails_at_the_deadline_naming_it() -> None:
    j = job(cluster={"provisionTimeoutSeconds": 60})
    status = step(j, RLHFJobStatus(), pinned_spec="{}").status
    foreign = ClusterObservation(name="demo-ray", owner_uids=("old-uid",), job_label="demo")
    d = step(j, status, Observed(cluster=foreign), now=NOW + timedelta(seconds=61))
    assert d.status.phase == "Failed"
    assert "RayCluster demo-ray belongs to another owner (owner uids: old-uid" in d.status.message
    assert "kubectl delete raycluster demo-ray -n ns" in d.status.message
    assert "DeleteCluster" not in kinds(d)


def _pod(name: str, node_type: str, status: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"ray.io/node-type": node_type}},
            "status": status}  # fmt: skip


UNSCHEDULABLE = {
    "phase": "Pending",
    "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}],
}  # fmt: skip
RUNNING = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}


def test_pod_problems_name_a_pod_and_what_the_scheduler_said() -> None:
    pods = [
        _pod("c-head-1", "head", RUNNING),
        _pod("c-gpu-worker-1", "worker", UNSCHEDULABLE),
        _pod("c-gpu-worker-2", "worker", UNSCHEDULABLE),
    ]
    assert pods_to_explain(pods) == ["c-gpu-worker-1"]  # one read per node type, stuck only
    assert pod_problem(pods, {}) == (
        "pod c-gpu-worker-1 (and 1 more): Unschedulable: 0/3 nodes are available: "
        "3 Insufficient nvidia.com/gpu."
    )
    events = {"c-gpu-worker-1": [
        {"reason": "FailedScheduling", "message": "0/3 nodes are available: 3 Insufficient "
         "nvidia.com/gpu. preemption: 0/3 nodes are available."},
    ]}  # fmt: skip
    assert pod_problem(pods, events).startswith("pod c-gpu-worker-1 (and 1 more): FailedScheduling")
    assert pod_problem(pods[:1], {}) is None


def test_the_most_telling_kubelet_event_wins() -> None:
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}
    pod = _pod("c-head-1", "head", {
        "phase": "Pending",
        "containerStatuses": [{"name": "ray-head", "state": {"waiting": waiting}}],
    })  # fmt: skip
    events = {"c-head-1": [
        {"reason": "Failed", "message": 'Failed to pull image "x": not found'},
        {"reason": "Failed", "message": "Error: ErrImagePull"},
    ]}  # fmt: skip
    assert pod_problem([pod], events) == 'pod c-head-1: Failed: Failed to pull image "x": not found'
    assert pod_problem([pod], {}) == 'pod c-head-1: ImagePullBackOff: Back-off pulling image "x"'


@pytest.mark.parametrize("stored_spec", [{}, {"authOptions": {"mode": "disabled"}}])
def test_a_cluster_stored_without_token_auth_fails_the_job_and_is_deleted(stored_spec) -> None:
    """A KubeRay older than 1.5.1: its CRD has no authOptions, the API server prunes the field
    and KubeRay starts Ray with its ports open. No stage may run there."""
    j = job()
    status = step(j, RLHFJobStatus()).status
    built = next(a for a in step(j, RLHFJobStatus()).actions if isinstance(a, CreateCluster))
    assert built.manifest["spec"]["authOptions"] == {"mode": "token"}  # we asked for it
    body = {
        "metadata": {"name": "demo-ray", "uid": "c-uid", "ownerReferences": [{"uid": UID}]},
        "spec": stored_spec,
        "status": {"state": "ready"},
    }
    d = step(j, status, Observed(cluster=kuberay.observe_cluster(body)))
    assert d.status.phase == "Failed"
    assert "CreateRayJob" not in kinds(d)
    assert DeleteCluster("demo-ray") in d.actions
    failed = next(c for c in d.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "RayAuthUnsupported")
    assert "KubeRay" in d.status.message and "v1.5.1" in d.status.message


# --------------------------------------------------------------------------- trainer progress


def _report(owner: str = UID, **stages: dict) -> progress.ProgressObservation:
    return progress.observe_progress(
        {
            "metadata": {"name": "demo", "ownerReferences": [{"uid": owner}]},
            "status": {"stages": stages},
        }
    )


PPO_REPORT = {
    "progress": {"percent": 45.0, "step": 9, "totalSteps": 20},
    "metrics": {"reward_mean": 0.7314, "kl": 0.02},
    "history": [{"step": 9, "metrics": {"reward_mean": 0.7314}}],
}


def test_the_trainers_report_is_mirrored_into_status() -> None:
    j, status = running("ppo")
    mirrored = progress.mirror(status, _report(ppo=PPO_REPORT), UID, j.spec.enabled_stages())
    assert mirrored.stages["ppo"].progress.percent == 45.0
    assert mirrored.stages["ppo"].metrics == {"reward_mean": 0.7314, "kl": 0.02}
    assert mirrored.progress == "ppo 3/4 45%" and mirrored.reward == "0.731"
    # ... and the driver writes it: only the progress fields change.
    patch = status_patch(status, mirrored)
    assert set(patch) == {"progress", "reward", "stages"}
    assert set(patch["stages"]) == {"ppo"}
    assert set(patch["stages"]["ppo"]) == {"progress", "metrics", "history"}


def test_a_report_steers_nothing() -> None:
    """Whatever a trainer writes, phase, stage, attempts and the cluster stay the operator's:
    reports for stages not started or not in the job, reports on an object the job does not
    own, and fields that are not progress are all ignored."""
    j, status = running("reward")
    enabled = j.spec.enabled_stages()
    untouched = status.model_copy(deep=True)
    for report in (
        _report(ppo=PPO_REPORT),  # ppo has not started
        _report(evaluation={"metrics": {"win_rate": 1.0}}),  # nor has evaluation
        _report(bogus={"metrics": {"x": 1.0}}),  # no such stage
        _report(owner="someone-else", reward=PPO_REPORT),  # not this job's object
        _report(reward={"phase": "Succeeded", "state": "Succeeded", "attempts": 99}),
    ):
        mirrored = progress.mirror(status, report, UID, enabled)
        assert mirrored == untouched, report
    forged = progress.observe_progress(
        {
            "metadata": {"ownerReferences": [{"uid": UID}]},
            "status": {"phase": "Succeeded", "stages": {"reward": PPO_REPORT}},
        }
    )
    assert forged.stages == {}  # a status the schema refuses is no report at all
    d = step(j, progress.mirror(status, _report(reward=PPO_REPORT), UID, enabled),
             Observed(ready_cluster(), rayjob("demo-reward-1")))  # fmt: skip
    assert d.status.phase == "Running" and d.status.stage == "reward"
    assert d.actions == []


def test_each_attempt_ensures_the_progress_object() -> None:
    j = job()
    status = step(j, RLHFJobStatus()).status
    d = step(j, status, Observed(cluster=ready_cluster()))
    (create,) = [a for a in d.actions if isinstance(a, CreateProgress)]
    assert create.manifest["metadata"]["name"] == "demo"
    assert create.manifest["metadata"]["ownerReferences"][0]["uid"] == UID
    assert create.manifest["spec"] == {"job": "demo"}
