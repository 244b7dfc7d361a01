"""kopf handlers: decorators only, each delegating in one line.

One reconcile loop per job (a kopf daemon, see wake.py): it reconciles when the job appears
(creation, or operator start for existing jobs: that is "resume"), then sleeps until the job or
one of its children changes (the event handlers below wake it through `memo.wakeups`), a
deadline is due, or — for a running job only — the slow resync interval passed. kopf never runs
two loops for one job. The reconcile reads the children from kopf indexes — in-memory caches fed
by watches of RayClusters and RayJobs — so waking costs no API read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from rlhf_operator import events, metrics, names, pool_sweeper, wake, warmpool
from rlhf_operator import settings as operator_settings
from rlhf_operator.api import GROUP, PLURAL, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL
from rlhf_operator.reconcile import driver, kuberay, progress, unseen


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    operator_settings.configure(settings)
    memo.wakeups = wake.Wakeups()  # shared: every job's memo is a shallow copy of this one
    memo.unseen = unseen.Unseen()  # children created, not yet shown by the watch
    memo.executor = settings.execution.executor  # kopf's pool for sync handlers (WORKERS)
    # Each job's first reconcile runs in a pool of its own, so a burst of them never queues
    # ahead of the reactions to children: a new job's (its cluster's creation) in one, a job
    # resumed by a new leader (a thousand at once, most of them finished) in a smaller one,
    # so that resuming never delays the jobs applied meanwhile.
    memo.first_executor = ThreadPoolExecutor(
        max_workers=operator_settings.WORKERS, thread_name_prefix="rlhf-first-reconcile"
    )
    memo.resume_executor = ThreadPoolExecutor(
        max_workers=operator_settings.RESUME_WORKERS, thread_name_prefix="rlhf-resume"
    )


# Indexes are async (pure and quick): kopf would run a sync one in its thread pool, behind
# every queued reconcile, and a child's change would reach the index that late.
@kopf.index(names.RAY_GROUP, names.RAY_VERSION, names.RAYCLUSTERS)
async def rayclusters(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): kuberay.observe_cluster(body)}


@kopf.index(
    names.RAY_GROUP,
    names.RAY_VERSION,
    names.RAYCLUSTERS,
    labels={warmpool.LABEL_STATE: warmpool.STATE_AVAILABLE},
)
async def warm_pool(body: kopf.Body, **_: Any) -> dict:
    cluster = warmpool.observe(body)
    return {(cluster.namespace, cluster.signature): cluster}


@kopf.on.startup()
async def start_pool_sweeper(memo: kopf.Memo, warm_pool: kopf.Index, **_: Any) -> None:
    memo.pool_sweeper = pool_sweeper.start(warm_pool)


@kopf.on.cleanup()
async def stop_pool_sweeper(memo: kopf.Memo, **_: Any) -> None:
    await pool_sweeper.stop(memo.get("pool_sweeper"))
    for pool in (memo.get("first_executor"), memo.get("resume_executor")):
        if pool is not None:  # idle: the reconcile loops have ended
            pool.shutdown(wait=True, cancel_futures=True)


@kopf.index(names.RAY_GROUP, names.RAY_VERSION, names.RAYJOBS)
async def rayjobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): kuberay.observe_rayjob(body)}


@kopf.index(GROUP, VERSION, PROGRESS_PLURAL)
async def progress_reports(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): progress.observe_progress(body)}


# Stopping (deletion, operator exit) sets `stopped`: the loop ends at once, or after the
# reconcile in flight (cancelled after 0.1 s, it still waits for it: wake._finish).
@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_backoff=0.1, cancellation_timeout=10)
async def reconcile(
    uid: str,
    body: kopf.Body,
    stopped: kopf.DaemonStopped,
    memo: kopf.Memo,
    rayclusters: kopf.Index,
    rayjobs: kopf.Index,
    warm_pool: kopf.Index,
    progress_reports: kopf.Index,
    **_: Any,
) -> None:
    @metrics.count_reconcile_errors
    def once() -> bool:
        job = driver.snapshot(memo.unseen.latest(body))
        metrics.METRICS.observe_reconcile((job.get("status") or {}).get("phase") or "Pending")
        driver.reconcile_job(
            job,
            rayclusters,
            rayjobs,
            events.post,
            pool=warm_pool,
            reports=progress_reports,
            unseen=memo.unseen,
        )
        return memo.unseen.again(uid)

    resumed = bool((body.get("status") or {}).get("phase"))  # started before this loop
    try:
        await wake.reconcile_loop(
            uid,
            body,
            memo.wakeups,
            once,
            stopped,
            resync=operator_settings.RESYNC_INTERVAL,
            error_backoff=operator_settings.ERROR_BACKOFF,
            executor=memo.executor,
            first_executor=memo.resume_executor if resumed else memo.first_executor,
            first_after=lambda: wake.guarded(body),
            first_wait=operator_settings.FINALIZER_WAIT,
            latest=lambda: memo.unseen.latest(body),
        )
    finally:
        memo.unseen.forget_job(uid)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_changed(uid: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if not memo.unseen.echo(body):  # the job's own reconcile wrote this: nothing new to decide
        memo.wakeups.wake(uid)


# kopf updates its indexes before it calls these: the index now shows the child.
@kopf.on.event(names.RAY_GROUP, names.RAY_VERSION, names.RAYCLUSTERS)
async def raycluster_changed(
    namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    for job in memo.unseen.seen(names.RAYCLUSTERS, namespace, name):
        memo.wakeups.wake_named(namespace, job)
    memo.wakeups.wake_for_child(body)


@kopf.on.event(names.RAY_GROUP, names.RAY_VERSION, names.RAYJOBS)
async def rayjob_changed(
    namespace: str, name: str, body: kopf.Body, memo: kopf.Memo, **_: Any
) -> None:
    for job in memo.unseen.seen(names.RAYJOBS, namespace, name):
        memo.wakeups.wake_named(namespace, job)
    memo.wakeups.wake_for_child(body)


# A trainer's report (its job's RLHFJobProgress, owned by the job) is mirrored into the job's
# status by the job's reconcile: wake it, or the numbers would wait for the slow resync.
@kopf.on.event(GROUP, VERSION, PROGRESS_PLURAL)
async def progress_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    for owner in wake.owner_uids(body):
        memo.wakeups.wake(owner)


@kopf.on.delete(GROUP, VERSION, PLURAL)
def finalize(
    body: kopf.Body,
    rayclusters: kopf.Index,
    rayjobs: kopf.Index,
    warm_pool: kopf.Index,
    **_: Any,
) -> None:
    decision = driver.finalize_job(
        driver.snapshot(body), rayclusters, rayjobs, events.post, pool=warm_pool
    )
    if decision.wait:
        raise kopf.TemporaryError(decision.wait, delay=1)
