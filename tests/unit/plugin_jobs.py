"""Realistic RLHFJob snapshots (spec + status, as the API returns them) in every phase.

Built with the project's own code where the trainer or the operator would write a field: the
column strings come from `api.columns`, the metric curves from `api.status.append_history`.
Used by the render tests and by the README's screenshots-as-text.
"""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, timedelta
from typing import Any

from rlhf_operator.api.columns import progress_column, reward_column
from rlhf_operator.api.status import HistoryPoint, append_history
from rlhf_operator.reconcile import kuberay

NOW = datetime(2025, 3, 1, 14, 0, 0, tzinfo=UTC)
STAGES = ["sft", "reward", "ppo", "evaluation"]
CLUSTER = "imdb-ppo-ray"


def ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(**delta: float) -> str:
    return ts(NOW - timedelta(**delta))


SPEC: dict[str, Any] = {
    "model": {"base": "gpt2"},
    "storage": {"uri": "s3://rlhf-artifacts/runs", "secretRef": {"name": "s3-creds"}},
    "stages": {
        "sft": {"dataset": {"uri": "imdb-demos.jsonl"}, "epochs": 1, "batchSize": 32},
        "reward": {"dataset": {"uri": "imdb-prefs.jsonl"}, "batchSize": 32},
        "ppo": {"prompts": {"uri": "imdb-prompts.jsonl"}, "steps": 100, "rolloutBatchSize": 64},
        "evaluation": {"numPrompts": 64},
    },
    "cluster": {
        "workers": {
            "replicas": 2,
            "gpusPerWorker": 1,
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
        }
    },
}


def manifest(created: str, status: dict[str, Any] | None) -> dict[str, Any]:
    job: dict[str, Any] = {
        "apiVersion": "rlhf.dev/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": "imdb-ppo", "namespace": "ml", "creationTimestamp": created},
        "spec": copy.deepcopy(SPEC),
    }
    if status is not None:
        job["status"] = status
    return job


def ppo_curve(step: int) -> dict[str, float]:
    """Mean reward rising and KL drifting up, as a healthy PPO run does (with a little noise)."""
    reward = 0.12 + 0.611 * (1 - math.exp(-step / 12)) / (1 - math.exp(-45 / 12))
    kl = 0.042 * (step / 45) ** 1.3
    wiggle = 0.015 * math.sin(step * 1.7) if 0 < step < 45 else 0.0
    return {"reward_mean": round(reward + wiggle, 4), "kl": round(kl, 4)}


def history(curve: Any, steps: range) -> list[dict[str, Any]]:
    points: list[HistoryPoint] = []
    for step in steps:
        points = append_history(points, HistoryPoint(step=step, metrics=curve(step)))
    return [p.to_wire() for p in points]


def conditions(*types: str) -> list[dict[str, str]]:
    return [{"type": t, "status": "True", "reason": t} for t in ("Valid", *types)]


SFT_DONE = {
    "state": "Succeeded",
    "attempts": 1,
    "startTime": ago(minutes=117),
    "completionTime": ago(minutes=74, seconds=50),
    "rayJob": "imdb-ppo-sft-1",
    "artifact": "s3://rlhf-artifacts/runs/imdb-ppo/sft",
    "progress": {"percent": 100.0, "step": 300, "totalSteps": 300, "etaSeconds": 0},
    "metrics": {"loss": 1.12, "eval_loss": 1.19, "learning_rate": 1e-5},
    "history": history(lambda s: {"loss": round(3.1 * math.exp(-s / 80) + 1.0, 4)}, range(300)),
}
REWARD_DONE = {
    "state": "Succeeded",
    "attempts": 2,
    "failures": 1,
    "startTime": ago(minutes=74, seconds=30),
    "completionTime": ago(minutes=49, seconds=30),
    "rayJob": "imdb-ppo-reward-2",
    "artifact": "s3://rlhf-artifacts/runs/imdb-ppo/reward",
    "resumedFromStep": 200,
    "progress": {"percent": 100.0, "step": 400, "totalSteps": 400, "etaSeconds": 0},
    "metrics": {"loss": 0.41, "accuracy": 0.81, "eval_accuracy": 0.78, "learning_rate": 1e-5},
}
PPO_METRICS = {
    "reward_mean": 0.731,
    "kl": 0.042,
    "policy_loss": -0.018,
    "value_loss": 0.094,
    "clip_fraction": 0.12,
    "kl_coef": 0.05,
    "learning_rate": 1e-6,
}


def pending_job() -> dict[str, Any]:
    return manifest(ago(seconds=10), {"phase": "Pending", "conditions": conditions()})


def provisioning_job() -> dict[str, Any]:
    return manifest(
        ago(minutes=20),
        {
            "phase": "Provisioning",
            "startTime": ago(minutes=20),
            "cluster": {"name": CLUSTER, "reused": False},
            "conditions": conditions(),
        },
    )


def provisioning_pods() -> list[dict[str, Any]]:
    """The cluster's head runs; both GPU workers wait for a node with a free GPU."""
    unschedulable = (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
        "available: 3 No preemption victims found for incoming pod."
    )
    head = {
        "metadata": {"name": f"{CLUSTER}-head-9zq4t", "labels": {"ray.io/cluster": CLUSTER}},
        "spec": {"containers": [{"name": "ray-head"}]},
        "status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]},
    }
    workers = [
        {
            "metadata": {
                "name": f"{CLUSTER}-gpu-workers-{suffix}",
                "labels": {"ray.io/cluster": CLUSTER},
            },
            "spec": {"containers": [{"name": "ray-worker"}]},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": unschedulable,
                    }
                ],
            },
        }
        for suffix in ("x7k2p", "m4q9z")
    ]
    return [head, *workers]


def running_job(percent: float = 45.0) -> dict[str, Any]:
    """Mid-PPO: SFT done, the reward model done on its second attempt, PPO at 45%."""
    step = int(percent)
    metrics = {**PPO_METRICS, **ppo_curve(step)} if step != 45 else dict(PPO_METRICS)
    return manifest(
        ago(hours=2),
        {
            "phase": "Running",
            "stage": "ppo",
            "progress": progress_column("ppo", STAGES, percent),
            "reward": reward_column(metrics),
            "startTime": ago(hours=2),
            "cluster": {
                "name": CLUSTER,
                "reused": False,
                "dashboardURL": f"http://{CLUSTER}-head-svc.ml.svc.cluster.local:8265",
            },
            "conditions": conditions("ClusterReady", "SftComplete", "RewardComplete"),
            "stages": {
                "sft": copy.deepcopy(SFT_DONE),
                "reward": copy.deepcopy(REWARD_DONE),
                "ppo": {
                    "state": "Running",
                    "attempts": 1,
                    "startTime": ago(minutes=49, seconds=20),
                    "rayJob": "imdb-ppo-ppo-1",
                    "progress": {
                        "percent": percent,
                        "step": step,
                        "totalSteps": 100,
                        "etaSeconds": 4800.0,
                    },
                    "metrics": metrics,
                    "history": history(ppo_curve, range(step + 1)),
                },
            },
        },
    )


def succeeded_job() -> dict[str, Any]:
    """All four stages done; the evaluation's win rate is the headline."""
    job = running_job()
    status = job["status"]
    status.update(
        phase="Succeeded",
        stage="evaluation",
        progress=progress_column("evaluation", STAGES, 100),
        reward=reward_column({"win_rate": 0.688}),
        completionTime=ago(minutes=1),
        evaluation={"winRate": 0.688, "meanRewardBefore": 0.214, "meanRewardAfter": 0.731},
        conditions=conditions("ClusterReady", "SftComplete", "RewardComplete", "PpoComplete",
                              "EvaluationComplete", "Succeeded"),
    )  # fmt: skip
    status["stages"]["ppo"].update(
        state="Succeeded",
        startTime=ago(minutes=49, seconds=20),
        completionTime=ago(minutes=10),
        progress={"percent": 100.0, "step": 100, "totalSteps": 100, "etaSeconds": 0},
    )
    status["stages"]["evaluation"] = {
        "state": "Succeeded",
        "attempts": 1,
        "startTime": ago(minutes=9, seconds=30),
        "completionTime": ago(minutes=2),
        "rayJob": "imdb-ppo-evaluation-1",
        "artifact": "s3://rlhf-artifacts/runs/imdb-ppo/evaluation",
        "metrics": {"win_rate": 0.688, "mean_reward_sft": 0.214, "mean_reward_rlhf": 0.731,
                    "prompts_improved_fraction": 0.72},
    }  # fmt: skip
    return job


OOM = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {} GiB"


def failed_job() -> dict[str, Any]:
    """PPO failed three times running out of GPU memory; backoffLimit 2 is spent."""
    job = running_job(percent=12.0)
    status = job["status"]
    reason = operator_reason(failed_rayjobs()[-1])
    failed = f"Stage ppo failed after 3 attempt(s): {reason}"  # the operator's words
    status.update(
        phase="Failed",
        message=f"{failed} (spec.runPolicy.backoffLimit reached).",
        completionTime=ago(minutes=5),
        conditions=[*conditions("ClusterReady", "SftComplete", "RewardComplete"),
                    {"type": "Failed", "status": "True", "reason": "StageFailed",
                     "message": failed}],
    )  # fmt: skip
    status["stages"]["ppo"].update(
        state="Failed",
        attempts=3,
        failures=3,
        rayJob="imdb-ppo-ppo-3",
        completionTime=ago(minutes=5),
        message=reason,
    )
    return job


def operator_reason(rayjob: dict[str, Any]) -> str:
    """The failure reason the operator records in status for a failed RayJob (its own words)."""
    observation = kuberay.observe_rayjob(rayjob)
    return kuberay.rayjob_outcome(observation)[1]


def failed_rayjobs() -> list[dict[str, Any]]:
    """The three PPO attempts as KubeRay reports them (Ray appends the driver's log tail)."""
    return [
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {
                "name": f"imdb-ppo-ppo-{n}",
                "namespace": "ml",
                "creationTimestamp": ago(minutes=50 - 15 * n),
                "labels": {"rlhf.dev/job": "imdb-ppo", "rlhf.dev/stage": "ppo"},
            },
            "status": {
                "jobStatus": "FAILED",
                "jobDeploymentStatus": "Failed",
                "message": "Job entrypoint command failed with exit code 1, last available logs "
                '(truncated to 20,000 chars):\n  File "ppo.py", line 212, in step\n'
                + OOM.format(size),
            },
        }
        for n, size in ((1, "2.00"), (2, "2.25"), (3, "2.50"))
    ]


def suspended_job() -> dict[str, Any]:
    job = running_job()
    job["spec"]["runPolicy"] = {"suspend": True}
    status = job["status"]
    status.update(phase="Suspended", message="suspended by spec.runPolicy.suspend")
    status["cluster"] = {}
    status["stages"]["ppo"]["state"] = "Pending"
    del status["stages"]["ppo"]["progress"]
    return job


def watch_snapshots() -> list[tuple[dict[str, Any], datetime]]:
    """The running job as `kubectl get rlhfjobs -w` sees it change: (object, time seen)."""
    created = NOW - timedelta(hours=2)

    def at(minutes: float, **status: Any) -> tuple[dict[str, Any], datetime]:
        return manifest(ts(created), status), created + timedelta(minutes=minutes)

    def reward(metrics: dict[str, float]) -> str | None:
        return reward_column(metrics)

    return [
        at(0, phase="Pending"),
        at(0.1, phase="Provisioning", cluster={"name": CLUSTER}),
        at(3, phase="Running", stage="sft", progress=progress_column("sft", STAGES, 0),
           cluster={"name": CLUSTER}),
        at(24, phase="Running", stage="sft", progress=progress_column("sft", STAGES, 50.3),
           cluster={"name": CLUSTER}),
        at(46, phase="Running", stage="reward", progress=progress_column("reward", STAGES, 1),
           cluster={"name": CLUSTER}),
        at(71, phase="Running", stage="ppo", progress=progress_column("ppo", STAGES, 1),
           reward=reward(ppo_curve(1)), cluster={"name": CLUSTER}),
        at(95, phase="Running", stage="ppo", progress=progress_column("ppo", STAGES, 22),
           reward=reward(ppo_curve(22)), cluster={"name": CLUSTER}),
        at(120, phase="Running", stage="ppo", progress=progress_column("ppo", STAGES, 45),
           reward=reward(PPO_METRICS), cluster={"name": CLUSTER}),
    ]  # fmt: skip
