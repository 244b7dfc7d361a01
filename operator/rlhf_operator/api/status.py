"""`RLHFJob.status`: written by the operator (and the trainer's progress reports), read by users.

`phase`/`stage` drive the operator's state machine; `progress` and `reward` are the flat strings
behind the PROGRESS and REWARD printer columns (JSONPath columns cannot compute).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from rlhf_operator.api.common import ApiModel

Phase = Literal["Pending", "Queued", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]
StageState = Literal["Pending", "Running", "Retrying", "Succeeded", "Failed", "Skipped"]
ConditionStatus = Literal["True", "False", "Unknown"]

TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})


def is_terminal(phase: str | None) -> bool:
    """True once a job can make no more progress (Succeeded or Failed)."""
    return phase in TERMINAL_PHASES


class Condition(ApiModel):
    """A Kubernetes-style condition (Valid, ClusterReady, <Stage>Complete, Succeeded, Failed)."""

    type: str = Field(description="Condition type.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail.")
    last_transition_time: str | None = Field(default=None, description="RFC 3339 time.")
    observed_generation: int | None = Field(default=None, description="Generation observed.")


class Progress(ApiModel):
    """How far the running stage is (reported by the trainer)."""

    percent: float = Field(default=0.0, ge=0, le=100, description="Percent of steps done.")
    step: int = Field(default=0, ge=0, description="Steps done.")
    total_steps: int = Field(default=0, ge=0, description="Steps planned.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated time left.")


HISTORY_LIMIT = 50
"""Most points a stage's `history` keeps (bounded: status objects must stay small)."""

HISTORY_METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("loss",),
    "reward": ("loss", "accuracy"),
    "ppo": ("reward_mean", "kl"),
    "dpo": ("loss", "reward_accuracy"),
}
"""Metrics a stage keeps a curve of in `history` (the `kubectl rlhf status` sparklines)."""


class HistoryPoint(ApiModel):
    """One point of a stage's metric curve."""

    step: int = Field(ge=0, description="Training step of the point.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Values of the stage's curve metrics at that step."
    )


def append_history(
    history: list[HistoryPoint], point: HistoryPoint, limit: int = HISTORY_LIMIT
) -> list[HistoryPoint]:
    """`history` plus `point`, never longer than `limit`, still spanning the whole run.

    When full, the inner point whose removal leaves the smallest gap in steps is dropped: the
    curve keeps its start and end and thins out evenly, instead of forgetting the start of a long
    run (a plain ring buffer would) — a few dozen points draw a sparkline of any length of run.
    """
    points = [*history, point]
    while len(points) > max(limit, 2):
        gaps = [points[i + 1].step - points[i - 1].step for i in range(1, len(points) - 1)]
        del points[1 + gaps.index(min(gaps))]
    return points


class StageStatus(ApiModel):
    """One stage of the pipeline."""

    state: StageState = Field(default="Pending", description="Stage state.")
    attempts: int = Field(default=0, ge=0, description="RayJob attempts started.")
    failures: int = Field(
        default=0,
        ge=0,
        description="Failed attempts, counted against runPolicy.backoffLimit (a resume after "
        "suspension starts a new attempt but is no failure).",
    )
    start_time: str | None = Field(default=None, description="When the first attempt started.")
    completion_time: str | None = Field(default=None, description="When the stage finished.")
    ray_job: str | None = Field(default=None, description="RayJob of the current attempt.")
    artifact: str | None = Field(default=None, description="Where the stage wrote its output.")
    resumed_from_step: int | None = Field(
        default=None, description="Checkpoint step the current attempt resumed from."
    )
    message: str | None = Field(default=None, description="Last failure reason.")
    waiting_since: str | None = Field(
        default=None,
        description="When the current attempt began waiting for its RayJob name to be free "
        "(a RayJob left there by an earlier RLHFJob of the same name); "
        "spec.cluster.provisionTimeoutSeconds bounds the wait.",
    )
    progress: Progress | None = Field(default=None, description="Live progress.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Latest metrics (loss, accuracy, reward, kl, ...)."
    )
    history: list[HistoryPoint] = Field(
        default_factory=list,
        max_length=HISTORY_LIMIT,
        description="Bounded curve of the stage's key metrics (reported by the trainer).",
    )


class ClusterStatus(ApiModel):
    """The Ray cluster running the job."""

    name: str | None = Field(default=None, description="RayCluster name.")
    reused: bool = Field(default=False, description="Claimed from a warm pool.")
    dashboard_url: str | None = Field(
        default=None, alias="dashboardURL", description="Ray dashboard URL inside the cluster."
    )
    waiting_since: str | None = Field(
        default=None,
        description="When the job began waiting for this cluster to be ready (cleared once it "
        "is); spec.cluster.provisionTimeoutSeconds counts from here.",
    )


class EvaluationSummary(ApiModel):
    """Headline result of the evaluation stage."""

    win_rate: float | None = Field(
        default=None, description="RLHF beats SFT by the reward model, fraction of comparisons."
    )
    mean_reward_before: float | None = Field(default=None, description="Mean reward, SFT policy.")
    mean_reward_after: float | None = Field(default=None, description="Mean reward, PPO policy.")
    judge_win_rate: float | None = Field(
        default=None,
        description="RLHF beats SFT by the independent judge (spec.stages.evaluation.judge); "
        "far below winRate means the policy learned to please the reward model, not the task.",
    )
    judge: str | None = Field(default=None, description="The judge (spec.stages.evaluation.judge).")
    judge_mean_before: float | None = Field(default=None, description="Mean judge score, SFT.")
    judge_mean_after: float | None = Field(default=None, description="Mean judge score, PPO.")


class RLHFJobStatus(ApiModel):
    """Observed state of an RLHFJob."""

    phase: Phase = Field(default="Pending", description="Lifecycle phase.")
    stage: str | None = Field(default=None, description="Stage running or last run.")
    message: str | None = Field(default=None, description="Why the job is in this phase.")
    progress: str | None = Field(default=None, description="Column text, e.g. 'ppo 2/4 45%'.")
    reward: str | None = Field(default=None, description="Column text: latest mean reward.")
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")
    stages: dict[str, StageStatus] = Field(default_factory=dict, description="Per-stage status.")
    cluster: ClusterStatus = Field(default_factory=ClusterStatus, description="Ray cluster.")
    evaluation: EvaluationSummary | None = Field(default=None, description="Evaluation result.")
    start_time: str | None = Field(default=None, description="When the job started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    observed_generation: int | None = Field(default=None, description="Spec generation seen.")
