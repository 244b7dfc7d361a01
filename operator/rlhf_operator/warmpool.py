"""Warm pools: a finished job's RayCluster stays up for the next job that needs the same cluster.

Pure logic only (no API calls): what must match for reuse (the *pool signature*), the patches
that release a cluster into the pool and claim it out of it, which pooled cluster to claim, and
when a cluster may be pooled at all. The reconcile does the I/O.

A pooled RayCluster is recognised by its labels and annotations::

    labels:       rlhf.dev/pool-signature: <hash>        what it can be reused for
                  rlhf.dev/pool-state: available|claimed
                  rlhf.dev/claimed-by: <job uid>           (claimed only)
    annotations:  rlhf.dev/pool-expires-at: <RFC 3339>     (available only)
                  rlhf.dev/released-by: <namespace>/<job>  the job that used it last

Safety rests on two rules:

1. Everything baked into the RayCluster (image, pod shapes, GPUs, scheduling, ServiceAccount,
   Secret and volume mounts, namespace) is in the signature; everything that differs between
   jobs (job name, model, data, storage path, hyper-parameters) is passed per RayJob. So a
   claimed cluster is exactly the cluster the new job would have built, and nothing of the
   previous job (its name, its Secret, its volume) reaches the next one unless the next one
   would have had it too. tests/unit/test_warmpool.py checks the builders against this rule.
2. A claim is one merge-patch carrying the cluster's `metadata.resourceVersion`: the API server
   applies it only if nobody wrote the cluster since it was read, so two racing jobs never both
   get it (the loser sees 409 Conflict and takes another cluster or creates its own).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_operator.api import GROUP, RLHFJob
from rlhf_operator.api.storage import pvc_claim
from rlhf_operator.names import LABEL_JOB

LABEL_SIGNATURE = f"{GROUP}/pool-signature"
LABEL_STATE = f"{GROUP}/pool-state"
LABEL_CLAIMED_BY = f"{GROUP}/claimed-by"
ANNOTATION_EXPIRES_AT = f"{GROUP}/pool-expires-at"
ANNOTATION_RELEASED_BY = f"{GROUP}/released-by"

STATE_AVAILABLE = "available"
STATE_CLAIMED = "claimed"

SIGNATURE_LENGTH = 32
"""Hex digits kept of the sha256 (128 bits): unique in practice, and fits a label value (63)."""

RAY_CLUSTER_READY = "ready"
"""KubeRay's `RayCluster.status.state` once the head and the desired workers are running."""

CLUSTER_FAULT_REASONS = frozenset(
    {"SubmissionFailed", "JobDeploymentStatusTransitionGracePeriodExceeded"}
)
"""KubeRay RayJob failure reasons that blame the cluster (the job never reached the Ray head, or
the head stopped answering). `AppFailed` (the stage's own exit code) and `DeadlineExceeded`
are the job's own failures: its cluster may still be pooled."""

_UNHEALTHY_CONDITIONS = {"HeadPodReady": "False", "RayClusterReplicaFailure": "True"}


# --------------------------------------------------------------------------- the signature


def signature_material(job: RLHFJob) -> dict[str, Any]:
    """Everything that must be equal for two jobs to share a Ray cluster (hashed as is).

    The whole `spec.cluster` (image, pull policy, ServiceAccount, head and worker shapes, GPUs,
    node selector, tolerations, affinity: any field added there later is covered too), the
    storage that is mounted into the pods (Secret, endpoint, PVC claim; not the path, which the
    RayJob carries), the namespace, and the optional explicit pool name.
    """
    storage = job.spec.storage
    return {
        "namespace": job.metadata.namespace or "",
        "pool": job.spec.warm_pool.pool,
        "cluster": job.spec.cluster.to_wire(),
        "storage": {
            "secret": storage.secret_ref.name if storage.secret_ref else None,
            "endpoint": storage.endpoint,
            "pvcClaim": pvc_claim(storage.uri),
        },
    }


def pool_signature(job: RLHFJob) -> str:
    """A stable short hash of `signature_material(job)` (canonical JSON, sha256)."""
    canonical = json.dumps(signature_material(job), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:SIGNATURE_LENGTH]


def pool_selector(signature: str) -> str:
    """Label selector of the available clusters of one signature (for a LIST call)."""
    return f"{LABEL_SIGNATURE}={signature},{LABEL_STATE}={STATE_AVAILABLE}"


# --------------------------------------------------------------------------- reading a cluster


def _meta(cluster: Mapping[str, Any]) -> Mapping[str, Any]:
    return cluster.get("metadata") or {}


def _labels(cluster: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(cluster).get("labels") or {}


def _annotations(cluster: Mapping[str, Any]) -> Mapping[str, str]:
    return _meta(cluster).get("annotations") or {}


def pool_state(cluster: Mapping[str, Any]) -> str | None:
    """`available`, `claimed`, or None for a cluster that never was in a pool."""
    return _labels(cluster).get(LABEL_STATE)


def claimed_by(cluster: Mapping[str, Any]) -> str | None:
    """The uid of the job that claimed the cluster out of the pool, if any."""
    return _labels(cluster).get(LABEL_CLAIMED_BY)


def expires_at(cluster: Mapping[str, Any]) -> datetime | None:
    """When an available cluster stops being claimable (None: no valid expiry annotation)."""
    raw = _annotations(cluster).get(ANNOTATION_EXPIRES_AT)
    if not raw:
        return None
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def expired(cluster: Mapping[str, Any], now: datetime) -> bool:
    """True for an available pool cluster past its expiry (or with no readable expiry)."""
    if pool_state(cluster) != STATE_AVAILABLE:
        return False
    deadline = expires_at(cluster)
    return deadline is None or deadline <= now


def seconds_to_expiry(cluster: Mapping[str, Any], now: datetime) -> float:
    """Seconds until an available cluster expires (0 when it already has)."""
    deadline = expires_at(cluster)
    return 0.0 if deadline is None else max((deadline - now).total_seconds(), 0.0)


def is_healthy(cluster: Mapping[str, Any]) -> bool:
    """The cluster is up (KubeRay state `ready`), not being deleted, and no condition says ill."""
    if _meta(cluster).get("deletionTimestamp"):
        return False
    status = cluster.get("status") or {}
    if status.get("state") != RAY_CLUSTER_READY:
        return False
    return not any(
        _UNHEALTHY_CONDITIONS.get(c.get("type")) == c.get("status")
        for c in status.get("conditions") or []
    )


def cluster_at_fault(rayjob_status: Mapping[str, Any] | None) -> bool:
    """Whether a failed stage RayJob failed because of its cluster (KubeRay's `status.reason`)."""
    return (rayjob_status or {}).get("reason") in CLUSTER_FAULT_REASONS


def is_poolable(phase: str | None, cluster: Mapping[str, Any], *, failed_by_cluster: bool) -> bool:
    """May a finished job's cluster go into the pool? Never when it is unhealthy or to blame.

    `phase` is the job's final phase; a job that failed for its own reasons (a stage exited
    non-zero, a deadline) leaves a healthy cluster behind, which is pooled like a succeeded one.
    """
    if phase not in ("Succeeded", "Failed"):
        return False
    if phase == "Failed" and failed_by_cluster:
        return False
    return is_healthy(cluster)


# --------------------------------------------------------------------------- choosing


def candidates(
    clusters: Iterable[Mapping[str, Any]], signature: str, now: datetime
) -> list[Mapping[str, Any]]:
    """The clusters a job with `signature` may claim, best first.

    Available, same signature, not expired, healthy, owned by nobody. The one closest to expiry
    comes first (it is saved from deletion; fresher ones stay claimable longer), then by name,
    so every operator replica ranks them the same way.
    """
    usable = [
        c
        for c in clusters
        if _labels(c).get(LABEL_SIGNATURE) == signature
        and pool_state(c) == STATE_AVAILABLE
        and not expired(c, now)
        and not _meta(c).get("ownerReferences")
        and is_healthy(c)
    ]
    return sorted(usable, key=lambda c: (expires_at(c) or now, _meta(c).get("name", "")))


def choose_candidate(
    clusters: Iterable[Mapping[str, Any]], signature: str, now: datetime
) -> Mapping[str, Any] | None:
    """The best cluster to claim (see `candidates`), or None: the job creates its own."""
    ranked = candidates(clusters, signature, now)
    return ranked[0] if ranked else None


# --------------------------------------------------------------------------- patches


def owner_reference(job_body: Mapping[str, Any]) -> dict[str, Any]:
    """The ownerReference that makes a RayCluster a child of an RLHFJob (GC deletes it with it)."""
    meta = job_body.get("metadata") or {}
    return {
        "apiVersion": job_body.get("apiVersion", f"{GROUP}/v1alpha1"),
        "kind": job_body.get("kind", "RLHFJob"),
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def release_patch(
    job_body: Mapping[str, Any], signature: str, keep_alive_seconds: int, now: datetime
) -> dict[str, Any]:
    """Merge-patch that moves a finished job's cluster into the pool.

    Ownership leaves the job (deleting the job no longer deletes the cluster), the job label
    goes, and the cluster is labelled with the signature, `available`, and its expiry.
    The pod template is not touched: by rule 1 (module docstring) it holds nothing job-specific.
    """
    meta = job_body.get("metadata") or {}
    deadline = now.astimezone(UTC) + timedelta(seconds=keep_alive_seconds)
    return {
        "metadata": {
            "ownerReferences": None,
            "labels": {
                LABEL_JOB: None,
                LABEL_CLAIMED_BY: None,
                LABEL_SIGNATURE: signature,
                LABEL_STATE: STATE_AVAILABLE,
            },
            "annotations": {
                ANNOTATION_EXPIRES_AT: deadline.strftime("%Y-%m-%dT%H:%M:%SZ"),
                ANNOTATION_RELEASED_BY: f"{meta.get('namespace', '')}/{meta.get('name', '')}",
            },
        }
    }


def claim_patch(cluster: Mapping[str, Any], job_body: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch that claims a pool cluster for a job, atomically.

    It carries the cluster's `metadata.resourceVersion` as it was read: if anyone (another job's
    claim, the expiry timer) wrote the cluster since, the API server answers 409 and applies
    nothing.
    """
    job_meta = job_body.get("metadata") or {}
    return {
        "metadata": {
            "resourceVersion": _meta(cluster)["resourceVersion"],
            "ownerReferences": [owner_reference(job_body)],
            "labels": {
                LABEL_JOB: job_meta["name"],
                LABEL_STATE: STATE_CLAIMED,
                LABEL_CLAIMED_BY: job_meta["uid"],
            },
            "annotations": {ANNOTATION_EXPIRES_AT: None},
        }
    }


def claimed_by_job(cluster: Mapping[str, Any] | None, job_body: Mapping[str, Any]) -> bool:
    """The cluster exists, is not being deleted, and was claimed by this very job (by uid)."""
    if not cluster or _meta(cluster).get("deletionTimestamp"):
        return False
    uid = (job_body.get("metadata") or {}).get("uid")
    return uid is not None and claimed_by(cluster) == uid


def delete_preconditions(cluster: Mapping[str, Any]) -> dict[str, Any]:
    """DeleteOptions for deleting an expired pool cluster only if nobody claimed it meanwhile."""
    return {"preconditions": {"resourceVersion": _meta(cluster)["resourceVersion"]}}
