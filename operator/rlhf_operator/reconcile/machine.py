"""The RLHFJob state machine, pure: (job, status, observed children, now) -> Decision.

Modelled on KubeRay's rayjob_controller.go: validate first (the caller does), then one dispatch
on `status.phase`; every branch returns the next status, the actions and the events. Nothing
here talks to the API, so every transition is a unit test (tests/unit/test_reconcile.py).

    Pending ──► Provisioning ──► Running ──► Succeeded     (Queued ⇄ Provisioning: Kueue
                                                            holds the cluster suspended)
                    ▲   (cluster     │  stage by stage: success -> next stage,
                    │    ready)      │  failure -> new attempt (up to backoffLimit)
                    │                ├──► Failed (retries exhausted, deadline, conflict)
                    └── Suspended ◄──┘  (spec.runPolicy.suspend; resume = new attempt)

Crash safety: child names are deterministic and written to status in the same decision that
creates them (the driver writes status first), and every non-terminal phase re-ensures the
children it expects ("create if absent"). A restart at any point repeats at most an idempotent
create or delete, never a second cluster or a second RayJob for the same attempt.

The job's RayCluster (acquire: claim a warm one or create; ensure; release: to the warm pool or
delete) is the seam in reconcile/cluster.py; the decision being built is reconcile/draft.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from rlhf_operator import builders, names
from rlhf_operator.api import STAGE_ORDER, RLHFJob, RLHFJobStatus, is_terminal
from rlhf_operator.api.columns import progress_column, reward_column
from rlhf_operator.api.spec import IMMUTABLE_FIELDS
from rlhf_operator.api.storage import artifact_uri
from rlhf_operator.reconcile import kuberay, progress
from rlhf_operator.reconcile.cluster import (
    CLUSTER_PROVISIONING,
    Readiness,
    acquire_cluster,
    ensure_cluster,
    ensure_network_policy,
    release_cluster,
)
from rlhf_operator.reconcile.conditions import get_condition, parse_time, set_condition, timestamp
from rlhf_operator.reconcile.draft import Draft
from rlhf_operator.reconcile.model import (
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

SUSPENDED = "Suspended"


# --------------------------------------------------------------------------- entry points


def reconcile(
    job: RLHFJob,
    status: RLHFJobStatus,
    observed: Observed,
    now: datetime,
    *,
    generation: int | None = None,
    spec_changed: bool = False,
    pinned_spec: str | None = None,
) -> Decision:
    """The next step for a job whose (effective) spec is valid.

    `spec_changed`: the live spec's stages/cluster differ from the ones the job started with
    (`pinned_spec` records those; they keep being used). `generation`: metadata.generation.
    """
    d = Draft(job, status.model_copy(deep=True), observed, now, generation, [], [])
    previous_generation = status.observed_generation
    if generation is not None:
        d.status.observed_generation = generation
    if spec_changed and generation != previous_generation and status.phase != "Pending":
        d.warning(
            names.SPEC_CHANGE_IGNORED,
            "spec.stages and spec.cluster cannot change once a job has started; the change is "
            "ignored (create a new RLHFJob to run with it).",
        )

    valid = get_condition(d.status, names.COND_VALID)
    if d.status.phase == "Failed" and valid is not None and valid.status == "False":
        if generation != previous_generation:  # an invalid job was fixed: start over
            d.status = RLHFJobStatus(observed_generation=generation)
            d.normal(names.COND_VALID, "The spec is valid now; starting the job.")
        else:
            _finished(d)
            return d.decision()
    if is_terminal(d.status.phase):
        _finished(d)
        return d.decision()
    d.condition(names.COND_VALID, True, "SpecValid", "The spec is valid.")

    policy = job.spec.run_policy
    started = parse_time(d.status.start_time)
    if (
        policy.active_deadline_seconds is not None
        and started is not None
        and d.status.phase != "Suspended"
        and now - started > timedelta(seconds=policy.active_deadline_seconds)
    ):
        _fail(
            d,
            names.DEADLINE_EXCEEDED,
            f"The job ran longer than spec.runPolicy.activeDeadlineSeconds "
            f"({policy.active_deadline_seconds}s); its running stage was stopped. Raise the "
            "deadline in the manifest and re-create the RLHFJob to run it again.",
        )
        return d.decision()
    if policy.suspend and d.status.phase != "Suspended":
        _suspend(d)
        return d.decision()

    {
        "Pending": _start,
        "Provisioning": _provision,
        "Queued": _provision,
        "Running": _run,
        "Suspended": _suspended,
    }[d.status.phase](d, pinned_spec)
    _prune(d)
    return d.decision()


def reject(
    status: RLHFJobStatus, problems: list[str], now: datetime, generation: int | None
) -> Decision:
    """An invalid spec: Valid=False, phase Failed, one Warning event; nothing is created.

    A job that already runs keeps running on the spec it started with (the caller validates
    that one), so this only ever stops a job before it created anything.
    """
    new = status.model_copy(deep=True)
    message = " ".join(problems)
    frozen = [f"spec.{f}" for f in IMMUTABLE_FIELDS if any(f"spec.{f}" in p for p in problems)]
    if frozen:  # the API server refuses an edit of these: say so before the user tries
        message += (
            f" {' and '.join(frozen)} cannot be changed on an existing RLHFJob: delete it and "
            "apply the corrected manifest again."
        )
    events = []
    valid = get_condition(new, names.COND_VALID)
    if valid is None or valid.status != "False" or valid.message != message:
        events.append(Event("Warning", names.INVALID_SPEC, message))
    if generation is not None:
        new.observed_generation = generation
    for type_ in (names.COND_VALID, names.COND_SUCCEEDED):
        set_condition(new, type_, "False", names.INVALID_SPEC, message, now, generation)
    set_condition(new, names.COND_FAILED, "True", names.INVALID_SPEC, message, now, generation)
    new.phase, new.message = "Failed", message
    new.completion_time = new.completion_time or timestamp(now)
    return Decision(status=new, events=events)


def finalize(
    job: RLHFJob,
    status: RLHFJobStatus,
    observed: Observed,
    now: datetime,
    deleting_since: datetime | None = None,
) -> Decision:
    """The job is being deleted: stop its running RayJob and release its cluster.

    `job` needs only its metadata (name, uid) when its spec is broken: it can be deleted too
    (its cluster is then deleted, never pooled). A cluster bound for the warm pool waits for the
    running stage to stop (`Decision.wait`), for at most `cluster.STOP_GRACE` after
    `deleting_since`.
    """
    d = Draft(job, status.model_copy(deep=True), observed, now, None, [], [], deleting=True)
    d.deleting_since = deleting_since
    _stop_rayjob(d)
    release_cluster(d)
    return d.decision()


# --------------------------------------------------------------------------- phases


def _cluster_ready(d: Draft) -> bool:
    """True when the recorded cluster is ours and ready (see `ensure_cluster`); one not ready
    within spec.cluster.provisionTimeoutSeconds fails the job with what KubeRay says."""
    readiness = ensure_cluster(d)
    if readiness is Readiness.TIMED_OUT:
        _provision_timed_out(d)
    elif readiness is Readiness.UNAUTHENTICATED:
        _unauthenticated(d)
    return readiness is Readiness.READY


def _unauthenticated(d: Draft) -> None:
    """The API server stored our RayCluster without spec.authOptions: its KubeRay CRD predates
    token authentication. Never run a stage on an open Ray; delete the cluster, say why."""
    name = d.status.cluster.name
    _fail(
        d,
        names.RAY_AUTH_UNSUPPORTED,
        f"RayCluster {name} was stored without spec.authOptions: the installed KubeRay CRDs "
        "predate Ray token authentication, and its Ray dashboard, client and GCS ports would "
        "take any caller. Upgrade KubeRay (operator and CRDs) to v1.5.1 or newer, then "
        "re-create the RLHFJob.",
    )
    cluster = d.observed.cluster
    if cluster is not None and cluster.owned_by(d.name, d.uid) and not cluster.deleting:
        d.actions[:] = [a for a in d.actions if not isinstance(a, DeleteCluster | ReleaseCluster)]
        d.actions.append(DeleteCluster(cluster.name))


def _provision_timed_out(d: Draft) -> None:
    """Fail with KubeRay's reason and delete the partly scheduled cluster (if it is ours)."""
    name, cluster = d.status.cluster.name, d.observed.cluster
    timeout = d.job.spec.cluster.provision_timeout_seconds
    if cluster is not None and not cluster.owned_by(d.name, d.uid):
        owners = ", ".join(cluster.owner_uids) or "none"
        _fail(
            d,
            names.CLUSTER_CONFLICT,
            f"RayCluster {name} belongs to another owner (owner uids: {owners}; this job's: "
            f"{d.uid}) and was not removed within spec.cluster.provisionTimeoutSeconds "
            f"({timeout}s): delete it (kubectl delete raycluster {name} -n {d.namespace}) or "
            "re-create this RLHFJob under another name.",
        )
        return
    waiting = get_condition(d.status, names.COND_CLUSTER_READY)
    why = (cluster.why if cluster is not None else None) or (
        waiting.message if waiting is not None else "no RayCluster status yet"
    )
    _fail(
        d,
        names.PROVISION_TIMEOUT,
        f"RayCluster {name} was not ready within spec.cluster.provisionTimeoutSeconds "
        f"({timeout}s): {why}. Fix what this names (GPU quota or node pool, image, "
        "serviceAccountName), then delete and re-create the RLHFJob, or raise the timeout.",
    )
    if cluster is not None and cluster.owned_by(d.name, d.uid) and not cluster.deleting:
        d.actions[:] = [a for a in d.actions if not isinstance(a, DeleteCluster | ReleaseCluster)]
        d.actions.append(DeleteCluster(cluster.name))  # never to the warm pool: it never worked


def _start(d: Draft, pinned_spec: str | None) -> None:
    """Pending: lay out the stages, pin the spec, acquire the cluster."""
    s, spec = d.status, d.job.spec
    enabled = spec.enabled_stages()
    for stage in STAGE_ORDER:
        if stage in enabled:
            d.stage(stage).state = "Pending"
            d.stage(stage).artifact = artifact_uri(spec.storage.uri, d.name, stage)
        elif getattr(spec.stages, stage) is not None:  # an absent optional stage (dpo): unlisted
            d.stage(stage).state = "Skipped"
    s.stage = enabled[0]
    s.start_time = timestamp(d.now)
    s.progress = progress_column(enabled[0], enabled, None)
    if pinned_spec is not None:
        d.actions.append(PinSpec(pinned_spec))
    s.phase = "Provisioning"
    s.message = "Creating the Ray cluster."
    acquire_cluster(d)
    s.cluster.waiting_since = timestamp(d.now)  # spec.cluster.provisionTimeoutSeconds from here
    d.condition(names.COND_CLUSTER_READY, False, CLUSTER_PROVISIONING, "Cluster requested.")


def _provision(d: Draft, _: str | None) -> None:
    """Provisioning: wait for the cluster, then start (a new attempt of) the current stage."""
    if not _cluster_ready(d):
        _queued(d)
        return
    name = d.status.cluster.name
    d.condition(names.COND_CLUSTER_READY, True, "ClusterReady", f"{name} is ready.")
    if d.status.cluster.reused:
        pool = d.observed.cluster.pool if d.observed.cluster else None
        source = f" (left by {pool.released_by})" if pool and pool.released_by else ""
        d.normal(
            names.WARM_POOL_HIT,
            f"Claimed warm RayCluster {name}{source} from the pool: no provisioning.",
        )
    else:
        d.normal(names.CLUSTER_READY, f"RayCluster {name} is ready.")
    ensure_network_policy(d)
    _ensure_progress(d)
    _start_attempt(d, d.status.stage or d.job.spec.enabled_stages()[0])


def _ensure_progress(d: Draft) -> None:
    """The RLHFJobProgress the trainer reports to (create-if-absent: 409 after the first)."""
    d.actions.append(CreateProgress(progress.build_progress(d.name, d.namespace, d.owner())))


def _queued(d: Draft) -> None:
    """Queued while Kueue holds our cluster suspended (its LocalQueue has no quota for the
    whole gang yet); back to Provisioning once admitted. The provisioning deadline counts
    from admission: waiting in a queue is not a cluster failing to come up."""
    s, cluster = d.status, d.observed.cluster
    if s.phase not in ("Provisioning", "Queued"):  # e.g. failed on the deadline just now
        return
    if cluster is not None and cluster.suspended and cluster.owned_by(d.name, d.uid):
        queue = cluster.queue or d.job.spec.cluster.queue_name or "(none)"
        message = (
            f"Waiting for Kueue to admit RayCluster {cluster.name} in LocalQueue {queue}: it "
            "stays suspended until the queue's ClusterQueue has quota for all its pods "
            "(kubectl get workloads shows why)."
        )
        if s.phase != "Queued":
            d.normal(names.JOB_QUEUED, message)
        s.phase, s.message, s.progress = "Queued", message, f"queue {queue}"
        s.cluster.waiting_since = None
        d.condition(names.COND_CLUSTER_READY, False, names.JOB_QUEUED, message)
    elif s.phase == "Queued":
        s.phase, s.message = "Provisioning", "Admitted by Kueue; waiting for the Ray cluster."
        s.progress = progress_column(s.stage or "", d.job.spec.enabled_stages(), None)
        d.normal(names.JOB_ADMITTED, f"Kueue admitted RayCluster {s.cluster.name}.")


def _start_attempt(d: Draft, stage: str, *, announce: bool = True) -> None:
    """Record attempt N+1 of `stage` in status and create its RayJob."""
    s = d.status
    st = d.stage(stage)
    attempt = st.attempts + 1
    if attempt > names.MAX_ATTEMPT:
        _fail(
            d,
            names.TOO_MANY_ATTEMPTS,
            f"Stage {stage} reached {names.MAX_ATTEMPT} attempts (retries and resumes), the most "
            "its RayJob names allow; re-create the RLHFJob to start it over.",
        )
        return
    rayjob = names.rayjob_name(d.name, stage, attempt)
    st.attempts, st.state, st.ray_job = attempt, "Running", rayjob
    st.start_time = st.start_time or timestamp(d.now)
    st.completion_time = None
    s.phase, s.stage = "Running", stage
    s.message = f"Stage {stage}: attempt {attempt} ({rayjob})."
    s.progress = progress_column(stage, d.job.spec.enabled_stages(), None)
    manifest = builders.build_stage_rayjob(d.job, stage, attempt, s.cluster.name, d.owner())
    d.actions.append(CreateRayJob(manifest))
    if announce:
        d.normal(names.STAGE_STARTED, f"Stage {stage} started: attempt {attempt}, RayJob {rayjob}.")


def _run(d: Draft, _: str | None) -> None:
    """Running: follow the current attempt's RayJob; advance, retry or fail on its outcome."""
    s = d.status
    stage = s.stage or d.job.spec.enabled_stages()[0]
    st = d.stage(stage)
    cluster = d.observed.cluster
    if cluster is None or cluster.deleting:  # deleted under us: make a new one, rerun the stage
        d.warning(
            names.CLUSTER_LOST,
            f"RayCluster {s.cluster.name} disappeared; recreating it and restarting stage "
            f"{stage} from its last checkpoint.",
        )
        if st.ray_job:
            d.actions.append(DeleteRayJob(st.ray_job))
        st.state = "Pending"
        s.phase = "Provisioning"
        _cluster_ready(d)
        return
    if cluster.ready:
        d.condition(names.COND_CLUSTER_READY, True, "ClusterReady", f"{cluster.name} is ready.")
    else:  # e.g. the head pod restarts: KubeRay recovers it, the RayJob tells the outcome
        d.condition(
            names.COND_CLUSTER_READY, False, "HeadPodNotReady", f"{cluster.name} is not ready."
        )
    rayjob = d.observed.rayjob
    if rayjob is not None and not rayjob.owned_by(d.uid):
        _foreign_rayjob(d, stage, rayjob)
        return
    st.waiting_since = None
    if st.state == "Retrying":
        _retry_when_stopped(d, stage)
        return
    if rayjob is None:
        ensure_network_policy(d)  # a restart may have come between status and the creates
        _ensure_progress(d)
        manifest = builders.build_stage_rayjob(d.job, stage, st.attempts, s.cluster.name, d.owner())
        d.actions.append(CreateRayJob(manifest))  # recorded but not seen yet: ensure it
        return
    outcome, why = kuberay.rayjob_outcome(rayjob)
    if outcome is kuberay.Outcome.SUCCEEDED:
        _stage_succeeded(d, stage)
    elif outcome is kuberay.Outcome.FAILED:
        _stage_failed(d, stage, why)
    elif outcome is kuberay.Outcome.BAD_INPUT:
        _stage_failed(
            d,
            stage,
            f"{why} (bad input: not retried, a new attempt would read the same input; fix what "
            "the message names and re-create the RLHFJob)",
            retry=False,
        )
    elif outcome is kuberay.Outcome.REJECTED:
        _stage_failed(
            d,
            stage,
            f"{why} (ValidationFailed: not retried; a KubeRay older than this operator needs, "
            "or a spec.cluster value KubeRay refuses: fix what the message names and re-create "
            "the RLHFJob)",
            retry=False,
        )


def _foreign_rayjob(d: Draft, stage: str, rayjob: RayJobObservation) -> None:
    """A RayJob at the attempt's name that is not the job's (left by an earlier RLHFJob of the
    same name, behind KubeRay's finalizer or the garbage collector): never adopted (its outcome
    is not ours), never deleted; wait for it to go, for at most provisionTimeoutSeconds."""
    st = d.stage(stage)
    st.waiting_since = st.waiting_since or timestamp(d.now)
    owners = ", ".join(rayjob.owner_uids) or "none"
    fix = (
        f"delete it (kubectl delete rayjob {rayjob.name} -n {d.namespace}) or re-create this "
        "RLHFJob under another name"
    )
    timeout = d.job.spec.cluster.provision_timeout_seconds
    waited = d.now - (parse_time(st.waiting_since) or d.now)
    if waited >= timedelta(seconds=timeout):
        _fail(
            d,
            names.RAYJOB_CONFLICT,
            f"RayJob {rayjob.name} (stage {stage}) belongs to another owner (owner uids: "
            f"{owners}; this job's: {d.uid}) and was not removed within "
            f"spec.cluster.provisionTimeoutSeconds ({timeout}s): {fix}.",
        )
        return
    message = (
        f"Waiting for RayJob {rayjob.name} to go: it exists but is not this RLHFJob's (owner "
        f"uids: {owners}; this job's: {d.uid}), e.g. an earlier RLHFJob of the same name being "
        f"cleaned up. If it stays, {fix}."
    )
    if d.status.message != message:
        d.warning(names.RAYJOB_CONFLICT, message)
    d.status.message = message


def _retry_when_stopped(d: Draft, stage: str) -> None:
    """Attempt N failed and is being deleted: start N+1 only once N's RayJob is gone (KubeRay's
    finalizer stops its Ray job first), so two drivers never share the GPUs and checkpoints."""
    st, rayjob = d.stage(stage), d.observed.rayjob
    if rayjob is None:
        _start_attempt(d, stage, announce=False)
        return
    if not rayjob.deleting:
        d.actions.append(DeleteRayJob(rayjob.name))
    d.status.message = (
        f"Stage {stage}: waiting for RayJob {rayjob.name} (attempt {st.attempts}) to stop "
        f"before attempt {st.attempts + 1} starts (KubeRay's finalizer {kuberay.RAYJOB_FINALIZER} "
        "stops its Ray job first; if the RayJob stays, check that the KubeRay operator runs)."
    )


def _stage_succeeded(d: Draft, stage: str) -> None:
    s, st = d.status, d.stage(stage)
    st.state, st.completion_time, st.message = "Succeeded", timestamp(d.now), None
    d.condition(names.stage_condition(stage), True, "StageSucceeded", f"Stage {stage} succeeded.")
    d.normal(names.STAGE_SUCCEEDED, f"Stage {stage} succeeded (attempt {st.attempts}).")
    if stage == "evaluation" and st.metrics:
        s.evaluation = progress.evaluation_summary(st.metrics, progress.judge_name(d.job))
    s.reward = reward_column(st.metrics) or s.reward
    enabled = d.job.spec.enabled_stages()
    later = enabled[enabled.index(stage) + 1 :]
    if later:
        _start_attempt(d, later[0])
        return
    s.phase, s.completion_time = "Succeeded", timestamp(d.now)
    s.message = f"All {len(enabled)} stages succeeded."
    s.progress = "done"
    d.condition(names.COND_SUCCEEDED, True, names.JOB_SUCCEEDED, s.message)
    d.condition(names.COND_FAILED, False, names.JOB_SUCCEEDED, "")
    d.normal(names.JOB_SUCCEEDED, s.message)
    release_cluster(d)


def _stage_failed(d: Draft, stage: str, why: str, *, retry: bool = True) -> None:
    """Retry (up to backoffLimit) or fail the job. A retry starts at once when the failed
    attempt's Ray job ended; when it may still run (SubmissionFailed: the submitter gave up,
    the driver did not), its RayJob is deleted first and the retry waits (`Retrying`)."""
    st = d.stage(stage)
    st.failures += 1
    st.message = why
    limit = d.job.spec.run_policy.backoff_limit
    if retry and st.failures <= limit:
        d.warning(
            names.STAGE_RETRIED,
            f"Stage {stage} attempt {st.attempts} failed: {why}. Retrying ({st.failures} of "
            f"{limit} retries), resuming from its last checkpoint.",
        )
        rayjob = d.observed.rayjob
        if rayjob is None or kuberay.ray_job_stopped(rayjob):
            _start_attempt(d, stage, announce=False)
            return
        st.state = "Retrying"
        _retry_when_stopped(d, stage)
        return
    st.state, st.completion_time = "Failed", timestamp(d.now)
    message = f"Stage {stage} failed after {st.attempts} attempt(s): {why}"
    d.condition(names.stage_condition(stage), False, names.STAGE_FAILED, message)
    d.warning(names.STAGE_FAILED, message)
    limit_note = " (spec.runPolicy.backoffLimit reached)." if retry else "."
    _fail(d, names.STAGE_FAILED, message + limit_note)


def _fail(d: Draft, reason: str, message: str) -> None:
    """Terminal failure: stop the running RayJob, release the cluster, say why."""
    s = d.status
    s.phase, s.message, s.completion_time = "Failed", message, timestamp(d.now)
    stage = s.stages.get(s.stage or "")
    if stage is not None and stage.state in ("Running", "Retrying"):
        stage.state, stage.completion_time = "Failed", timestamp(d.now)
        stage.message = message
    d.condition(names.COND_FAILED, True, reason, message)
    d.condition(names.COND_SUCCEEDED, False, reason, "")
    d.warning(names.JOB_FAILED, message)
    _stop_rayjob(d)
    release_cluster(d)


def _stop_rayjob(d: Draft) -> None:
    """Delete the current attempt's RayJob while its Ray job may run (only if it is ours)."""
    rayjob = d.observed.rayjob
    if (
        rayjob is not None
        and rayjob.owned_by(d.uid)
        and not rayjob.deleting
        and not (kuberay.is_finished(rayjob) and kuberay.ray_job_stopped(rayjob))
    ):
        d.actions.append(DeleteRayJob(rayjob.name))


def _prune(d: Draft) -> None:
    """Delete earlier attempts' RayJobs (ours, finished) beyond runPolicy.keepAttempts per
    stage, newest kept; the RayJob of a stage's current attempt always stays."""
    keep = d.job.spec.run_policy.keep_attempts
    for rayjob in d.observed.earlier:
        st = d.status.stages.get(rayjob.stage)
        if (
            st is not None
            and rayjob.owned_by(d.uid)
            and not rayjob.deleting
            and rayjob.attempt <= st.attempts - keep
            and kuberay.ray_job_stopped(rayjob)
        ):
            d.actions.append(DeleteRayJob(rayjob.name))


def _suspend(d: Draft) -> None:
    """Stop the running stage and release the cluster; the stage reruns on resume."""
    s = d.status
    _stop_rayjob(d)
    if s.stage and s.stages.get(s.stage) and s.stages[s.stage].state in ("Running", "Retrying"):
        s.stages[s.stage].state = "Pending"  # not a failure: resume starts a new attempt
    s.cluster.waiting_since = None  # the provisioning deadline restarts on resume
    s.phase, s.message = "Suspended", "Suspended by spec.runPolicy.suspend."
    d.condition(names.COND_CLUSTER_READY, False, SUSPENDED, "The job is suspended.")
    d.normal(names.JOB_SUSPENDED, "Job suspended: running stage stopped, cluster released.")
    release_cluster(d)


def _suspended(d: Draft, pinned_spec: str | None) -> None:
    """Suspended and no longer asked to be: resume where it stopped."""
    s = d.status
    if d.job.spec.run_policy.suspend:  # still suspended: keep everything released
        _stop_rayjob(d)
        release_cluster(d, announce=False)
        return
    s.start_time = timestamp(d.now)  # as Kubernetes Jobs: the deadline restarts on resume
    d.normal(names.JOB_RESUMED, f"Job resumed at stage {s.stage}.")
    if s.cluster.name is None:  # suspended before it ever started
        s.phase = "Pending"
        _start(d, pinned_spec)
        return
    s.phase, s.message = "Provisioning", "Resuming: recreating the Ray cluster."
    _provision(d, pinned_spec)


def _finished(d: Draft) -> None:
    """Succeeded or Failed: make sure nothing keeps running; expire after the TTL."""
    _stop_rayjob(d)
    _prune(d)
    release_cluster(d, announce=False)
    ttl = d.job.spec.run_policy.ttl_seconds_after_finished
    finished = parse_time(d.status.completion_time)
    if ttl is not None and finished is not None and d.now >= finished + timedelta(seconds=ttl):
        d.actions.append(DeleteJob())
        d.normal(names.JOB_EXPIRED, f"Deleting the job {ttl}s after it finished.")
