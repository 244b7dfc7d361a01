"""The warm-pool expiry sweep: deletes pool clusters nobody claimed within keepAliveSeconds.

One background task per operator, reading the warm-pool index (kopf's in-memory cache of the
available clusters, fed by the RayCluster watch): it wakes at the next expiry (at most every
`POOL_SWEEP_INTERVAL` seconds, which bounds how late a cluster released meanwhile is noticed)
and deletes each expired cluster with its resourceVersion as a precondition, so a job that
claims it at the same moment keeps it (the delete gets 409 and nothing happens).

Why not a kopf timer on the RayClusters: kopf puts a finalizer on every object a timer or daemon
watches, and a pool cluster would then hang in deletion whenever the operator is not running
(uninstalled, or down). This sweep needs nothing on the clusters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from rlhf_operator import kube, metrics, warmpool

logger = logging.getLogger(__name__)

POOL_SWEEP_INTERVAL = float(os.environ.get("RLHF_POOL_SWEEP_INTERVAL", "10"))
"""Longest sleep between two sweeps (seconds); tests shorten it."""

EXPIRY_SLACK = 0.05  # wake just after the expiry instant, not just before it

PoolIndex = Mapping[Any, Iterable[warmpool.PoolCluster]]


def pooled_clusters(index: PoolIndex) -> list[warmpool.PoolCluster]:
    """Every available pool cluster the index holds (a snapshot: the watcher keeps writing)."""
    return [cluster for key in list(index) for cluster in list(index.get(key, ()))]


def sweep_once(index: PoolIndex, now: datetime) -> tuple[int, float | None]:
    """Delete the expired pool clusters; (how many were deleted, seconds to the next expiry)."""
    clusters = pooled_clusters(index)
    deleted = 0
    for cluster in warmpool.expired_clusters(clusters, now):
        if kube.delete_raycluster_unchanged(
            cluster.namespace, cluster.name, cluster.resource_version
        ):
            deleted += 1
            logger.info(
                "warm pool: deleted RayCluster %s/%s (unclaimed until %s)",
                cluster.namespace,
                cluster.name,
                cluster.expires_at.isoformat() if cluster.expires_at else "no expiry",
            )
    if deleted:
        metrics.observe_pool_expiry(deleted)
    live = [c for c in clusters if not c.expired(now)]
    return deleted, warmpool.next_expiry(live, now)


async def sweep_forever(index: PoolIndex, interval: float | None = None) -> None:
    """Sweep until cancelled; an API error is logged and the next sweep tries again."""
    interval = interval or POOL_SWEEP_INTERVAL
    while True:
        wait = interval
        try:
            # The kubernetes client blocks: run the sweep in a thread, off kopf's event loop.
            _, next_expiry = await asyncio.to_thread(sweep_once, index, datetime.now(UTC))
            if next_expiry is not None:
                wait = min(interval, next_expiry + EXPIRY_SLACK)
        except Exception:  # an API hiccup must not end the sweep for the operator's lifetime
            logger.exception("warm pool: expiry sweep failed; retrying in %ss", interval)
        await asyncio.sleep(wait)


def start(index: PoolIndex, interval: float | None = None) -> asyncio.Task[None]:
    """Start the sweep as a task that ends with the caller's task (kopf's startup activity,
    which lives as long as the operator), even when the operator is cancelled abruptly."""
    task = asyncio.create_task(sweep_forever(index, interval), name="warm-pool expiry sweep")
    owner = asyncio.current_task()
    if owner is not None:
        owner.add_done_callback(lambda _: task.cancel())
    return task


async def stop(task: asyncio.Task[None] | None) -> None:
    """Stop the sweep (kopf's cleanup activity)."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
