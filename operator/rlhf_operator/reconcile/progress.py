"""The trainer's RLHFJobProgress, as the operator reads it: create, observe, mirror (pure).

The trainer writes only its job's RLHFJobProgress (api/progress.py says why); the operator
copies the progress fields of it into RLHFJob status, and nothing else: phase, stage, attempts,
conditions and the cluster stay the operator's alone. Only a progress object the job owns
(ownerReference uid) is read, and only for stages the job has started: a report for a stage
that is pending or skipped, or for a stage name the job does not have, is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from rlhf_operator.api import API_VERSION, RLHFJob, RLHFJobStatus
from rlhf_operator.api.columns import progress_column, reward_column
from rlhf_operator.api.progress import PROGRESS_KIND, ProgressStatus, StageProgress
from rlhf_operator.api.status import EvaluationSummary

STARTED_STATES = frozenset({"Running", "Retrying", "Succeeded", "Failed"})


@dataclass(frozen=True)
class ProgressObservation:
    """An RLHFJobProgress as the watch last saw it."""

    name: str
    owner_uids: tuple[str, ...] = ()
    stages: Mapping[str, StageProgress] = field(default_factory=dict)


def observe_progress(body: Mapping[str, Any]) -> ProgressObservation:
    """Read an RLHFJobProgress; a status the schema would refuse reads as no report."""
    meta = body.get("metadata") or {}
    try:
        status = ProgressStatus.model_validate(body.get("status") or {})
    except ValidationError:
        status = ProgressStatus()
    return ProgressObservation(
        name=meta.get("name", ""),
        owner_uids=tuple(r.get("uid", "") for r in meta.get("ownerReferences") or []),
        stages=dict(status.stages),
    )


def build_progress(name: str, namespace: str | None, owner: dict[str, Any]) -> dict[str, Any]:
    """The job's RLHFJobProgress: same name, owned by the job (deleted with it)."""
    return {
        "apiVersion": API_VERSION,
        "kind": PROGRESS_KIND,
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": [owner]},
        "spec": {"job": name},
    }


def judge_name(job: RLHFJob) -> str | None:
    """The independent judge's name as status shows it (None: the job names no judge)."""
    judge = job.spec.stages.evaluation.judge
    return judge.display_name() if judge else None


def evaluation_summary(
    metrics: Mapping[str, float], judge: str | None = None
) -> EvaluationSummary | None:
    """The headline result, from the evaluation stage's metrics (None when it has none):
    the reward model's verdict beside the independent `judge`'s, so reward hacking shows."""
    if not metrics:
        return None
    return EvaluationSummary(
        win_rate=metrics.get("win_rate"),
        mean_reward_before=metrics.get("mean_reward_sft"),
        mean_reward_after=metrics.get("mean_reward_rlhf"),
        judge_win_rate=metrics.get("judge_win_rate"),
        judge=judge,
        judge_mean_before=metrics.get("judge_mean_sft"),
        judge_mean_after=metrics.get("judge_mean_rlhf"),
    )


def mirror(
    status: RLHFJobStatus,
    observed: ProgressObservation | None,
    uid: str | None,
    enabled_stages: Sequence[str],
    judge: str | None = None,
) -> RLHFJobStatus:
    """`status` with the trainer's progress, metrics and curves copied in (a new object).

    Touches `stages.<stage>.{progress, metrics, history}` of started stages, the PROGRESS and
    REWARD columns of the running stage, and the evaluation summary; nothing the state machine
    decides on.
    """
    new = status.model_copy(deep=True)
    if observed is None or not uid or uid not in observed.owner_uids:
        return new
    for name, report in observed.stages.items():
        stage = new.stages.get(name)
        if name not in enabled_stages or stage is None or stage.state not in STARTED_STATES:
            continue
        stage.progress = report.progress
        stage.metrics = dict(report.metrics)
        stage.history = list(report.history)
        if name == "evaluation" and report.metrics:
            new.evaluation = evaluation_summary(report.metrics, judge)
    current = observed.stages.get(new.stage or "")
    if new.phase == "Running" and current is not None and new.stage in new.stages:
        if new.stages[new.stage].state in ("Running", "Retrying"):
            percent = current.progress.percent if current.progress else None
            new.progress = progress_column(new.stage, enabled_stages, percent)
        new.reward = reward_column(current.metrics) or new.reward
    return new
