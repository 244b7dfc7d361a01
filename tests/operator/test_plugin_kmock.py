"""`kubectl rlhf` against KMock's Kubernetes emulator: real HTTP, a real kubeconfig, the official
client — what a user gets from `list`, `status -o json` and `logs`.

The plugin is synchronous, so each command runs in a worker thread while the emulator serves on
the test's event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import kmock
import pytest
import pytest_asyncio
import yaml
from rlhf_operator.api import GROUP, PLURAL, VERSION
from rlhf_operator.plugin.cli import main

JOBS = f"{GROUP}/{VERSION}/{PLURAL}"
PODS = "v1/pods"
RAYJOBS = "ray.io/v1/rayjobs"
EVENTS = "v1/events"
NS = "ml"
NOW = datetime.now(UTC)


def ago(minutes: float) -> str:
    return (NOW - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


@attrs.define(kw_only=True)
class SelectingEmulator(kmock.KubernetesEmulator):
    """KMock's emulator plus list selectors, as the API server applies them.

    KMock 0.8 ignores `labelSelector` and `fieldSelector` and lists every object; the plugin
    relies on the server to pick a cluster's pods or a RayJob's submitter pod, so this adds
    equality selectors (`k=v`, `k==v`, `k!=v`, bare `k`), comma-joined, exactly as documented
    for the API server.
    """

    async def _serve_list(self, request: kmock.Request) -> Any:
        listing = await super()._serve_list(request)
        labels = _parse_selector(request.params.get("labelSelector", ""))
        fields = _parse_selector(request.params.get("fieldSelector", ""))
        listing["items"] = [
            item
            for item in listing["items"]
            if _matches(labels, lambda key, item=item: _label(item, key))
            and _matches(fields, lambda key, item=item: _field(item, key))
        ]
        return listing


def _parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    terms = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, value = term.split(op, 1)
                terms.append((key.strip(), op, value.strip()))
                break
        else:
            terms.append((term, "exists", None))
    return terms


def _matches(terms: list[tuple[str, str, str | None]], get: Any) -> bool:
    for key, op, value in terms:
        have = get(key)
        if (op == "exists" and have is None) or (op == "!=" and have == value):
            return False
        if op in ("=", "==") and have != value:
            return False
    return True


def _label(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def _field(obj: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


# ---------------------------------------------------------------------------- the cluster


def job(name: str, namespace: str, status: dict[str, Any], gpus: int = 1) -> dict[str, Any]:
    data = {"uri": "/data/x.jsonl"}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RLHFJob",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": ago(90)},
        "spec": {
            "model": {"base": "gpt2"},
            "storage": {"uri": "s3://bucket/runs"},
            "stages": {"sft": {"dataset": data}, "reward": {"dataset": data},
                       "ppo": {"prompts": data}},
            "cluster": {"workers": {"replicas": 2, "gpusPerWorker": gpus}},
        },
        "status": status,
    }  # fmt: skip


def pod(name: str, labels: dict[str, str], pending: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running"}
    if pending:
        status = {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False",
                            "reason": "Unschedulable", "message": pending}],
        }  # fmt: skip
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels,
                     "creationTimestamp": ago(5)},
        "spec": {"containers": [{"name": "ray-job-submitter"}, {"name": "sidecar"}]},
        "status": status,
    }  # fmt: skip


def rayjob(name: str, job_name: str, stage: str, message: str) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": NS, "creationTimestamp": ago(30),
                     "labels": {"rlhf.dev/job": job_name, "rlhf.dev/stage": stage}},
        "status": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                   "message": f"Job entrypoint command failed with exit code 1\n{message}"},
    }  # fmt: skip


NO_GPU = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {} GiB"


def populate(emulator: SelectingEmulator) -> None:
    objects = emulator.objects
    objects[JOBS, NS, "tuned"] = job(
        "tuned",
        NS,
        {
            "phase": "Running",
            "stage": "ppo",
            "progress": "ppo 3/3 45%",
            "reward": "0.731",
            "cluster": {"name": "tuned-ray"},
            "stages": {
                "sft": {
                    "state": "Succeeded",
                    "attempts": 1,
                    "startTime": ago(80),
                    "completionTime": ago(60),
                },
                "reward": {
                    "state": "Succeeded",
                    "attempts": 1,
                    "startTime": ago(60),
                    "completionTime": ago(40),
                },
                "ppo": {
                    "state": "Running",
                    "attempts": 1,
                    "startTime": ago(39),
                    "rayJob": "tuned-ppo-1",
                    "progress": {"percent": 45.0, "step": 45, "totalSteps": 100},
                    "metrics": {"reward_mean": 0.731, "kl": 0.042},
                    "history": [
                        {"step": 0, "metrics": {"reward_mean": 0.12, "kl": 0.0}},
                        {"step": 45, "metrics": {"reward_mean": 0.731, "kl": 0.042}},
                    ],
                },
            },
        },
    )
    objects[JOBS, NS, "starved"] = job(
        "starved",
        NS,
        {
            "phase": "Provisioning",
            "startTime": ago(30),
            "cluster": {"name": "starved-ray"},
        },
        gpus=8,
    )
    objects[JOBS, NS, "crashy"] = job(
        "crashy",
        NS,
        {
            "phase": "Failed",
            "stage": "ppo",
            "message": "stage ppo failed 2 times",
            "cluster": {"name": "crashy-ray"},
            "stages": {
                "ppo": {
                    "state": "Failed",
                    "attempts": 2,
                    "failures": 2,
                    "rayJob": "crashy-ppo-2",
                    "message": OOM.format("3.10"),
                }
            },
        },
    )
    objects[JOBS, "other", "elsewhere"] = job("elsewhere", "other", {"phase": "Succeeded"})

    # `starved`: its head runs, its workers wait for GPUs. Another cluster's pod waits too, for
    # another reason: the hint must only speak of this job's cluster.
    objects[PODS, NS, "starved-ray-head"] = pod(
        "starved-ray-head", {"ray.io/cluster": "starved-ray"}
    )
    for i in range(2):
        objects[PODS, NS, f"starved-ray-gpu-{i}"] = pod(
            f"starved-ray-gpu-{i}", {"ray.io/cluster": "starved-ray"}, pending=NO_GPU
        )
    objects[PODS, NS, "someone-else"] = pod(
        "someone-else", {"ray.io/cluster": "other-ray"}, pending="0/4 nodes: Insufficient memory."
    )
    # `crashy`: two PPO attempts died of the same OOM; another job's RayJob failed otherwise.
    objects[RAYJOBS, NS, "crashy-ppo-1"] = rayjob(
        "crashy-ppo-1", "crashy", "ppo", OOM.format("2.80")
    )
    objects[RAYJOBS, NS, "crashy-ppo-2"] = rayjob(
        "crashy-ppo-2", "crashy", "ppo", OOM.format("3.10")
    )
    objects[RAYJOBS, NS, "tuned-ppo-0"] = rayjob("tuned-ppo-0", "tuned", "ppo", "ValueError: nope")
    # Events: `describe crashy` shows crashy's, not tuned's.
    for job_name, reason, message in (
        ("crashy", "StageRetried", "stage ppo attempt 2 (resumes from the last checkpoint)"),
        ("crashy", "JobFailed", "stage ppo failed 2 times"),
        ("tuned", "StageStarted", "stage ppo started"),
    ):
        objects[EVENTS, NS, f"{job_name}.{reason}"] = {
            "apiVersion": "v1", "kind": "Event", "type": "Normal", "reason": reason,
            "message": message, "count": 1,
            "metadata": {"name": f"{job_name}.{reason}", "namespace": NS},
            "involvedObject": {"kind": "RLHFJob", "name": job_name, "namespace": NS},
        }  # fmt: skip
    # Submitter pods (KubeRay's batch Job named after the RayJob): the plugin must pick tuned's.
    objects[PODS, NS, "tuned-ppo-1-abcde"] = pod("tuned-ppo-1-abcde", {"job-name": "tuned-ppo-1"})
    objects[PODS, NS, "crashy-ppo-2-fghij"] = pod(
        "crashy-ppo-2-fghij", {"job-name": "crashy-ppo-2"}
    )
    emulator[f"get /api/v1/namespaces/{NS}/pods/tuned-ppo-1-abcde/log"] << (
        b"PPO step 44/100 reward_mean=0.729\nPPO step 45/100 reward_mean=0.731\n"
    )


@pytest_asyncio.fixture()
async def emulator() -> AsyncIterator[SelectingEmulator]:
    async with SelectingEmulator() as handler, kmock.Server(handler):
        populate(handler)
        yield handler


@pytest.fixture
def kubeconfig(
    emulator: SelectingEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A kubeconfig whose current context points at the emulator, namespace `ml`."""
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": str(emulator.url).rstrip("/")}}],
        "users": [{"name": "dev", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "dev",
                                                   "namespace": NS}}],
    }))  # fmt: skip
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------- tests


async def test_list_shows_the_contexts_namespace_with_columns(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "list", "-o", "json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)["items"]}
    assert sorted(rows) == ["crashy", "starved", "tuned"]  # not `other/elsewhere`
    assert rows["tuned"]["phase"] == "Running" and rows["tuned"]["stage"] == "ppo"
    assert rows["tuned"]["progress"] == "ppo 3/3 45%" and rows["tuned"]["reward"] == "0.731"
    assert rows["starved"]["cluster"] == "starved-ray"

    code, out, _ = await run(capsys, "list", "--all-namespaces")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "NAME", "PHASE", "STAGE", "PROGRESS", "REWARD", "CLUSTER", "AGE",
    ]  # fmt: skip
    assert any(line.split()[:3] == ["other", "elsewhere", "Succeeded"] for line in lines)


async def test_status_json_explains_a_cluster_waiting_for_gpus(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "status", "starved", "-o", "json")
    assert code == 0
    status = json.loads(out)
    assert status["phase"] == "Provisioning"
    assert [h["reason"] for h in status["hints"]] == ["InsufficientGPU"]
    message = status["hints"][0]["message"]
    assert "starved-ray-gpu-0, starved-ray-gpu-1" in message and "someone-else" not in message
    assert "Each worker asks for 8 nvidia.com/gpu" in message


async def test_status_json_reports_progress_and_a_repeated_failure(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "-n", NS, "status", "tuned", "-o", "json")
    assert code == 0
    tuned = json.loads(out)
    ppo = next(s for s in tuned["stages"] if s["name"] == "ppo")
    assert ppo["progress"]["percent"] == 45.0 and ppo["metrics"]["reward_mean"] == 0.731
    assert [p["step"] for p in ppo["history"]] == [0, 45]
    assert tuned["stageIndex"] == 3 and tuned["stageCount"] == 4
    assert tuned["hints"] == []  # tuned's own old RayJob failure is once, not twice

    code, out, _ = await run(capsys, "status", "crashy", "-o", "json")
    assert code == 0
    reasons = [h["reason"] for h in json.loads(out)["hints"]]
    assert reasons == ["SameErrorRepeated", "OutOfMemory"]


async def test_describe_adds_conditions_and_the_jobs_own_events(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "describe", "crashy")
    assert code == 0
    events = out.split("Events:")[1]
    assert "StageRetried" in events and "stage ppo failed 2 times" in events
    assert "StageStarted" not in events
    assert "SameErrorRepeated" in out.split("Events:")[0]


async def test_text_status_of_a_running_job(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "status", "tuned")
    assert code == 0
    assert "Running - stage ppo (3/4)" in out and " 45%" in out
    assert "reward_mean 0.731" in out and "Curves (ppo, steps 0-45, 2 points)" in out


async def test_logs_stream_the_stage_submitter_pod(
    emulator: SelectingEmulator, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run(capsys, "logs", "tuned", "--stage", "ppo")
    assert code == 0
    assert out.splitlines()[-1] == "PPO step 45/100 reward_mean=0.731"
    log_request = [r for r in emulator if r.url.path.endswith("/log")][-1]
    assert log_request.params["container"] == "ray-job-submitter"


async def test_unknown_job_and_missing_stage_are_clear_errors(
    kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = await run(capsys, "status", "nope")
    assert code == 1
    assert 'rlhfjob "nope" not found in namespace "ml"' in err

    code, _, err = await run(capsys, "logs", "starved")
    assert code == 1
    assert "starved has not started a stage yet" in err
