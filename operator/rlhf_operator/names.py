"""Names the operator writes into the cluster: labels, event reasons, conditions, child names.

One source of truth: builders, the state machine, handlers, the chart's RBAC test and the
warm-pool module all import these; nothing spells a label or a reason twice.
"""

from __future__ import annotations

import re

from rlhf_operator.api import GROUP, STAGE_ORDER

# --------------------------------------------------------------------------- KubeRay coordinates

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_API_VERSION = f"{RAY_GROUP}/{RAY_VERSION}"
RAYCLUSTERS = "rayclusters"
RAYJOBS = "rayjobs"
RAYCLUSTER_KIND = "RayCluster"
RAYJOB_KIND = "RayJob"

# --------------------------------------------------------------------------- labels, annotations

LABEL_JOB = f"{GROUP}/job"
LABEL_STAGE = f"{GROUP}/stage"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_RAY_CLUSTER = "ray.io/cluster"  # KubeRay's own: a RayJob's clusterSelector key
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "rlhf-operator"
LABEL_RAY_CLIENT = f"{GROUP}/ray-client"
"""On stage submitter pods: the RayCluster whose NetworkPolicy lets them reach the dashboard."""
LABEL_NAMESPACE_NAME = "kubernetes.io/metadata.name"  # set on every Namespace by the API server

ANNOTATION_PREFIX = GROUP  # kopf keeps its progress and diff-base under this prefix
ANNOTATION_PINNED_SPEC = f"{GROUP}/pinned-spec"
"""The job's `stages` and `cluster` as they were when it started (later edits are ignored)."""

FINALIZER = f"{GROUP}/cleanup"
"""Held while a job exists: deleting it first stops its RayJob and releases its cluster."""

# --------------------------------------------------------------------------- event reasons

INVALID_SPEC = "InvalidSpec"
SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
CLUSTER_CREATED = "ClusterCreated"
CLUSTER_READY = "ClusterReady"
CLUSTER_LOST = "ClusterLost"
CLUSTER_DELETED = "ClusterDeleted"
CLUSTER_CONFLICT = "ClusterConflict"  # a RayCluster at our name that is not ours: waiting
RAYJOB_CONFLICT = "RayJobConflict"  # a RayJob at our name that is not ours: waiting
PROVISION_TIMEOUT = "ProvisionTimeout"  # spec.cluster.provisionTimeoutSeconds passed
WARM_POOL_HIT = "WarmPoolHit"  # a warm cluster was claimed from the pool: no provisioning
WARM_POOL_MISS = "WarmPoolMiss"  # a job that uses warm pools found none and creates its own
WARM_POOL_TAMPERED = "WarmPoolTampered"  # a pooled cluster whose spec is not what it claims
CLUSTER_POOLED = "ClusterPooled"  # a finished job's cluster went into the warm pool
STAGE_STARTED = "StageStarted"
STAGE_SUCCEEDED = "StageSucceeded"
STAGE_RETRIED = "StageRetried"
STAGE_FAILED = "StageFailed"
JOB_SUCCEEDED = "JobSucceeded"
JOB_FAILED = "JobFailed"
JOB_SUSPENDED = "JobSuspended"
JOB_QUEUED = "Queued"  # Kueue holds the RayCluster suspended (also the ClusterReady reason)
JOB_ADMITTED = "Admitted"
JOB_RESUMED = "JobResumed"
JOB_EXPIRED = "JobExpired"  # ttlSecondsAfterFinished reached: the RLHFJob is deleted
DEADLINE_EXCEEDED = "DeadlineExceeded"
TOO_MANY_ATTEMPTS = "TooManyAttempts"
RAY_AUTH_UNSUPPORTED = "RayAuthUnsupported"  # the API server dropped spec.authOptions (old KubeRay)

# --------------------------------------------------------------------------- conditions

COND_VALID = "Valid"
COND_CLUSTER_READY = "ClusterReady"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"


def stage_condition(stage: str) -> str:
    """`<Stage>Complete`: SftComplete, RewardComplete, PpoComplete, EvaluationComplete."""
    return f"{stage.capitalize()}Complete"


# --------------------------------------------------------------------------- child names

# KubeRay derives Service names from the RayCluster name ("-serve-svc" being the longest suffix),
# so it refuses RayCluster names over 53 characters; a RayJob name may be at most 47 (KubeRay
# would append 6 characters to make a cluster of its own). Both must be DNS-1035 labels.
KUBERAY_MAX_CLUSTER_NAME = 53
KUBERAY_MAX_RAYJOB_NAME = 47
CLUSTER_SUFFIX = "-ray"
MAX_ATTEMPT = 999
"""Attempts of one stage (retries plus resumes); the name of attempt 999 still fits."""

_LONGEST_STAGE = max(STAGE_ORDER, key=len)
MAX_JOB_NAME = min(
    KUBERAY_MAX_CLUSTER_NAME - len(CLUSTER_SUFFIX),
    KUBERAY_MAX_RAYJOB_NAME - len(f"-{_LONGEST_STAGE}-{MAX_ATTEMPT}"),
)
"""Longest RLHFJob name whose every child name fits KubeRay's limits (32)."""

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def cluster_name(job: str) -> str:
    """The RayCluster a job creates: `<job>-ray`."""
    return f"{job}{CLUSTER_SUFFIX}"


def network_policy_name(cluster: str) -> str:
    """The NetworkPolicy guarding a RayCluster's pods: the cluster's own name."""
    return cluster


def rayjob_name(job: str, stage: str, attempt: int) -> str:
    """The RayJob of one attempt of one stage: `<job>-<stage>-<attempt>`."""
    return f"{job}-{stage}-{attempt}"


def job_name_problems(job: str) -> list[str]:
    """Why `job` cannot name the children it needs (empty when it can)."""
    problems = []
    if len(job) > MAX_JOB_NAME:
        longest = rayjob_name(job, _LONGEST_STAGE, MAX_ATTEMPT)
        problems.append(
            f"metadata.name: '{job}' is {len(job)} characters; an RLHFJob name may have at most "
            f"{MAX_JOB_NAME} so that its RayJobs ('{longest}') fit KubeRay's "
            f"{KUBERAY_MAX_RAYJOB_NAME}-character limit; choose a shorter name."
        )
    if not _DNS1035.match(job):
        problems.append(
            f"metadata.name: '{job}' must start with a letter and contain only lowercase letters, "
            "digits and '-' (KubeRay names its RayCluster and RayJobs after it); rename the job."
        )
    return problems


# Kueue (kueue.x-k8s.io): the label that puts a workload (our RayCluster) in a LocalQueue.
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
