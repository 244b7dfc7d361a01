"""The trainer's progress reports land in its job's RLHFJobProgress over real HTTP (KMock's
emulator); the operator mirrors them into the RLHFJob (test_pipeline.py shows that end to end).

The trainer side is synchronous (the official `kubernetes` client), so each "training loop" runs
in a worker thread while the emulator serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import kmock
import pytest
import pytest_asyncio
import yaml
from kubernetes import client
from rlhf_operator.api import GROUP, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL
from rlhf_operator.reconcile.progress import build_progress
from rlhf_trainer.progress import ProgressReporter
from rlhf_trainer.status_sink import KubernetesStatusSink

RESOURCE = f"{GROUP}/{VERSION}/{PROGRESS_PLURAL}"
NAMESPACE, NAME = "team-a", "demo"
FAKE_TOKEN = "sa-token-must-never-be-logged"


@attrs.define(kw_only=True)
class AuthorizingEmulator(kmock.KubernetesEmulator):
    """KMock's emulator plus the one API-server semantic these tests need: RBAC denial.

    A request whose (method, subresource) is in `denied` gets 403 Forbidden *before* any state
    change, as the real authorizer answers. (The plain emulator applies a patch even when a
    reaction answers it with an error, so a reaction alone would not model a denied write.)
    """

    denied: set[tuple[str, str | None]] = attrs.field(factory=set)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and (request.method.value, request.subresource) in (
            self.denied
        ):
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message=f"cannot {request.method.value.lower()} resource "
                f'"{PROGRESS_PLURAL}/status"',
            )
        return await super()._handle(request)


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[AuthorizingEmulator]:
    async with AuthorizingEmulator() as handler, kmock.Server(handler):
        # as the operator creates it when the stage starts
        owner = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLHFJob", "name": NAME, "uid": "u"}
        handler.objects[RESOURCE, NAMESPACE, NAME] = build_progress(NAME, NAMESPACE, owner)
        yield handler


def api_client_for(emulator: AuthorizingEmulator) -> client.ApiClient:
    configuration = client.Configuration(host=str(emulator.url).rstrip("/"))
    configuration.api_key = {"authorization": f"Bearer {FAKE_TOKEN}"}
    return client.ApiClient(configuration)


def stored_status(emulator: AuthorizingEmulator) -> dict[str, Any]:
    return dict(emulator.objects[RESOURCE, NAMESPACE, NAME]).get("status", {})


class StepClock:
    """Each reading advances 40 s: every update is past the 30 s throttle."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 40.0
        return self.now


def train(reporter: ProgressReporter, steps: int, rewards: list[float]) -> int:
    """A stand-in training loop: what matters is that it runs to the end."""
    done = 0
    for step in range(1, steps + 1):
        reporter.update(step, {"reward_mean": rewards[step - 1], "kl": 0.01 * step})
        done = step
    reporter.finish({"reward_mean": rewards[-1], "kl": 0.05})
    return done


async def test_progress_reaches_the_jobs_progress_object(emulator: AuthorizingEmulator) -> None:
    sink = KubernetesStatusSink(NAME, NAMESPACE, "ppo", api_client=api_client_for(emulator))
    reporter = ProgressReporter("ppo", 10, [sink], clock=StepClock())

    await asyncio.to_thread(reporter.update, 4, {"reward_mean": 0.4567, "kl": 0.02})
    status = stored_status(emulator)
    progress = status["stages"]["ppo"]["progress"]
    assert (progress["percent"], progress["step"], progress["totalSteps"]) == (40.0, 4, 10)
    assert progress["etaSeconds"] > 0
    assert status["stages"]["ppo"]["metrics"] == {"reward_mean": 0.4567, "kl": 0.02}
    assert set(status) == {"stages"}  # nothing but the stage's report

    await asyncio.to_thread(reporter.finish, {"reward_mean": 0.731})
    status = stored_status(emulator)
    assert status["stages"]["ppo"]["progress"]["percent"] == 100.0
    assert [p["step"] for p in status["stages"]["ppo"]["history"]] == [4, 10]

    patches = [r for r in emulator if r.method.value == "PATCH"]
    # Only the progress object's status: no request reaches an RLHFJob at all.
    assert patches and all(r.subresource == "status" for r in patches)
    assert {r.resource.plural for r in emulator if r.resource is not None} == {PROGRESS_PLURAL}
    assert all(r.headers["Content-Type"] == "application/merge-patch+json" for r in patches)


async def test_from_env_finds_the_job_through_a_kubeconfig(
    emulator: AuthorizingEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "emu", "cluster": {"server": str(emulator.url)}}],
                "users": [{"name": "trainer", "user": {"token": FAKE_TOKEN}}],
                "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "trainer"}}],
                "current-context": "emu",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("RLHF_JOB_NAME", NAME)
    monkeypatch.setenv("RLHF_JOB_NAMESPACE", NAMESPACE)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("RLHF_PROGRESS_FILE", raising=False)

    reporter = ProgressReporter.from_env("sft", 8, clock=StepClock())
    await asyncio.to_thread(reporter.update, 2, {"loss": 2.5})
    await asyncio.to_thread(reporter.finish, {"loss": 1.25, "eval_loss": 1.5})

    status = stored_status(emulator)
    assert status["stages"]["sft"]["metrics"] == {"loss": 1.25, "eval_loss": 1.5}
    assert status["stages"]["sft"]["progress"]["step"] == 8


async def test_forbidden_status_patch_warns_once_and_training_goes_on(
    emulator: AuthorizingEmulator, caplog: pytest.LogCaptureFixture
) -> None:
    emulator.denied.add(("PATCH", "status"))
    sink = KubernetesStatusSink(NAME, NAMESPACE, "ppo", api_client=api_client_for(emulator))
    reporter = ProgressReporter("ppo", 5, [sink], clock=StepClock())

    with caplog.at_level(logging.DEBUG):
        done = await asyncio.to_thread(train, reporter, 5, [0.1, 0.2, 0.3, 0.4, 0.5])

    assert done == 5  # the caller trained to the end
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == [
        "progress reporting disabled: the trainer's ServiceAccount lacks patch on "
        f"rlhfjobprogresses/status in namespace {NAMESPACE} (403 Forbidden); grant it with "
        "the chart's trainer Role"
    ]
    assert FAKE_TOKEN not in caplog.text
    assert len([r for r in emulator if r.method.value == "PATCH"]) == 1  # then disabled
    assert "stages" not in stored_status(emulator)  # a denied write changes nothing
    assert reporter.active_sinks == []
