"""Reading KubeRay's statuses (ray.io/v1), pure: RayCluster readiness and RayJob outcomes.

Enum values are KubeRay's (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go).
A RayJob has two statuses that drift apart: `jobStatus` (the Ray job, from the dashboard) and
`jobDeploymentStatus` (KubeRay's own lifecycle, including the submitter). They are read together:

    jobStatus                 jobDeploymentStatus      outcome
    SUCCEEDED                 any                      succeeded (the Ray job itself finished)
    FAILED / STOPPED          any                      failed
    other or empty            Failed                   failed (e.g. SubmissionFailed, no jobStatus)
    other or empty            Complete                 failed (completed without a verdict)
    any                       ValidationFailed         rejected (KubeRay refused the RayJob's
                                                       spec: terminal, never retried)
    other or empty            anything else            running (Initializing, Running, ...)

A failed Ray job whose entrypoint exited with code 2 (the trainer's "bad input", CONTRACTS §6)
is `bad input`: terminal, since a retry would read the same input. The exit code is read from
the message Ray's job supervisor writes and KubeRay mirrors ("Job entrypoint command failed
with exit code N, last available logs ..."), the only place either puts it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from typing import Any

from rlhf_operator import names, warmpool
from rlhf_operator.reconcile.model import ClusterObservation, RayJobObservation

# RayCluster
CLUSTER_STATE_READY = "ready"
COND_PROVISIONED = "RayClusterProvisioned"
COND_HEAD_POD_READY = "HeadPodReady"

# RayJob: KubeRay's finalizer (it stops the Ray job of a deleted RayJob, then lets it go)
RAYJOB_FINALIZER = "ray.io/rayjob-finalizer"
# RayJob: jobStatus
JOB_SUCCEEDED = "SUCCEEDED"
JOB_FAILED = "FAILED"
JOB_STOPPED = "STOPPED"
# RayJob: jobDeploymentStatus
DEPLOYMENT_COMPLETE = "Complete"
DEPLOYMENT_FAILED = "Failed"
DEPLOYMENT_VALIDATION_FAILED = "ValidationFailed"
# RayCluster conditions that say why it is not ready (KubeRay's raycluster_types.go)
COND_REPLICA_FAILURE = "ReplicaFailure"  # True: KubeRay could not create a pod (e.g. no SA)

MESSAGE_LIMIT = 400  # KubeRay messages can carry a driver's traceback; status keeps the gist
# Ray's job supervisor (dashboard/modules/job/job_supervisor.py) on a non-zero entrypoint exit.
ENTRYPOINT_EXIT = re.compile(r"Job entrypoint command failed with exit code (\d+)")
EXIT_BAD_INPUT = 2  # rlhf_trainer.cli.EXIT_USER_ERROR (the operator image has no trainer)


class Outcome(enum.Enum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    REJECTED = "Rejected"  # ValidationFailed: retrying the same RayJob cannot help
    BAD_INPUT = "BadInput"  # the stage exited 2: its input is wrong, a retry reads it again


def _conditions(status: Mapping[str, Any]) -> dict[str, str]:
    return {c.get("type", ""): c.get("status", "") for c in status.get("conditions") or []}


def cluster_ready(status: Mapping[str, Any]) -> bool:
    """Ready for jobs: provisioned (`state: ready` or RayClusterProvisioned) and head not down.

    RayClusterProvisioned stays True once reached; HeadPodReady tracks the head afterwards.
    """
    conditions = _conditions(status)
    provisioned = (
        status.get("state") == CLUSTER_STATE_READY or conditions.get(COND_PROVISIONED) == "True"
    )
    return provisioned and conditions.get(COND_HEAD_POD_READY) != "False"


def cluster_problem(status: Mapping[str, Any]) -> str | None:
    """Why KubeRay says the cluster is not ready: its `reason` and the failing conditions
    (`ReplicaFailure` True, `HeadPodReady` / `RayClusterProvisioned` False) with their own
    reasons and messages; None when it says nothing."""
    parts = [status["reason"]] if status.get("reason") else []
    for c in status.get("conditions") or []:
        failing = c.get("type") == COND_REPLICA_FAILURE and c.get("status") == "True"
        failing |= c.get("type") in (COND_HEAD_POD_READY, COND_PROVISIONED) and (
            c.get("status") == "False"
        )
        detail = ": ".join(p for p in (c.get("reason"), c.get("message")) if p)
        if failing and detail:
            parts.append(f"{c['type']}: {detail}")
    return shorten("; ".join(parts)) if parts else None


# Pods: what Kubernetes says about the ones not running yet (the scheduler, the kubelet)
WAITING_REASONS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CrashLoopBackOff",
     "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
)  # fmt: skip
EXPLAINED_PODS = 2  # pods whose Events are read per reconcile: the first stuck head and worker


def _stuck(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])  # fmt: skip
    return not (status.get("phase") == "Running" and ready)


def _node_type(pod: Mapping[str, Any]) -> str:
    return ((pod.get("metadata") or {}).get("labels") or {}).get("ray.io/node-type", "")


def pods_to_explain(pods: list[Mapping[str, Any]]) -> list[str]:
    """Names of the pods whose Warning Events are worth a read: the first stuck pod of each
    node type (head first), at most `EXPLAINED_PODS`."""
    chosen: dict[str, str] = {}
    for pod in sorted(pods, key=lambda p: _node_type(p) != "head"):
        if _stuck(pod):
            chosen.setdefault(_node_type(pod), pod["metadata"]["name"])
    return list(chosen.values())[:EXPLAINED_PODS]


def _status_reason(pod: Mapping[str, Any]) -> str:
    """`<reason>: <message>` from a stuck pod's own status (PodScheduled False, a waiting
    container), or its phase."""
    status = pod.get("status") or {}
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or 'not scheduled'}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in WAITING_REASONS:
            return f"{waiting['reason']}: {waiting.get('message') or cs.get('name', '')}"
    return f"{status.get('phase') or 'Pending'}"


def _event_reason(warnings: list[Mapping[str, Any]]) -> str | None:
    """`<reason>: <message>` of the most telling Warning Event (the scheduler's, the
    kubelet's): the longest message, since the kubelet follows `Failed to pull image "x":
    <why>` with a bare `Error: ErrImagePull`."""
    said = [e for e in warnings if e.get("message")]
    if not said:
        return None
    telling = max(said, key=lambda e: len(e["message"]))
    return f"{telling.get('reason') or 'Warning'}: {telling['message']}"


def pod_problem(
    pods: list[Mapping[str, Any]], warnings: Mapping[str, list[Mapping[str, Any]]]
) -> str | None:
    """What keeps a cluster's pods from running, one part per distinct reason, naming a pod
    and how many more share it (`warnings`: pod name -> its Warning Events, read for the pods
    `pods_to_explain` chose; their words win over the pod's own status)."""
    groups: dict[str, list[str]] = {}
    for pod in sorted(pods, key=lambda p: _node_type(p) != "head"):
        if _stuck(pod):
            groups.setdefault(_status_reason(pod), []).append(pod["metadata"]["name"])
    parts = []
    for reason, pod_names in groups.items():
        told = next((r for n in pod_names if (r := _event_reason(list(warnings.get(n) or [])))),
                    None)  # fmt: skip
        named = next((n for n in pod_names if warnings.get(n)), pod_names[0])
        more = f" (and {len(pod_names) - 1} more)" if len(pod_names) > 1 else ""
        parts.append(f"pod {named}{more}: {told or reason}")
    return shorten("; ".join(parts)) if parts else None


def _owner_uids(meta: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(ref.get("uid", "") for ref in meta.get("ownerReferences") or [])


def observe_cluster(body: Mapping[str, Any]) -> ClusterObservation:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return ClusterObservation(
        name=meta.get("name", ""),
        ready=cluster_ready(status),
        state=status.get("state"),
        deleting=bool(meta.get("deletionTimestamp")),
        job_label=(meta.get("labels") or {}).get(names.LABEL_JOB),
        owner_uids=_owner_uids(meta),
        message=cluster_problem(status),
        pool=warmpool.observe(body),
        uid=meta.get("uid") or "",
        auth_mode=((body.get("spec") or {}).get("authOptions") or {}).get("mode"),
        suspended=bool((body.get("spec") or {}).get("suspend"))
        or status.get("state") == "suspended",
        queue=(meta.get("labels") or {}).get(names.LABEL_KUEUE_QUEUE),
    )


def observe_rayjob(body: Mapping[str, Any]) -> RayJobObservation:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    labels = meta.get("labels") or {}
    return RayJobObservation(
        name=meta.get("name", ""),
        job_status=status.get("jobStatus") or "",
        deployment_status=status.get("jobDeploymentStatus") or "",
        reason=status.get("reason") or "",
        message=status.get("message") or "",
        deleting=bool(meta.get("deletionTimestamp")),
        owner_uids=_owner_uids(meta),
        stage=labels.get(names.LABEL_STAGE, ""),
        attempt=int(labels.get(names.LABEL_ATTEMPT) or 0),
    )


def shorten(message: str, limit: int = MESSAGE_LIMIT, head: int = 120) -> str:
    """Keep the start (which RayJob, in what state) and the end, where a driver's traceback
    names the actual error; the middle of a long traceback is what status can spare."""
    if len(message) <= limit:
        return message
    return f"{message[:head]} … {message[-(limit - head - 3) :]}"


def entrypoint_exit_code(message: str) -> int | None:
    match = ENTRYPOINT_EXIT.search(message)
    return int(match.group(1)) if match else None


def last_error_line(message: str) -> str:
    """The driver's `error: ...` line (the trainer's last stderr line names the field and the
    fix, CONTRACTS §6), else the message's last non-empty line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:") or ": error:" in line]
    return (errors or lines or [""])[-1]


def rayjob_outcome(rayjob: RayJobObservation) -> tuple[Outcome, str]:
    """The outcome of a RayJob and, for a failure, why (see the table in the module docstring)."""
    job, deployment = rayjob.job_status, rayjob.deployment_status
    if deployment == DEPLOYMENT_VALIDATION_FAILED:
        detail = rayjob.message or rayjob.reason or "no message"
        return Outcome.REJECTED, shorten(f"KubeRay rejected RayJob {rayjob.name}: {detail}")
    if job == JOB_SUCCEEDED:
        return Outcome.SUCCEEDED, ""
    if job == JOB_FAILED and entrypoint_exit_code(rayjob.message) == EXIT_BAD_INPUT:
        return Outcome.BAD_INPUT, shorten(
            f"RayJob {rayjob.name}: the stage refused its input (exit code {EXIT_BAD_INPUT}): "
            f"{last_error_line(rayjob.message)}"
        )
    if job in (JOB_FAILED, JOB_STOPPED) or deployment in (DEPLOYMENT_FAILED, DEPLOYMENT_COMPLETE):
        what = f"Ray job {job}" if job else f"deployment {deployment}"
        detail = ": ".join(part for part in (rayjob.reason, rayjob.message) if part)
        message = f"RayJob {rayjob.name}: {what}" + (f" ({detail})" if detail else "")
        return Outcome.FAILED, shorten(message)
    return Outcome.RUNNING, ""


def is_finished(rayjob: RayJobObservation) -> bool:
    return rayjob_outcome(rayjob)[0] is not Outcome.RUNNING


def ray_job_stopped(rayjob: RayJobObservation) -> bool:
    """No driver of it can be running: the Ray job ended (SUCCEEDED/FAILED/STOPPED) or KubeRay
    never submitted one. A RayJob whose deployment failed while its Ray job still RUNS
    (SubmissionFailed: the submitter gave up, the driver did not) is not stopped."""
    if rayjob.job_status in (JOB_SUCCEEDED, JOB_FAILED, JOB_STOPPED):
        return True
    return rayjob.deployment_status == DEPLOYMENT_VALIDATION_FAILED
