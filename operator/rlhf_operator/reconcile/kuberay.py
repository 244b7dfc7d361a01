"""Reading KubeRay's statuses (ray.io/v1), pure: RayCluster readiness and RayJob outcomes.

Enum values are KubeRay's (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go).
A RayJob has two statuses that drift apart: `jobStatus` (the Ray job, from the dashboard) and
`jobDeploymentStatus` (KubeRay's own lifecycle, including the submitter). They are read together:

    jobStatus                 jobDeploymentStatus      outcome
    SUCCEEDED                 any                      succeeded (the Ray job itself finished)
    FAILED / STOPPED          any                      failed
    other or empty            Failed                   failed (e.g. SubmissionFailed, no jobStatus)
    other or empty            Complete                 failed (completed without a verdict)
    other or empty            anything else            running (Initializing, Running, ...)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from rlhf_operator import names, warmpool
from rlhf_operator.reconcile.model import ClusterObservation, RayJobObservation

# RayCluster
CLUSTER_STATE_READY = "ready"
COND_PROVISIONED = "RayClusterProvisioned"
COND_HEAD_POD_READY = "HeadPodReady"

# RayJob: jobStatus
JOB_SUCCEEDED = "SUCCEEDED"
JOB_FAILED = "FAILED"
JOB_STOPPED = "STOPPED"
# RayJob: jobDeploymentStatus
DEPLOYMENT_COMPLETE = "Complete"
DEPLOYMENT_FAILED = "Failed"

MESSAGE_LIMIT = 400  # KubeRay messages can carry a driver's traceback; status keeps the gist


class Outcome(enum.Enum):
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


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


def observe_cluster(body: Mapping[str, Any]) -> ClusterObservation:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return ClusterObservation(
        name=meta.get("name", ""),
        ready=cluster_ready(status),
        state=status.get("state"),
        deleting=bool(meta.get("deletionTimestamp")),
        job_label=(meta.get("labels") or {}).get(names.LABEL_JOB),
        owner_uids=tuple(ref.get("uid", "") for ref in meta.get("ownerReferences") or []),
        message=status.get("reason"),
        pool=warmpool.observe(body),
    )


def observe_rayjob(body: Mapping[str, Any]) -> RayJobObservation:
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    return RayJobObservation(
        name=meta.get("name", ""),
        job_status=status.get("jobStatus") or "",
        deployment_status=status.get("jobDeploymentStatus") or "",
        reason=status.get("reason") or "",
        message=status.get("message") or "",
        deleting=bool(meta.get("deletionTimestamp")),
    )


def shorten(message: str, limit: int = MESSAGE_LIMIT, head: int = 120) -> str:
    """Keep the start (which RayJob, in what state) and the end, where a driver's traceback
    names the actual error; the middle of a long traceback is what status can spare."""
    if len(message) <= limit:
        return message
    return f"{message[:head]} … {message[-(limit - head - 3) :]}"


def rayjob_outcome(rayjob: RayJobObservation) -> tuple[Outcome, str]:
    """The outcome of a RayJob and, for a failure, why (see the table in the module docstring)."""
    job, deployment = rayjob.job_status, rayjob.deployment_status
    if job == JOB_SUCCEEDED:
        return Outcome.SUCCEEDED, ""
    if job in (JOB_FAILED, JOB_STOPPED) or deployment in (DEPLOYMENT_FAILED, DEPLOYMENT_COMPLETE):
        what = f"Ray job {job}" if job else f"deployment {deployment}"
        detail = ": ".join(part for part in (rayjob.reason, rayjob.message) if part)
        message = f"RayJob {rayjob.name}: {what}" + (f" ({detail})" if detail else "")
        return Outcome.FAILED, shorten(message)
    return Outcome.RUNNING, ""


def is_finished(rayjob: RayJobObservation) -> bool:
    return rayjob_outcome(rayjob)[0] is not Outcome.RUNNING
