"""When a job's reconcile loop wakes by itself (wake.next_due / sleep_for), and whom a child's
watch event wakes (owner_uids, Wakeups)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_operator import wake
from rlhf_operator.api import API_VERSION, KIND

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
RESYNC = 60.0


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def body(status: dict[str, Any], **policy: Any) -> dict[str, Any]:
    return {"spec": {"runPolicy": policy}, "status": status}


def test_a_finished_job_without_ttl_never_wakes_by_itself() -> None:
    done = body({"phase": "Succeeded", "completionTime": ago(5)})
    assert wake.next_due(done, NOW) is None
    assert wake.sleep_for(done, NOW, RESYNC) is None  # only an event wakes it


def test_a_finished_job_wakes_for_its_ttl_only() -> None:
    done = body({"phase": "Failed", "completionTime": ago(5)}, ttlSecondsAfterFinished=30)
    assert wake.sleep_for(done, NOW, RESYNC) == 25
    overdue = body({"phase": "Succeeded", "completionTime": ago(90)}, ttlSecondsAfterFinished=30)
    assert wake.sleep_for(overdue, NOW, RESYNC) == 0


def test_a_running_job_wakes_at_its_deadline_or_the_resync() -> None:
    running = body({"phase": "Running", "startTime": ago(10)})
    assert wake.sleep_for(running, NOW, RESYNC) == RESYNC
    deadline = body({"phase": "Running", "startTime": ago(10)}, activeDeadlineSeconds=15)
    assert wake.sleep_for(deadline, NOW, RESYNC) == 5
    suspended = body({"phase": "Suspended", "startTime": ago(10)}, activeDeadlineSeconds=15)
    assert wake.sleep_for(suspended, NOW, RESYNC) == RESYNC  # no deadline while suspended


def test_a_provisioning_job_wakes_at_its_provision_timeout() -> None:
    waiting = body({"phase": "Provisioning", "cluster": {"waitingSince": ago(1790)}})
    assert wake.next_due(waiting, NOW) == 10  # the default provisionTimeoutSeconds: 1800
    waiting["spec"]["cluster"] = {"provisionTimeoutSeconds": 1795}
    assert wake.next_due(waiting, NOW) == 5


def test_children_name_their_job_by_owner_uid() -> None:
    child = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": API_VERSION, "kind": KIND, "name": "a", "uid": "u1"},
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": "u2"},
            ]
        }
    }
    assert wake.owner_uids(child) == ["u1"]
    assert wake.owner_uids({"metadata": {}}) == []  # a pooled cluster: nobody's


async def test_waking_sets_only_a_registered_jobs_event() -> None:
    wakeups = wake.Wakeups()
    event = wakeups.register("u1")
    assert not wakeups.wake("u2")  # no loop (gone, or not started: it reconciles at once)
    assert wakeups.wake("u1") and event.is_set()
    wakeups.forget("u1", asyncio.Event())  # a newer loop's event is not ours to drop
    assert len(wakeups) == 1
    wakeups.forget("u1", event)
    assert len(wakeups) == 0


async def test_the_loop_reconciles_when_woken_and_sleeps_otherwise() -> None:
    wakeups, runs = wake.Wakeups(), []
    finished = body({"phase": "Succeeded", "completionTime": ago(1)})
    loop = asyncio.create_task(
        wake.reconcile_loop(
            "u1", finished, wakeups, lambda: runs.append(1), resync=0.01, error_backoff=0.01
        )
    )
    await asyncio.sleep(0.2)
    assert len(runs) == 1  # once at start; a finished job then sleeps (resync is for running)
    wakeups.wake("u1")
    await asyncio.sleep(0.2)
    assert len(runs) == 2
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)
    assert len(wakeups) == 0


async def test_a_new_jobs_first_reconcile_waits_for_kopfs_finalizer() -> None:
    """kopf adds its finalizer as it starts the loop: the first decision waits for that write
    (woken by it), else its own write would be refused (409). A finalizer that never comes
    only delays it."""
    wakeups, runs = wake.Wakeups(), []

    def first_waiting_loop(uid: str, job: dict[str, Any], first_wait: float) -> asyncio.Task:
        return asyncio.create_task(
            wake.reconcile_loop(
                uid, job, wakeups, lambda: runs.append(uid), resync=60, error_backoff=0.01,
                first_after=lambda: wake.guarded(job), first_wait=first_wait,
            )
        )  # fmt: skip

    job: dict[str, Any] = {"metadata": {"name": "j", "namespace": "ns"}, "status": {}}
    loop = first_waiting_loop("u1", job, first_wait=30)
    await asyncio.sleep(0.2)
    assert runs == []
    job["metadata"]["finalizers"] = ["rlhf.dev/cleanup"]
    wakeups.wake("u1")  # the finalizer's watch event
    await asyncio.sleep(0.2)
    assert runs == ["u1"]
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)

    never: dict[str, Any] = {"metadata": {"name": "k", "namespace": "ns"}, "status": {}}
    loop = first_waiting_loop("u2", never, first_wait=0.3)
    await asyncio.sleep(0.1)
    assert "u2" not in runs
    await asyncio.sleep(0.5)
    assert runs == ["u1", "u2"]
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)


async def test_a_failing_reconcile_is_retried_and_never_ends_the_loop() -> None:
    wakeups, runs = wake.Wakeups(), []

    def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError("API hiccup")

    finished = body({"phase": "Succeeded", "completionTime": ago(1)})
    loop = asyncio.create_task(
        wake.reconcile_loop("u1", finished, wakeups, flaky, resync=1, error_backoff=0.01)
    )
    await asyncio.sleep(0.5)
    assert len(runs) == 3  # two failures retried (0.01 s, 0.02 s), then at rest
    loop.cancel()
    await asyncio.gather(loop, return_exceptions=True)


def test_a_child_wakes_its_owner_and_the_job_at_its_name() -> None:
    """A re-applied job (new uid) waits for its predecessor's RayJob at its name to go: that
    child's events must wake the new job too, not only its owner (the old uid, gone)."""
    wakeups = wake.Wakeups()
    new = wakeups.register("new-uid", ("ns", "redo"))
    other = wakeups.register("other-uid", ("ns", "other"))
    child = {
        "metadata": {
            "namespace": "ns",
            "labels": {"rlhf.dev/job": "redo"},
            "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "uid": "old-uid"}],
        }
    }
    wakeups.wake_for_child(child)
    assert new.is_set() and not other.is_set()
    wakeups.forget("new-uid", new)
    assert not wakeups.wake_named("ns", "redo")  # its loop ended: nothing left to wake
