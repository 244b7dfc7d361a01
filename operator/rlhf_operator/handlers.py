"""kopf handlers: decorators only, each delegating in one line.

Why one timer rather than create/update/resume handlers: the state machine needs the job AND its
children's statuses, and children change without the job changing. A per-job timer re-runs the
one reconcile every few seconds (kopf never overlaps two runs for the same job), and reads the
children from kopf indexes — in-memory caches fed by watches of RayClusters and RayJobs — so an
idle tick costs no API call. The first tick runs as soon as a job appears (creation, or operator
start for existing jobs: that is "resume"); edits are picked up on the next tick.
"""

from __future__ import annotations

from typing import Any

import kopf

from rlhf_operator import events, metrics, names, pool_sweeper, warmpool
from rlhf_operator import settings as operator_settings
from rlhf_operator.api import GROUP, PLURAL, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL
from rlhf_operator.reconcile import driver, kuberay, progress


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    operator_settings.configure(settings)


@kopf.index(names.RAY_GROUP, names.RAY_VERSION, names.RAYCLUSTERS)
def rayclusters(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): kuberay.observe_cluster(body)}


@kopf.index(
    names.RAY_GROUP,
    names.RAY_VERSION,
    names.RAYCLUSTERS,
    labels={warmpool.LABEL_STATE: warmpool.STATE_AVAILABLE},
)
def warm_pool(body: kopf.Body, **_: Any) -> dict:
    cluster = warmpool.observe(body)
    return {(cluster.namespace, cluster.signature): cluster}


@kopf.on.startup()
async def start_pool_sweeper(memo: kopf.Memo, warm_pool: kopf.Index, **_: Any) -> None:
    memo.pool_sweeper = pool_sweeper.start(warm_pool)


@kopf.on.cleanup()
async def stop_pool_sweeper(memo: kopf.Memo, **_: Any) -> None:
    await pool_sweeper.stop(memo.get("pool_sweeper"))


@kopf.index(names.RAY_GROUP, names.RAY_VERSION, names.RAYJOBS)
def rayjobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): kuberay.observe_rayjob(body)}


@kopf.index(GROUP, VERSION, PROGRESS_PLURAL)
def progress_reports(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict:
    return {(namespace, name): progress.observe_progress(body)}


@kopf.timer(GROUP, VERSION, PLURAL, interval=operator_settings.RECONCILE_INTERVAL)
@metrics.count_reconcile_errors
def reconcile(
    body: kopf.Body,
    rayclusters: kopf.Index,
    rayjobs: kopf.Index,
    warm_pool: kopf.Index,
    progress_reports: kopf.Index,
    **_: Any,
) -> None:
    driver.reconcile_job(
        driver.snapshot(body),
        rayclusters,
        rayjobs,
        events.post,
        pool=warm_pool,
        reports=progress_reports,
    )


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
