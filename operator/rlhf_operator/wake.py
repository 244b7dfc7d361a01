"""Event-driven reconcile: who wakes a job's reconcile, and when it wakes by itself.

Each RLHFJob has one reconcile loop (a kopf daemon, handlers.py) that sleeps on an
`asyncio.Event` until something changes: the job itself, or one of its RayClusters / RayJobs
(their watch events are mapped to the owner's uid through the ownerReference the operator puts
on every child). The loop also wakes by itself at the next instant a decision depends on time
alone (`next_due`: a deadline, the TTL of a finished job) and, while the job runs, at a slow
resync that only covers a lost watch event. A finished job with no TTL never wakes by itself:
at rest it costs nothing.

Why a daemon and not a timer: kopf's timer runs on a fixed interval whatever happened (the
latency floor was the interval: 5 s), and a timer cannot be woken. A daemon is one asyncio task
per job that kopf starts on creation (and for every existing job at operator start: the
"resume"), stops on deletion and never runs twice for one job.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_operator import names, settings
from rlhf_operator.api import API_VERSION, KIND, RLHFJobStatus, is_terminal
from rlhf_operator.api.spec import ClusterSpec
from rlhf_operator.reconcile.conditions import parse_time

logger = logging.getLogger(__name__)


class Wakeups:
    """One `asyncio.Event` per job uid whose reconcile loop runs (in this operator's loop)."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._uids: dict[tuple[str, str], str] = {}  # (namespace, name) -> uid of its loop

    def register(self, uid: str, key: tuple[str, str] | None = None) -> asyncio.Event:
        """The event of job `uid`'s loop; `key` = (namespace, name) lets `wake_named` find it."""
        if key is not None:
            self._uids[key] = uid
        return self._events.setdefault(uid, asyncio.Event())

    def forget(self, uid: str, event: asyncio.Event | None = None) -> None:
        """Drop `uid`'s event (only if it is still `event`, when given: a newer loop's stays)."""
        if event is None or self._events.get(uid) is event:
            self._events.pop(uid, None)
            self._uids = {key: u for key, u in self._uids.items() if u != uid}

    def wake_named(self, namespace: str, name: str) -> bool:
        """Wake the loop of the job called `name` in `namespace` (whatever its uid)."""
        return self.wake(self._uids.get((namespace, name)))

    def wake_for_child(self, body: Mapping[str, Any]) -> None:
        """A RayCluster/RayJob changed: wake its owners, and the job its name belongs to (the
        `rlhf.dev/job` label) — a re-applied job waits for its predecessor's child at its
        name to go, and that child is not the new job's."""
        for owner in owner_uids(body):
            self.wake(owner)
        meta = body.get("metadata") or {}
        job = (meta.get("labels") or {}).get(names.LABEL_JOB)
        if job:
            self.wake_named(meta.get("namespace") or "", job)

    def wake(self, uid: str | None) -> bool:
        """Wake the loop of job `uid`; False when it has none (gone, or not started yet: a new
        loop reconciles at once anyway)."""
        event = self._events.get(uid or "")
        if event is None:
            return False
        event.set()
        return True

    def __len__(self) -> int:
        return len(self._events)


def owner_uids(body: Mapping[str, Any]) -> list[str]:
    """The RLHFJobs owning a child (RayCluster, RayJob), by their ownerReferences."""
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return [
        ref["uid"]
        for ref in refs
        if ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION and ref.get("uid")
    ]


def guarded(body: Mapping[str, Any]) -> bool:
    """The job carries the operator's finalizer (kopf adds it first), or is being deleted."""
    meta = body.get("metadata") or {}
    return names.FINALIZER in (meta.get("finalizers") or []) or bool(meta.get("deletionTimestamp"))


def next_due(body: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds until a decision about this job changes with time alone (None: never).

    The instants the state machine compares `now` with: runPolicy.activeDeadlineSeconds from
    status.startTime (not while suspended), spec.cluster.provisionTimeoutSeconds from
    status.cluster.waitingSince, and runPolicy.ttlSecondsAfterFinished from
    status.completionTime. A spec that does not parse has no deadline (it is Failed, and
    nothing acts on it until it is edited, which wakes the loop).
    """
    spec = body.get("spec") or {}
    policy = spec.get("runPolicy") or {}
    try:
        status = RLHFJobStatus.model_validate(body.get("status") or {})
    except ValueError:
        return None
    due: list[datetime] = []

    def add(since: str | None, seconds: Any) -> None:
        start = parse_time(since)
        if start is not None and isinstance(seconds, int | float) and not isinstance(seconds, bool):
            due.append(start + timedelta(seconds=seconds))

    if is_terminal(status.phase):
        add(status.completion_time, policy.get("ttlSecondsAfterFinished"))
    else:
        if status.phase != "Suspended":
            add(status.start_time, policy.get("activeDeadlineSeconds"))
        cluster = spec.get("cluster") or {}
        timeout = cluster.get(
            "provisionTimeoutSeconds",
            ClusterSpec.model_fields["provision_timeout_seconds"].default,
        )
        add(status.cluster.waiting_since, timeout)
        for stage in status.stages.values():  # a RayJob at our name that is not ours
            add(stage.waiting_since, timeout)
    if not due:
        return None
    return max(0.0, (min(due) - now).total_seconds())


def sleep_for(body: Mapping[str, Any], now: datetime, resync: float) -> float | None:
    """How long the loop sleeps unless woken: until the next due instant, and at most the
    resync interval while the job is not finished (None: until woken)."""
    due = next_due(body, now)
    status = body.get("status") or {}
    if is_terminal(status.get("phase")):
        return due
    if (status.get("cluster") or {}).get("waitingSince"):
        # Waiting for its cluster: why (pods, Events) changes without waking the job.
        due = settings.EXPLAIN_INTERVAL if due is None else min(due, settings.EXPLAIN_INTERVAL)
    return resync if due is None else min(due, resync)


async def reconcile_loop(
    uid: str,
    body: Mapping[str, Any],
    wakeups: Wakeups,
    reconcile: Callable[[], Any],
    stopped: Any = None,
    *,
    resync: float,
    error_backoff: float,
    executor: Executor | None = None,
    first_executor: Executor | None = None,
    first_after: Callable[[], bool] | None = None,
    first_wait: float = 0.0,
    latest: Callable[[], Mapping[str, Any]] | None = None,
) -> None:
    """Run `reconcile` (blocking: in `executor`) now and whenever the job is woken or due,
    and at once again when it returns True (it asks for another look).

    `body` is kopf's live view of the job (kopf keeps it current); the loop ends when kopf
    sets `stopped` (kopf.DaemonStopped: the job is being deleted, or the operator stops),
    after the reconcile in flight, if any, finished. A reconcile that raises is retried
    after `error_backoff` seconds, doubling up to `resync`; it never ends the loop (kopf would
    not restart a daemon that failed for good).

    `first_after`: the first reconcile waits (woken by the job's changes, at most
    `first_wait` seconds) until it holds — kopf adds its finalizer to a new job just as it
    starts this loop, and a decision made on the job read before that write would be refused
    (409) and made again on a fresh read: two API calls per new job, for nothing.

    `first_executor`: where the first reconcile runs (else `executor`), so that a burst of
    new jobs does not delay the reactions of running ones.

    `latest`: the job as last known, when kopf's view may not show the reconcile's own write
    yet (its watch event does not wake the loop: handlers.job_changed); the next due instant
    is read from it.
    """
    meta = body.get("metadata") or {}
    event = wakeups.register(uid, (meta.get("namespace") or "", meta.get("name") or ""))
    loop = asyncio.get_running_loop()
    failures = 0
    first = True
    watcher = asyncio.ensure_future(_set_when(stopped, event)) if stopped is not None else None
    try:
        deadline = loop.time() + first_wait
        while first_after is not None and not first_after() and not stopped:
            if loop.time() >= deadline:
                break
            event.clear()
            await _sleep(event, deadline - loop.time())
        while not stopped:
            event.clear()  # a change seen during this reconcile wakes the next one
            pool = first_executor if first and first_executor is not None else executor
            first = False
            try:
                # kopf's event poster is reached through context variables: carry them over.
                context = contextvars.copy_context()
                again = await _finish(loop.run_in_executor(pool, context.run, reconcile))
            except Exception:
                failures += 1
                wait: float | None = min(resync, error_backoff * 2 ** (failures - 1))
                logger.exception("reconcile of RLHFJob uid %s failed; retrying in %.1fs", uid, wait)
            else:
                failures = 0
                job = latest() if latest else body
                wait = 0 if again is True else sleep_for(job, datetime.now(UTC), resync)
            if not stopped:
                await _sleep(event, wait)
    finally:
        if watcher is not None:
            watcher.cancel()
        wakeups.forget(uid, event)


async def _finish(future: asyncio.Future[Any]) -> Any:
    """Await a reconcile running in a thread; cancelled (the job is being deleted, or the
    operator stops), still wait for it: a thread cannot be stopped, and the finalizer or the
    next leader must not act while this one still writes."""
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await future
        raise


async def _sleep(event: asyncio.Event, timeout: float | None) -> None:
    """Until `event` is set or `timeout` seconds passed (None: no limit). A timer sets the
    event: no task per sleep (a thousand loops sleep and wake at once)."""
    if timeout is not None and timeout <= 0:
        return
    timer = asyncio.get_running_loop().call_later(timeout, event.set) if timeout else None
    try:
        await event.wait()
    finally:
        if timer is not None:
            timer.cancel()


async def _set_when(stopped: Any, event: asyncio.Event) -> None:
    """Wake the loop when kopf stops it (one waiter per loop, for its whole life)."""
    await stopped.wait()
    event.set()
