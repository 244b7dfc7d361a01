"""Warm pools: a finished job's RayCluster stays up for the next job that needs the same cluster.

Pure logic only (no API calls): what must match for reuse (the *pool signature*), the patches
that release a cluster into the pool and claim it out of it, which pooled cluster to claim, and
when a cluster may be pooled at all. The reconcile does the I/O.

A pooled RayCluster is recognised by its labels and annotations::

    labels:       rlhf.dev/pool-signature: <hash>        what it can be reused for (stamped at
                                                           creation, renewed on release)
                  rlhf.dev/pool-state: available|claimed
                  rlhf.dev/claimed-by: <job uid>           (claimed only)
    annotations:  rlhf.dev/pool-generation: "1"           metadata.generation at creation
                  rlhf.dev/pool: <spec.warmPool.pool>     the explicit pool name ("" for none)
                  rlhf.dev/pool-expires-at: <RFC 3339>     (available only)
                  rlhf.dev/released-by: <namespace>/<job>  the job that used it last

Safety rests on three rules:

1. The signature hashes the RayCluster spec the builders make for the job (image, pod shapes,
   GPUs, scheduling, ServiceAccount, Secret and volume mounts: everything baked into the pods,
   including whatever a later version adds), plus the namespace and the explicit pool name.
   Whatever differs between jobs (job name, model, data, storage path, hyper-parameters) is
   passed per RayJob, never baked into the cluster. So a claimed cluster is exactly the cluster
   the new job would have built, and nothing of the previous job (its name, Secret, volumes)
   reaches the next one unless the next one would have had it too.
   tests/unit/test_warmpool.py holds the builders to this rule.
2. A claim is one merge-patch carrying the cluster's `metadata.resourceVersion`: the API server
   applies it only if nobody wrote the cluster since it was read, so two racing jobs never both
   get it (the loser sees 409 Conflict and takes another cluster or creates its own).
3. Labels are claims, not proof: a cluster is claimed (or pooled) only if its spec *as stored*
   still hashes to its signature label and its `metadata.generation` is the one stamped at
   creation. A `kubectl edit` of a pooled cluster (the API server bumps the generation), a
   RayCluster labelled by hand, or one built by an operator version whose builders differ
   (its spec no longer hashes to what this version builds) is never handed to a job.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_operator import builders, names
from rlhf_operator.api import GROUP, RLHFJob
from rlhf_operator.api.timestamps import format_time, parse_time
from rlhf_operator.names import LABEL_JOB

LABEL_SIGNATURE = f"{GROUP}/pool-signature"
LABEL_STATE = f"{GROUP}/pool-state"
LABEL_CLAIMED_BY = f"{GROUP}/claimed-by"
ANNOTATION_EXPIRES_AT = f"{GROUP}/pool-expires-at"
ANNOTATION_RELEASED_BY = f"{GROUP}/released-by"
ANNOTATION_GENERATION = f"{GROUP}/pool-generation"
ANNOTATION_POOL = f"{GROUP}/pool"
CREATED_GENERATION = 1
"""The API server gives every new object `metadata.generation: 1` and bumps it on each change
of its spec (never for metadata or status): stamped at creation, it tells a cluster whose spec
was edited since."""

SERVER_DEFAULTS: dict[str, Any] = {"protocol": "TCP", "numOfHosts": 1, "priority": 0}
"""Fields the API server fills in from KubeRay's CRD defaults (ports' protocol, a worker
group's numOfHosts and priority) when we leave them out: dropped, at these values, before
hashing, so a stored spec hashes like the spec built. tests/unit/test_warmpool.py applies the
real CRD's defaults to every built spec and holds this list to them."""

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
_SIGNATURE_CLUSTER_NAME = "pool"  # the name is metadata, not spec: any placeholder will do


# --------------------------------------------------------------------------- the signature


def _hash(value: Any) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:SIGNATURE_LENGTH]


def _without_server_defaults(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_server_defaults(v)
            for k, v in value.items()
            if not (k in SERVER_DEFAULTS and v == SERVER_DEFAULTS[k])
        }
    if isinstance(value, list):
        return [_without_server_defaults(item) for item in value]
    return value


def spec_digest(spec: Mapping[str, Any]) -> str:
    """Hash of a RayCluster spec, the same for the spec built and the spec the API stored."""
    return _hash(_without_server_defaults(spec))


def signature_material(job: RLHFJob) -> dict[str, Any]:
    """Everything that must be equal for two jobs to share a Ray cluster (hashed as is).

    The RayCluster spec the builders make for the job: what the pods run and mount, whoever
    wrote the field (spec.cluster incl. env, envFrom, pull Secrets and head scheduling, storage
    Secret and endpoint, every pvc:// claim the job reads or writes). Plus the namespace (no
    reuse across tenants), the explicit pool name and the
    Kueue queue.
    """
    cluster = builders.build_raycluster(job, _SIGNATURE_CLUSTER_NAME, owner={})
    return {
        "namespace": job.metadata.namespace or "",
        "pool": job.spec.warm_pool.pool,
        # A pooled cluster keeps its Kueue admission (and the quota it holds) in its queue:
        # only a job of the same LocalQueue may take it over.
        "queue": job.spec.cluster.queue_name,
        "rayClusterSpec": spec_digest(cluster["spec"]),
    }


def signature_of(namespace: str, pool: str | None, queue: str | None, digest: str) -> str:
    """The signature of a cluster of `namespace`, `pool` and Kueue `queue` whose spec hashes to
    `digest`."""
    return _hash(
        {"namespace": namespace, "pool": pool or None, "queue": queue, "rayClusterSpec": digest}
    )


def pool_signature(job: RLHFJob) -> str:
    """A stable short hash of `signature_material(job)` (canonical JSON, sha256)."""
    material = signature_material(job)
    return signature_of(
        material["namespace"], material["pool"], material["queue"], material["rayClusterSpec"]
    )


def stamp(manifest: dict[str, Any], job: RLHFJob) -> dict[str, Any]:
    """The RayCluster manifest about to be created, stamped with its signature and generation
    (what a later claim checks it against: module docstring, rule 3)."""
    meta = manifest["metadata"]
    meta["labels"] = {**meta.get("labels", {}), LABEL_SIGNATURE: pool_signature(job)}
    meta["annotations"] = {
        **meta.get("annotations", {}),
        ANNOTATION_GENERATION: str(CREATED_GENERATION),
        ANNOTATION_POOL: job.spec.warm_pool.pool or "",
    }
    return manifest


# --------------------------------------------------------------------------- observing


@dataclass(frozen=True)
class PoolCluster:
    """What the warm pool needs to know of a RayCluster (read from its labels and status)."""

    namespace: str
    name: str
    resource_version: str
    signature: str | None = None
    state: str | None = None  # available | claimed | None (never pooled)
    claimed_by: str | None = None  # uid of the claiming job
    expires_at: datetime | None = None
    released_by: str | None = None  # <namespace>/<job> that used it last
    healthy: bool = False
    owned: bool = False  # has ownerReferences (a job's, not the pool's)
    deleting: bool = False
    generation: int | None = None  # metadata.generation now
    stamped_generation: int | None = None  # ... as stamped at creation
    pool_name: str | None = None
    spec_digest: str | None = None  # of the spec as stored
    queue: str | None = None  # its Kueue LocalQueue label

    @property
    def intact(self) -> bool:
        """Its spec is still the one it was created with (generation unchanged) and still
        hashes to its signature label: not edited, not labelled by hand, not built by other
        builders."""
        return (
            self.stamped_generation is not None
            and self.generation == self.stamped_generation
            and self.spec_digest is not None
            and self.signature
            == signature_of(self.namespace, self.pool_name, self.queue, self.spec_digest)
        )

    def expired(self, now: datetime) -> bool:
        """An available cluster past its expiry (or with no readable expiry: never claimable)."""
        if self.state != STATE_AVAILABLE:
            return False
        return self.expires_at is None or self.expires_at <= now

    def seconds_to_expiry(self, now: datetime) -> float:
        """Seconds until it expires (0 once it has, or when it has no expiry)."""
        if self.expires_at is None:
            return 0.0
        return max((self.expires_at - now).total_seconds(), 0.0)

    def claimable(self, signature: str, now: datetime) -> bool:
        """Available for `signature`: intact, unexpired, healthy, owned by nobody, not being
        deleted."""
        return (
            self.signature == signature
            and self.intact
            and self.state == STATE_AVAILABLE
            and not self.expired(now)
            and self.healthy
            and not self.owned
            and not self.deleting
        )

    def claimed_by_job(self, uid: str | None) -> bool:
        """Claimed out of the pool by the job with this uid (and not being deleted)."""
        return uid is not None and self.claimed_by == uid and not self.deleting


def observe(body: Mapping[str, Any]) -> PoolCluster:
    """Read a RayCluster manifest (as listed or watched) into a `PoolCluster`."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    spec = body.get("spec")
    return PoolCluster(
        namespace=meta.get("namespace") or "",
        name=meta.get("name") or "",
        resource_version=str(meta.get("resourceVersion") or ""),
        signature=labels.get(LABEL_SIGNATURE),
        state=labels.get(LABEL_STATE),
        claimed_by=labels.get(LABEL_CLAIMED_BY),
        expires_at=parse_time(annotations.get(ANNOTATION_EXPIRES_AT)),
        released_by=annotations.get(ANNOTATION_RELEASED_BY),
        healthy=is_healthy(body),
        owned=bool(meta.get("ownerReferences")),
        deleting=bool(meta.get("deletionTimestamp")),
        generation=_int(meta.get("generation")),
        stamped_generation=_int(annotations.get(ANNOTATION_GENERATION)),
        pool_name=annotations.get(ANNOTATION_POOL),
        spec_digest=spec_digest(spec) if isinstance(spec, Mapping) else None,
        queue=labels.get(names.LABEL_KUEUE_QUEUE),
    )


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def is_healthy(body: Mapping[str, Any]) -> bool:
    """Up now (KubeRay state `ready`), not being deleted, and no condition says otherwise."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return False
    status = body.get("status") or {}
    if status.get("state") != RAY_CLUSTER_READY:
        return False
    return not any(
        _UNHEALTHY_CONDITIONS.get(c.get("type")) == c.get("status")
        for c in status.get("conditions") or []
    )


# --------------------------------------------------------------------------- deciding


def cluster_at_fault(reason: str | None) -> bool:
    """Whether a failed stage RayJob failed because of its cluster (KubeRay's `status.reason`)."""
    return reason in CLUSTER_FAULT_REASONS


def is_poolable(
    *, healthy: bool, failed_by_cluster: bool, intact: bool = True, room: bool = True
) -> bool:
    """May the cluster of a job that is done with it go into the pool?

    Never a cluster that is unhealthy or that made the job fail, one whose spec changed since
    it was created (`PoolCluster.intact`), nor one beyond the namespace's pool size (`room`).
    A job that failed for its own reasons (a stage exited non-zero, a deadline) leaves a good
    cluster behind: pooled like a succeeded job's. The caller also waits until no stage RayJob
    of the job still runs on it.
    """
    return healthy and not failed_by_cluster and intact and room


def tampered(clusters: Iterable[PoolCluster], signature: str) -> list[PoolCluster]:
    """Available clusters labelled with `signature` that fail the integrity check (rule 3)."""
    return sorted(
        (
            c
            for c in clusters
            if c.signature == signature and c.state == STATE_AVAILABLE and not c.intact
        ),
        key=lambda c: c.name,
    )


def candidates(clusters: Iterable[PoolCluster], signature: str, now: datetime) -> list[PoolCluster]:
    """The clusters a job with `signature` may claim, best first.

    The one closest to expiry comes first (it is saved from deletion; fresher ones stay
    claimable longer), then by name, so every reconcile ranks them the same way.
    """
    usable = [c for c in clusters if c.claimable(signature, now)]
    return sorted(usable, key=lambda c: (c.expires_at or now, c.name))


def choose_candidate(
    clusters: Iterable[PoolCluster], signature: str, now: datetime
) -> PoolCluster | None:
    """The best cluster to claim (see `candidates`), or None: the job creates its own."""
    ranked = candidates(clusters, signature, now)
    return ranked[0] if ranked else None


def expired_clusters(clusters: Iterable[PoolCluster], now: datetime) -> list[PoolCluster]:
    """Available clusters whose time is up (the expiry sweep deletes them), by name."""
    return sorted((c for c in clusters if c.expired(now) and not c.deleting), key=lambda c: c.name)


def next_expiry(clusters: Iterable[PoolCluster], now: datetime) -> float | None:
    """Seconds until the next available cluster expires (None: no available cluster)."""
    waits = [
        c.seconds_to_expiry(now) for c in clusters if c.state == STATE_AVAILABLE and not c.deleting
    ]
    return min(waits) if waits else None


# --------------------------------------------------------------------------- patches


def release_patch(
    job_meta: Mapping[str, Any],
    signature: str,
    keep_alive_seconds: int,
    now: datetime,
    job_pool: str | None = None,
) -> dict[str, Any]:
    """Merge-patch that moves a finished job's cluster into the pool.

    Ownership leaves the job (deleting the job no longer deletes the cluster), the job label
    goes, and the cluster is labelled with the signature, `available`, and its expiry.
    The pod template is not touched: by rule 1 (module docstring) it holds nothing job-specific.
    """
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
                ANNOTATION_POOL: job_pool or "",
                ANNOTATION_EXPIRES_AT: format_time(deadline),
                ANNOTATION_RELEASED_BY: f"{job_meta.get('namespace', '')}/{job_meta['name']}",
            },
        }
    }


def claim_patch(resource_version: str, job_meta: Mapping[str, Any]) -> dict[str, Any]:
    """Merge-patch that claims a pool cluster for a job, atomically.

    It carries the cluster's `metadata.resourceVersion` as it was read: if anyone (another job's
    claim, the expiry sweep) wrote the cluster since, the API server answers 409 Conflict and
    applies nothing.
    """
    return {
        "metadata": {
            "resourceVersion": resource_version,
            "ownerReferences": [builders.owner_reference(dict(job_meta))],
            "labels": {
                LABEL_JOB: job_meta["name"],
                LABEL_STATE: STATE_CLAIMED,
                LABEL_CLAIMED_BY: job_meta["uid"],
            },
            "annotations": {ANNOTATION_EXPIRES_AT: None},
        }
    }


def delete_options(cluster: PoolCluster) -> dict[str, Any]:
    """DeleteOptions: delete an expired pool cluster only if nobody claimed it meanwhile."""
    return {"preconditions": {"resourceVersion": cluster.resource_version}}
