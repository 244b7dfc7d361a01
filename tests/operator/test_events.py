"""Event-driven reconcile: children's changes wake their job at once; finished jobs cost nothing.

The resync (RLHF_RESYNC_INTERVAL) is the only timer left. Every operator test runs with it at
60 s (tests/conftest.py), longer than any scenario waits, so each scenario that completes proves
the event path; these tests set it explicitly, long or short, for what they show.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Mapping
from typing import Any

import kmock
import kopf
import pytest
from kube_sim import (
    HANG,
    JOBS,
    MERGE_PATCH,
    RAYJOBS,
    SUCCEED,
    OperatorRunner,
    RLHFEmulator,
    SimulatedKubeRay,
    create_job,
    eventually,
    sample_job,
)
from rlhf_operator import names
from rlhf_operator import settings as operator_settings
from rlhf_operator.metrics import METRICS

NS = "ns"


def phase(api: RLHFEmulator, name: str) -> str | None:
    return ((api.get(JOBS, NS, name) or {}).get("status") or {}).get("phase")


def reconciles(phase_: str) -> float:
    value = METRICS.registry.get_sample_value("rlhf_operator_reconciles_total", {"phase": phase_})
    return value or 0.0


def job_of(rayjob: Mapping[str, Any]) -> str:
    return rayjob["metadata"]["labels"][names.LABEL_JOB]


async def test_a_rayjob_finishing_wakes_its_job_at_once(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operator_settings, "RESYNC_INTERVAL", 3600.0)  # no timer to lean on
    kuberay.plan = lambda rayjob: HANG  # KubeRay leaves it running; the test ends it
    async with OperatorRunner():
        await create_job(api, sample_job("woken"))
        await eventually(lambda: api.get(RAYJOBS, NS, "woken-sft-1"))
        kuberay.plan = lambda rayjob: (
            SUCCEED if rayjob["metadata"]["name"] == "woken-sft-1" else HANG
        )
        url = f"/apis/ray.io/v1/namespaces/{NS}/rayjobs/woken-sft-1/status"
        done = {"status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}
        async with api.patch(url, json=done, headers=MERGE_PATCH) as resp:
            assert resp.status < 300
        # the next stage starts on the RayJob's watch event, not on an hourly resync
        await eventually(lambda: api.get(RAYJOBS, NS, "woken-reward-1"), timeout=30)


async def test_finished_jobs_are_not_reconciled_running_ones_are_resynced(
    api: RLHFEmulator, kuberay: SimulatedKubeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operator_settings, "RESYNC_INTERVAL", 0.3)
    kuberay.plan = lambda rayjob: HANG if job_of(rayjob) == "runs" else SUCCEED
    async with OperatorRunner():
        await create_job(api, sample_job("done"))
        await create_job(api, sample_job("runs"))
        await eventually(lambda: phase(api, "done") == "Succeeded")
        await eventually(lambda: phase(api, "runs") == "Running")
        await asyncio.sleep(1)  # the last writes' own watch events settle
        finished, running = reconciles("Succeeded"), reconciles("Running")
        await asyncio.sleep(2)
        assert reconciles("Succeeded") == finished  # at rest: nothing runs for it
        assert reconciles("Running") > running  # the slow resync covers running jobs only


async def test_each_child_is_created_once_and_kopf_writes_no_diff_base(
    api: RLHFEmulator, kuberay: SimulatedKubeRay
) -> None:
    """A reconcile woken before the watch shows the child it just created (by the job's own
    status write coming back) counts that child as there: it neither creates it again (a 409
    per reconcile) nor writes "Creating ..." into status again. And kopf keeps no diff-base on
    jobs: the operator has no handler that needs one (settings.NoChangeDetection)."""
    async with OperatorRunner():
        await create_job(api, sample_job("once"))
        await eventually(lambda: phase(api, "once") == "Succeeded", timeout=60)
    creates = Counter(
        (request.resource.plural, (request.data.get("metadata") or {}).get("name"))
        for request in api
        if request.action == kmock.action.CREATE
        and request.resource is not None
        and request.resource.plural in (names.RAYCLUSTERS, names.RAYJOBS)
        and isinstance(request.data, dict)
    )
    assert creates and set(creates.values()) == {1}, creates
    annotations = api.get(JOBS, NS, "once")["metadata"].get("annotations") or {}
    assert not [key for key in annotations if key.endswith("last-handled-configuration")]
    registry = kopf.get_default_registry()
    reasons = {handler.reason for handler in registry._changing.get_all_handlers()}
    assert reasons <= {kopf.Reason.DELETE}, "a handler that needs kopf's diff-base"
