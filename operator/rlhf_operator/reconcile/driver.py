"""The driver: observe -> decide (machine) -> write status -> act -> announce.

This is where the pure state machine meets the API. Order matters and is the crash-safety
argument: the pinned spec and the new status (with the names of the children about to exist)
are written first, and only then are children created; children are created "if absent", so
repeating any step after a crash is harmless. All API calls go through `rlhf_operator.kube`;
Events go through the `post` callable (kopf's event poster in production).

Stale reads: kopf hands the timer the job as its watch last saw it, which can lag behind the
operator's own last write. A decision made on such a copy must not land: the status patch is a
diff against the status that was read, so merged onto a newer one it could leave a mix of both
(e.g. our own new cluster marked `reused`), and its transition (events, metrics, children)
was already made by the write the copy does not show yet. So the writes carry the job's
resourceVersion as a precondition; a 409 means "decided on an old copy": nothing is done, and
the reconcile reads the job as stored and decides again (kopf's own bookkeeping writes, e.g.
its finalizer, race a new job's first reconcile: waiting for the next tick would cost a whole
interval). A decision that leaves status as it was writes nothing, so nothing checks its copy:
it only re-ensures what that status records.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from rlhf_operator import kube, metrics, names, settings, warmpool
from rlhf_operator.api import RLHFJob, RLHFJobStatus
from rlhf_operator.api.job import ObjectMeta
from rlhf_operator.reconcile import kuberay, machine, progress
from rlhf_operator.reconcile.conditions import parse_time, status_patch
from rlhf_operator.reconcile.model import (
    ClaimCluster,
    ClusterObservation,
    CreateCluster,
    CreateNetworkPolicy,
    CreateProgress,
    CreateRayJob,
    Decision,
    DeleteCluster,
    DeleteJob,
    DeleteRayJob,
    Event,
    Observed,
    PinSpec,
    RayJobObservation,
    ReleaseCluster,
)
from rlhf_operator.reconcile.unseen import Unseen
from rlhf_operator.validation import validate

logger = logging.getLogger(__name__)

PostEvent = Callable[[Mapping[str, Any], Event], None]
Index = Mapping[tuple[str | None, str | None], Iterable[Any]]
"""kopf's in-memory index shape: (namespace, name) -> the observations of that object (the
warm-pool index is keyed by (namespace, pool signature) instead)."""

PINNED_FIELDS = ("stages", "cluster")
CONFLICT_RETRIES = 3
"""Decisions re-made on the job as re-read after a conflicting write, per reconcile."""


class StaleJob(Exception):
    """The job changed since the copy a decision was made on was read (a write got 409), or
    it is gone (404)."""


def snapshot(body: Mapping[str, Any]) -> dict[str, Any]:
    """A private copy of kopf's live body: the watcher replaces it while a worker thread reads."""
    return copy.deepcopy(dict(body))


def _first(index: Index, namespace: str | None, name: str | None) -> Any:
    if name is None:
        return None
    return next(iter(index.get((namespace, name), ())), None)


def observe(
    namespace: str | None,
    status: RLHFJobStatus,
    clusters: Index,
    rayjobs: Index,
    job: str,
    pool: Iterable[warmpool.PoolCluster] = (),
    pooled_in_namespace: int = 0,
) -> Observed:
    """The job's children as the indexes last saw them (the cluster named in status, else the
    deterministic one, the current attempt's RayJob and the earlier attempts' that remain), and
    the warm clusters it may claim. Found by name; whether each is the job's is the machine's
    question (its owner uids)."""
    cluster_name = status.cluster.name or names.cluster_name(job)
    stage = status.stages.get(status.stage or "")
    cluster: ClusterObservation | None = _first(clusters, namespace, cluster_name)
    rayjob: RayJobObservation | None = _first(rayjobs, namespace, stage and stage.ray_job)
    earlier = [
        _first(rayjobs, namespace, names.rayjob_name(job, name, attempt))
        for name, st in status.stages.items()
        for attempt in range(1, st.attempts + 1)
        if names.rayjob_name(job, name, attempt) != (stage and stage.ray_job)
    ]
    return Observed(
        cluster=cluster,
        rayjob=rayjob,
        pool=tuple(pool),
        pooled_in_namespace=pooled_in_namespace,
        earlier=tuple(r for r in earlier if r is not None),
    )


def _pool_of(pool: Index | None, job: RLHFJob) -> Iterable[warmpool.PoolCluster]:
    """The available warm clusters with the job's signature (the claim re-checks everything)."""
    if not pool:
        return ()
    return pool.get((job.metadata.namespace, warmpool.pool_signature(job)), ())


def _pooled_in(pool: Index | None, namespace: str | None) -> int:
    """Available warm clusters of any signature in `namespace` (for maxPooledClusters)."""
    if not pool:
        return 0
    return sum(len(list(pool.get(key, ()))) for key in list(pool) if key[0] == namespace)


def _pinnable(spec: Mapping[str, Any]) -> dict[str, Any]:
    return {key: spec.get(key) for key in PINNED_FIELDS}


def starts_over(body: Mapping[str, Any]) -> bool:
    """The job (re)starts from scratch on this reconcile: it never started (Pending), or it
    failed on an invalid spec that was since edited (`machine.reconcile` starts it over)."""
    status = RLHFJobStatus.model_validate(body.get("status") or {})
    if status.phase == "Pending":
        return True
    valid = next((c for c in status.conditions if c.type == names.COND_VALID), None)
    return (
        status.phase == "Failed"
        and valid is not None
        and valid.status == "False"
        and (body.get("metadata") or {}).get("generation") != status.observed_generation
    )


def effective_manifest(body: Mapping[str, Any]) -> tuple[dict[str, Any], bool, str | None]:
    """The manifest the job runs with: its live spec, but the stages and cluster it started with.

    Returns (manifest, whether the live stages/cluster differ from the pinned ones, the pin to
    record when there is none yet). A job that starts over is pinned again, to its live spec:
    a job fixed after it failed rebuilds from the fixed spec, not from the one it failed with.
    """
    meta = body.get("metadata") or {}
    spec = dict(body.get("spec") or {})
    pinned = (meta.get("annotations") or {}).get(names.ANNOTATION_PINNED_SPEC)
    manifest = {k: v for k, v in body.items() if k != "status"}
    if pinned is None or starts_over(body):
        return {**manifest, "spec": spec}, False, json.dumps(_pinnable(spec), sort_keys=True)
    started_with = json.loads(pinned)
    changed = started_with != _pinnable(spec)
    spec.update({k: v for k, v in started_with.items() if v is not None})
    return {**manifest, "spec": spec}, changed, None


def decide(
    body: Mapping[str, Any],
    clusters: Index,
    rayjobs: Index,
    now: datetime,
    pool: Index | None = None,
    reports: Index | None = None,
) -> tuple[RLHFJobStatus, Decision]:
    """Validate and run the state machine (no I/O): (the status read, the decision).

    `reports`: the RLHFJobProgress index; the job's trainer report is mirrored into the
    status the machine starts from (progress fields only: reconcile/progress.py).

    A job being deleted is the finalizer's (`finalize_job`): decide leaves it as it is, so a
    timer tick racing the deletion never creates a child or a retry for it.
    """
    meta = body.get("metadata") or {}
    status = RLHFJobStatus.model_validate(body.get("status") or {})
    if meta.get("deletionTimestamp"):
        return status, Decision(status=status.model_copy(deep=True))
    generation = meta.get("generation")
    manifest, changed, pin = effective_manifest(body)
    job, problems = validate(manifest)
    if job is None:
        return status, machine.reject(status, problems, now, generation)
    observed = observe(
        meta.get("namespace"),
        status,
        clusters,
        rayjobs,
        job.metadata.name,
        _pool_of(pool, job),
        _pooled_in(pool, meta.get("namespace")),
    )
    report = _first(reports or {}, meta.get("namespace"), job.metadata.name)
    reported = progress.mirror(
        status, report, meta.get("uid"), job.spec.enabled_stages(), progress.judge_name(job)
    )
    decision = machine.reconcile(
        job, reported, observed, now, generation=generation, spec_changed=changed, pinned_spec=pin
    )
    return status, decision


def reconcile_job(
    body: Mapping[str, Any],
    clusters: Index,
    rayjobs: Index,
    post: PostEvent,
    now: datetime | None = None,
    pool: Index | None = None,
    reports: Index | None = None,
    unseen: Unseen | None = None,
) -> Decision | None:
    """One reconcile of one RLHFJob (its kopf daemon calls this when woken): the decision
    carried out, or None when none was (the job is gone, or kept changing under it: the next
    tick decides).

    `body` is the watch's copy; when a write finds the job changed since (409), the decision is
    dropped and made again on the job as stored. `unseen`: the children this operator created
    that the indexes do not show yet (reconcile/unseen.py); they count as observed, and the
    ones this reconcile creates are added.
    """
    now = now or datetime.now(UTC)
    meta = body.get("metadata") or {}
    namespace, name = meta.get("namespace"), meta.get("name")
    for _ in range(1 + CONFLICT_RETRIES):
        if unseen is not None:
            clusters = unseen.overlay(names.RAYCLUSTERS, clusters)
            rayjobs = unseen.overlay(names.RAYJOBS, rayjobs)
        try:
            return _reconcile_once(body, clusters, rayjobs, post, now, pool, reports, unseen)
        except StaleJob:
            logger.info("RLHFJob %s/%s changed since read; reading it again", namespace, name)
            fresh = kube.get_job(namespace, name)
            if fresh is None:
                return None
            body = fresh
    logger.info("RLHFJob %s/%s kept changing; deciding again on the next tick", namespace, name)
    return None


def _reconcile_once(
    body: Mapping[str, Any],
    clusters: Index,
    rayjobs: Index,
    post: PostEvent,
    now: datetime,
    pool: Index | None,
    reports: Index | None = None,
    unseen: Unseen | None = None,
) -> Decision:
    """Decide and carry out, once (`StaleJob` when `body` is older than the stored job).

    A warm cluster claimed in this reconcile is ready now: the job decides once more with it,
    so its first stage starts at once instead of a timer tick later (the warm pool's point).
    """
    clusters = explain_waiting(body, clusters, now)
    status, decision = decide(body, clusters, rayjobs, now, pool, reports)
    body, claimed = apply(body, status, decision, post, now, unseen)
    if claimed is None:
        return decision
    clusters = {**clusters, (claimed.pool.namespace, claimed.name): (claimed,)}
    status, decision = decide(body, clusters, rayjobs, now, pool, reports)
    apply(body, status, decision, post, now, unseen)
    return decision


def explain_waiting(body: Mapping[str, Any], clusters: Index, now: datetime | None = None) -> Index:
    """The clusters index, with what the pods say about the job's cluster while the job waits
    for it to be ready (only then: a list of its pods, and of Warning Events for at most
    `kuberay.EXPLAINED_PODS` of them). KubeRay's conditions name few reasons (an unschedulable
    GPU worker leaves its head ready); the scheduler and the kubelet say the rest.

    Only once the cluster has waited `settings.EXPLAIN_INTERVAL`: a cluster just created has
    no pod worth explaining yet, and a fleet of jobs applied at once must not cost a pod list
    each before their clusters come up (the loop wakes at that interval while waiting)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    namespace, name = meta.get("namespace"), (status.get("cluster") or {}).get("name")
    if status.get("phase") != "Provisioning" or not name or meta.get("deletionTimestamp"):
        return clusters
    since = parse_time((status.get("cluster") or {}).get("waitingSince"))
    # waitingSince has whole seconds: a wake-up one interval later may read as a second short
    waited = ((now or datetime.now(UTC)) - since).total_seconds() + 1 if since else None
    if waited is not None and waited < settings.EXPLAIN_INTERVAL:
        return clusters
    cluster: ClusterObservation | None = _first(clusters, namespace, name)
    if (
        cluster is None
        or cluster.ready
        or cluster.deleting
        or not cluster.owned_by(meta.get("name", ""), meta.get("uid"))
    ):
        return clusters
    problem = _pod_problem(namespace, name)
    if problem is None:
        return clusters
    return {**clusters, (namespace, name): (dataclasses.replace(cluster, pod_problem=problem),)}


_explained: dict[tuple[str | None, str], tuple[float, str | None]] = {}
"""(namespace, cluster) -> (when its pods were last read, what they said): a process-local
cache, so a waiting cluster's pods are read every `settings.EXPLAIN_INTERVAL`, not every tick."""


def _pod_problem(namespace: str | None, name: str) -> str | None:
    now = time.monotonic()
    key = (namespace, name)
    if key in _explained and now - _explained[key][0] < settings.EXPLAIN_INTERVAL:
        return _explained[key][1]
    for old in [
        k for k, (at, _) in _explained.items() if now - at > 10 * settings.EXPLAIN_INTERVAL
    ]:
        _explained.pop(old, None)
    try:
        pods = kube.list_cluster_pods(namespace, name)
        warnings = {p: kube.list_pod_warnings(namespace, p) for p in kuberay.pods_to_explain(pods)}
    except ApiException as exc:  # e.g. 403 from an older chart's RBAC: the wait goes on unexplained
        logger.info(
            "cannot read the pods of RayCluster %s/%s: HTTP %s", namespace, name, exc.status
        )
        return None
    problem = kuberay.pod_problem(pods, warnings)
    _explained[key] = (now, problem)
    return problem


def apply(
    body: Mapping[str, Any],
    status: RLHFJobStatus,
    decision: Decision,
    post: PostEvent,
    now: datetime,
    unseen: Unseen | None = None,
) -> tuple[Mapping[str, Any], ClusterObservation | None]:
    """Carry out a decision: pin, write status, act, announce — in that order.

    Returns the job as the API now holds it (the answer to the last write of it, else `body`)
    and the warm cluster this decision claimed, as the API answered (None: no claim).
    Raises `StaleJob`, having done nothing, when `body` is older than the stored job.
    Its writes of the job and the RayClusters and RayJobs it creates are recorded in `unseen`,
    when given.
    """
    meta = body["metadata"]
    namespace, name = meta.get("namespace"), meta["name"]

    def written(stored: Mapping[str, Any] | None, read: Mapping[str, Any]) -> Mapping[str, Any]:
        if stored is None:
            return read
        if unseen is not None:
            unseen.job_written(read, stored)
            writes.append(stored)
        return stored

    writes: list[Mapping[str, Any]] = []
    as_decided = True  # every action did what the decision expected (no 409, no lost claim)

    for action in decision.actions:
        if isinstance(action, PinSpec):
            pin = {names.ANNOTATION_PINNED_SPEC: action.pinned}
            body = written(
                _unless_stale(kube.annotate_job, namespace, name, pin, _version(body)), body
            )
    body = written(write_status(namespace, name, status, decision.status, body), body)
    claimed: ClusterObservation | None = None
    for action in decision.actions:
        try:
            done, result = _act(namespace, name, action, unseen)
            as_decided &= done
            if isinstance(action, ClaimCluster) and result is not None:
                claimed = kuberay.observe_cluster(result)
        except ApiException as exc:
            if exc.status != 422 or not isinstance(action, CreateCluster | CreateRayJob):
                raise
            # The API server (or KubeRay's webhook) refused a manifest we built from the spec:
            # a spec problem validation did not catch. Fail the job with the server's words.
            kind = "RayCluster" if isinstance(action, CreateCluster) else "RayJob"
            refused = machine.reject(
                decision.status,
                [f"The API server rejected {kind} {action.name}: {_api_message(exc)}"],
                now,
                meta.get("generation"),
            )
            body = written(
                write_status(namespace, name, decision.status, refused.status, body), body
            )
            decision.events.extend(refused.events)
            as_decided = False
            break
    if writes and not as_decided and unseen is not None:
        # The job as written is not what a reconcile of it would decide again (a child at our
        # name that is not the one we made, a lost claim): decide again, as the write's watch
        # event would have made it (it does not wake the job: handlers.job_changed).
        unseen.unsettled(writes[-1])
    for event in decision.events:
        post(body, event)
    return body, claimed


def write_status(
    namespace: str | None,
    name: str,
    old: RLHFJobStatus,
    new: RLHFJobStatus,
    body: Mapping[str, Any],
) -> Mapping[str, Any] | None:
    """The one place the operator writes RLHFJob status: only what changed, if anything did,
    and only onto the job `body` it was read from (`StaleJob` otherwise).

    Every write (and every unchanged tick) feeds the Prometheus metrics, derived from old -> new.
    Returns the job as stored after the write (None: nothing to write).
    """
    patch = status_patch(old, new)
    written = None
    if patch:
        written = _unless_stale(kube.patch_job_status, namespace, name, patch, _version(body))
    metrics.observe_transition(old, new, body)
    return written


def _version(body: Mapping[str, Any]) -> str | None:
    return (body.get("metadata") or {}).get("resourceVersion")


def _unless_stale(write: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """A conditional write of the job; StaleJob when the job changed since it was read (409)
    or is gone (404)."""
    try:
        return write(*args)
    except ApiException as exc:
        if exc.status in (404, 409):
            raise StaleJob(str(exc.reason)) from exc
        raise


def _record_create(
    unseen: Unseen | None,
    child: tuple[str, str | None, str],
    job: str,
    created: dict[str, Any] | None,
    new: bool,
    observe: Callable[[dict[str, Any]], Any],
) -> bool:
    """Remember a create's outcome (`child`: kind, namespace, name): a new child stands in for
    its watched object until the watch shows it; one found there already (409) makes job `job`
    await that child's next change. Returns whether the create made it."""
    if unseen is not None and new and created:
        unseen.created(*child, observe(created))
    elif unseen is not None and not new:
        unseen.await_change(*child, job)
    return new


def _act(
    namespace: str | None, name: str, action: Any, unseen: Unseen | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """Carry out one action: (whether it did what was decided, the claimed cluster if any).
    A create that finds its child there already (409) or a lost claim did not."""
    match action:
        case CreateCluster(manifest=manifest):
            created, new = kube.create_raycluster(manifest)
            child = (names.RAYCLUSTERS, namespace, action.name)
            return _record_create(unseen, child, name, created, new, kuberay.observe_cluster), None
        case ClaimCluster(name=cluster, patch=patch):
            claimed = _claim(namespace, cluster, patch)
            if claimed is None and unseen is not None:
                unseen.await_change(names.RAYCLUSTERS, namespace, cluster, name)
            return claimed is not None, claimed
        case ReleaseCluster(name=cluster, patch=patch):
            try:
                kube.patch_raycluster(namespace, cluster, patch)
            except ApiException as exc:
                if exc.status != 404:  # gone already: nothing to hand to the pool
                    raise
        case CreateNetworkPolicy(manifest=manifest):
            kube.create_network_policy(manifest)
        case CreateProgress(manifest=manifest):
            kube.create_progress(manifest)
        case CreateRayJob(manifest=manifest):
            created, new = kube.create_rayjob(manifest)
            child = (names.RAYJOBS, namespace, action.name)
            return _record_create(unseen, child, name, created, new, kuberay.observe_rayjob), None
        case DeleteCluster(name=cluster):
            kube.delete_raycluster(namespace, cluster)
        case DeleteRayJob(name=rayjob):
            kube.delete_rayjob(namespace, rayjob)
        case DeleteJob():
            kube.delete_job(namespace, name)
        case PinSpec():
            pass  # done before the status write
        case _:
            raise TypeError(f"unknown action {action!r}")
    return True, None


def _claim(namespace: str | None, cluster: str, patch: dict[str, Any]) -> dict[str, Any] | None:
    """The claimed cluster, or None when another job won it or it changed or went away (409,
    404): status still names it, and the next reconcile claims it again or picks another."""
    try:
        return kube.patch_raycluster(namespace, cluster, patch)
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise
        logger.info("warm RayCluster %s/%s not claimed (HTTP %s)", namespace, cluster, exc.status)
        return None


def _api_message(exc: ApiException) -> str:
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)


def finalize_job(
    body: Mapping[str, Any],
    clusters: Index,
    rayjobs: Index,
    post: PostEvent,
    pool: Index | None = None,
) -> Decision:
    """The RLHFJob is being deleted: stop its RayJob, release its cluster (the finalizer)."""
    meta = body["metadata"]
    status = RLHFJobStatus.model_validate(body.get("status") or {})
    job, _ = validate(effective_manifest(body)[0])  # the spec decides whether to pool
    if job is None:  # a broken spec can be deleted too: its cluster is deleted, never pooled
        job = RLHFJob.model_construct(
            metadata=ObjectMeta.model_validate({"name": meta["name"], "uid": meta.get("uid")})
        )
    observed = observe(
        meta.get("namespace"),
        status,
        clusters,
        rayjobs,
        meta["name"],
        pooled_in_namespace=_pooled_in(pool, meta.get("namespace")),
    )
    since = parse_time(meta.get("deletionTimestamp"))
    decision = machine.finalize(job, status, observed, datetime.now(UTC), since)
    for action in decision.actions:
        _act(meta.get("namespace"), meta["name"], action)
    for event in decision.events:
        post(body, event)
    metrics.forget_job(meta.get("namespace") or "", meta["name"])
    return decision
