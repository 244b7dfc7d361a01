"""`RLHFJobProgress`: the one object a job's trainer may write (rlhf.dev/v1alpha1).

Why an object of its own (issue #9, "the trainer cannot steer the operator"): RLHFJob status
drives the operator (phase, stage, attempts, the cluster's name); a Role on `rlhfjobs/status`
would let any trainer pod of the namespace rewrite those for every job there. RBAC cannot tell
one status field from another, nor one job from another in a static Role, so instead the
trainer's Role names only `rlhfjobprogresses/status`: a compromised trainer can at worst show
wrong numbers, never stop, finish, skip or redirect a job. The operator creates one per job
(owned by it: deleted with it), reads it through a watch, and mirrors its stages' progress,
metrics and curves into RLHFJob status (reconcile/progress.py), ignoring anything else.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_operator.api.common import ApiModel
from rlhf_operator.api.status import HISTORY_LIMIT, HistoryPoint, Progress

PROGRESS_KIND = "RLHFJobProgress"
PROGRESS_PLURAL = "rlhfjobprogresses"
PROGRESS_SINGULAR = "rlhfjobprogress"
METRICS_LIMIT = 64
"""Most metrics one stage reports (bounded: the object is written every 30 s)."""


class StageProgress(ApiModel):
    """What the trainer reports for one stage."""

    progress: Progress | None = Field(default=None, description="Steps done, planned, ETA.")
    metrics: dict[str, float] = Field(
        default_factory=dict, max_length=METRICS_LIMIT, description="Latest metrics."
    )
    history: list[HistoryPoint] = Field(
        default_factory=list, max_length=HISTORY_LIMIT, description="Curve of key metrics."
    )


class ProgressSpec(ApiModel):
    """Set by the operator when it creates the object."""

    job: str = Field(min_length=1, description="The RLHFJob this reports for (same name).")


class ProgressStatus(ApiModel):
    """Written by the trainer (rank 0 of the running stage), read by the operator."""

    stages: dict[str, StageProgress] = Field(
        default_factory=dict, max_length=8, description="Per-stage progress."
    )
