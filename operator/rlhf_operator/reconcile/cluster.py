"""The job's RayCluster, as the state machine sees it: acquire, ensure, release (pure).

Acquire: claim a warm cluster from the pool (`warmpool`), else create the job's own. Ensure:
the cluster named in status exists, is the job's and is ready (a lost claim is given up, a
cluster missing is recreated). Release: a job done with its cluster hands a healthy one to the
warm pool, or deletes it. Each records what it does in the draft (status first: the driver
writes it before it acts), so a restart finds the cluster being claimed or created, and only it.
"""

from __future__ import annotations

import enum
from datetime import timedelta

from rlhf_operator import builders, names, tenancy, warmpool
from rlhf_operator.api import is_terminal
from rlhf_operator.api.status import ClusterStatus
from rlhf_operator.reconcile import kuberay
from rlhf_operator.reconcile.conditions import get_condition, parse_time, timestamp
from rlhf_operator.reconcile.draft import Draft
from rlhf_operator.reconcile.model import (
    ClaimCluster,
    ClusterObservation,
    CreateCluster,
    CreateNetworkPolicy,
    DeleteCluster,
    ReleaseCluster,
)

CLUSTER_PROVISIONING = "ClusterProvisioning"
CLUSTER_TERMINATING = "ClusterTerminating"
CLUSTER_RELEASED = "ClusterReleased"
CLUSTER_CLAIMING = "ClusterClaiming"
STOP_GRACE = timedelta(seconds=60)
"""How long a deleted job waits for its running stage to stop before its cluster can go to the
warm pool; past it, the cluster is deleted instead (a stuck RayJob must not hold the deletion)."""


class Readiness(enum.Enum):
    """What `ensure_cluster` found."""

    READY = "Ready"
    WAITING = "Waiting"  # being claimed, created, deleted or provisioned: come back later
    CONFLICT = "Conflict"  # its name is taken by a RayCluster that is not the job's: wait
    TIMED_OUT = "TimedOut"  # not ready within spec.cluster.provisionTimeoutSeconds
    UNAUTHENTICATED = "Unauthenticated"  # stored without spec.authOptions: KubeRay too old


# --------------------------------------------------------------------------- acquire


def acquire_cluster(d: Draft, *, passed_over: str | None = None) -> None:
    """Give the job a cluster: claim a warm one from the pool, else create its own.

    Either way its name goes into status first (the driver writes status before it acts), so
    after a restart the job finds the cluster it was claiming or creating, and only that one.
    `passed_over`: a pool cluster just found claimed by another job (the index may still list it).
    """
    pool = [c for c in d.observed.pool if c.name != passed_over]
    signature = warmpool.pool_signature(d.job)
    for forged in warmpool.tampered(pool, signature):
        d.warning(
            names.WARM_POOL_TAMPERED,
            f"Warm RayCluster {forged.name} carries this job's pool signature, but its spec is "
            "not the one it was created with (edited since, labelled by hand, or built by "
            "another operator version): not claimed. Delete it if nobody needs it.",
        )
    candidate = warmpool.choose_candidate(pool, signature, d.now)
    if candidate is not None and d.uid:
        _claim(d, candidate)
        return
    name = _own_cluster_name(d)
    d.status.cluster = ClusterStatus(
        name=name, reused=False, dashboard_url=builders.dashboard_url(name, d.namespace)
    )
    d.actions.append(CreateCluster(_built(d, name)))
    d.normal(names.CLUSTER_CREATED, f"Creating RayCluster {name}.")
    pooling = d.job.spec.warm_pool
    if pooling.keep_alive_seconds or pooling.pool:
        d.normal(names.WARM_POOL_MISS, f"No warm RayCluster matches this job; creating {name}.")


def _built(d: Draft, name: str) -> dict:
    """The job's RayCluster, stamped for the warm pool's integrity check."""
    return warmpool.stamp(builders.build_raycluster(d.job, name, d.owner()), d.job)


def _claim(d: Draft, cluster: warmpool.PoolCluster) -> None:
    """Record the warm cluster in status, then claim it (resourceVersion precondition)."""
    d.status.cluster = ClusterStatus(
        name=cluster.name,
        reused=True,
        dashboard_url=builders.dashboard_url(cluster.name, d.namespace),
    )
    job_meta = {"name": d.name, "namespace": d.namespace, "uid": d.uid}
    d.actions.append(
        ClaimCluster(cluster.name, warmpool.claim_patch(cluster.resource_version, job_meta))
    )
    message = f"Claiming warm RayCluster {cluster.name}."
    d.condition(names.COND_CLUSTER_READY, False, CLUSTER_CLAIMING, message)


def _own_cluster_name(d: Draft) -> str:
    """`<job>-ray`, unless a warm-pool cluster holds that name (left by an earlier job of the
    same name, now serving another job or waiting in the pool): then `<job>-<uid>-ray`."""
    name = names.cluster_name(d.name)
    taken = d.observed.cluster
    if taken is not None and taken.name == name and _pool_squatter(d, taken) and d.uid:
        return names.cluster_name(f"{d.name}-{d.uid[:5]}")
    return name


def _pool_squatter(d: Draft, cluster: ClusterObservation) -> bool:
    """A cluster at our own name that went through a warm pool and is not ours."""
    return (
        cluster.pool is not None
        and cluster.pool.state is not None
        and not cluster.owned_by(d.name, d.uid)
    )


def _reclaim(d: Draft, cluster: ClusterObservation | None) -> None:
    """The recorded warm cluster is not claimed by us yet: claim it again, or pick another.

    Our claim may not have landed (a restart, a stale version); if the cluster is still
    claimable, claim it with its current version. If another job got it, or it expired, broke
    or went away, give it up and acquire again (another warm cluster or our own).
    """
    pool = cluster.pool if cluster is not None else None
    if (
        cluster is not None
        and pool is not None
        and d.uid
        and not cluster.deleting
        and pool.claimable(warmpool.pool_signature(d.job), d.now)
    ):
        _claim(d, pool)
        return
    d.status.cluster = ClusterStatus()
    acquire_cluster(d, passed_over=d.observed.cluster.name if d.observed.cluster else None)


# --------------------------------------------------------------------------- ensure


def ensure_cluster(d: Draft) -> Readiness:
    """READY when the recorded cluster is ours and ready; else create it or wait for it
    (WAITING), or CONFLICT: its name is taken by a cluster that is not the job's (never
    adopted nor deleted: the caller waits for it to go), or TIMED_OUT: the job has waited
    `spec.cluster.provisionTimeoutSeconds` for a ready cluster (the caller fails it).

    `status.cluster.waitingSince` records when the wait began; it is cleared once ready.
    """
    since = d.status.cluster.waiting_since
    readiness = _ensure(d)
    if readiness is Readiness.UNAUTHENTICATED:
        return readiness
    if readiness is Readiness.READY:
        d.status.cluster.waiting_since = None
        return readiness
    d.status.cluster.waiting_since = since or timestamp(d.now)
    timeout = timedelta(seconds=d.job.spec.cluster.provision_timeout_seconds)
    started = parse_time(since)
    if started is not None and d.now - started >= timeout:
        return Readiness.TIMED_OUT
    return readiness


def _ensure(d: Draft) -> Readiness:
    name = d.status.cluster.name
    cluster = d.observed.cluster
    if name is None:
        acquire_cluster(d)
        return Readiness.WAITING
    if d.status.cluster.reused and (cluster is None or not cluster.owned_by(d.name, d.uid)):
        _reclaim(d, cluster)
        return Readiness.WAITING
    if cluster is None:
        d.actions.append(CreateCluster(_built(d, name)))
        d.condition(names.COND_CLUSTER_READY, False, CLUSTER_PROVISIONING, f"Creating {name}.")
        return Readiness.WAITING
    if not cluster.owned_by(d.name, d.uid) and _pool_squatter(d, cluster) and d.uid:
        # A warm-pool cluster took our name before ours existed: create ours under another.
        d.status.cluster.name = None
        acquire_cluster(d)
        return Readiness.WAITING
    if not cluster.owned_by(d.name, d.uid):
        owners = ", ".join(cluster.owner_uids) or "none"
        message = (
            f"Waiting for RayCluster {name} to go: it exists but is not this RLHFJob's "
            f"(owner uids: {owners}; this job's: {d.uid}), e.g. left by an earlier RLHFJob of "
            "the same name that the garbage collector has not removed yet. If it stays, delete "
            "it or give this job another name."
        )
        current = get_condition(d.status, names.COND_CLUSTER_READY)
        if current is None or current.reason != names.CLUSTER_CONFLICT:
            d.warning(names.CLUSTER_CONFLICT, message)
        d.condition(names.COND_CLUSTER_READY, False, names.CLUSTER_CONFLICT, message)
        d.status.message = message
        return Readiness.CONFLICT
    if cluster.auth_mode != builders.AUTH_MODE_TOKEN and not cluster.deleting:
        # The API server prunes fields its CRD does not know: a KubeRay older than 1.5.1
        # dropped authOptions, and the cluster would run with open dashboard and GCS ports.
        return Readiness.UNAUTHENTICATED
    if cluster.deleting:
        d.condition(
            names.COND_CLUSTER_READY,
            False,
            CLUSTER_TERMINATING,
            f"Waiting for the previous RayCluster {name} to be deleted.",
        )
        return Readiness.WAITING
    if not cluster.ready:
        message = (
            f"Waiting for RayCluster {name} to be ready (state: {cluster.state or 'none yet'}"
            + (f"; {cluster.why}" if cluster.why else "")
            + ")."
        )
        d.condition(names.COND_CLUSTER_READY, False, CLUSTER_PROVISIONING, message)
        if d.status.phase == "Provisioning":
            d.status.message = message  # `kubectl get rlhf` shows it (the MESSAGE column)
        return Readiness.WAITING
    return Readiness.READY


# --------------------------------------------------------------------------- release


def release_cluster(d: Draft, *, announce: bool = True) -> None:
    """The job is done with its cluster (finished, failed, suspended, deleted).

    A job with `spec.warmPool.keepAliveSeconds` that ended (finished or deleted) hands a healthy
    cluster to the warm pool, once no stage of it runs there any more; any other cluster, one
    that is unhealthy or that made the job fail, and a suspended job's, is deleted. Called on
    every reconcile of a finished job while the cluster is still ours, so a failed write is
    retried; `announce` is False on those repeats.
    """
    cluster = d.observed.cluster
    if cluster is None or cluster.deleting or not cluster.owned_by(d.name, d.uid):
        return
    spec = getattr(d.job, "spec", None)  # absent when a job with a broken spec is deleted
    keep_alive = spec.warm_pool.keep_alive_seconds if spec is not None else 0
    ended = d.deleting or is_terminal(d.status.phase)
    if keep_alive and ended and cluster.pool is not None:
        rayjob = d.observed.rayjob
        stage_running = rayjob is not None and not kuberay.is_finished(rayjob)
        if stage_running and not d.deleting:
            return  # being stopped (machine._stop_rayjob): pool the cluster once it is free
        since = d.deleting_since or d.now
        if stage_running and d.now - since < STOP_GRACE:
            d.wait = f"waiting for RayJob {rayjob.name} to stop before pooling {cluster.name}"
            return
        failed_by_cluster = (
            d.status.phase == "Failed"
            and rayjob is not None
            and warmpool.cluster_at_fault(rayjob.reason)
        )
        room = d.observed.pooled_in_namespace < tenancy.MAX_POOLED_CLUSTERS
        if not stage_running and warmpool.is_poolable(
            healthy=cluster.pool.healthy,
            failed_by_cluster=failed_by_cluster,
            intact=cluster.pool.intact,
            room=room,
        ):
            _pool(d, cluster.name, keep_alive, announce)
            return
        why = "" if stage_running else _why_not_pooled(d, cluster.pool, room)
    else:
        why = ""
    d.actions.append(DeleteCluster(cluster.name))
    d.condition(names.COND_CLUSTER_READY, False, CLUSTER_RELEASED, f"{cluster.name} released{why}.")
    if announce:
        d.normal(names.CLUSTER_DELETED, f"Deleting RayCluster {cluster.name}{why}.")


def _why_not_pooled(d: Draft, pool: warmpool.PoolCluster, room: bool) -> str:
    """The tenancy reasons a pool-bound cluster is deleted instead (said in its message)."""
    if not room:
        return (
            f" (the namespace holds {d.observed.pooled_in_namespace} warm clusters already: "
            "the operator's maxPooledClusters)"
        )
    if not pool.intact:
        return " (its spec changed since it was created: never pooled)"
    return ""


def _pool(d: Draft, name: str, keep_alive: int, announce: bool) -> None:
    job_meta = {"name": d.name, "namespace": d.namespace, "uid": d.uid}
    patch = warmpool.release_patch(
        job_meta, warmpool.pool_signature(d.job), keep_alive, d.now, d.job.spec.warm_pool.pool
    )
    d.actions.append(ReleaseCluster(name, patch))
    message = f"{name} released to the warm pool for {keep_alive}s."
    d.condition(names.COND_CLUSTER_READY, False, CLUSTER_RELEASED, message)
    if announce:
        d.normal(names.CLUSTER_POOLED, message)


# --------------------------------------------------------------------------- network policy


def ensure_network_policy(d: Draft) -> None:
    """Create the recorded cluster's NetworkPolicy unless it exists (409 = there already).

    Owned by the RayCluster (it needs the cluster's uid, so it follows the cluster's creation)
    and so deleted with it, and kept with it in the warm pool. Called when a stage is about to
    start on the cluster: a claimed warm cluster has one already, and the 409 is the answer.
    """
    cluster = d.observed.cluster
    if not tenancy.NETWORK_POLICIES or cluster is None or not cluster.uid:
        return
    manifest = builders.build_network_policy(
        cluster.name, d.namespace, cluster.uid, tenancy.RAY_CLIENT_NAMESPACES
    )
    d.actions.append(CreateNetworkPolicy(manifest))
