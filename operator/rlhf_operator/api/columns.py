"""The text behind the PROGRESS and REWARD printer columns of `kubectl get rlhfjobs`.

Printer columns are JSONPaths and cannot compute, so whoever writes status (the trainer's progress
reporter, the operator when a stage starts or ends) stores ready-made strings in
`status.progress` and `status.reward`. Both sides call these pure functions, so the columns read
the same whoever wrote them last.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

# Metric names (docs/CONTRACTS.md §5) that feed the REWARD column, most telling first: the
# evaluation's win rate is the job's headline result; PPO's mean reward is the live figure.
WIN_RATE_METRIC = "win_rate"
REWARD_MEAN_METRIC = "reward_mean"


def progress_column(stage: str, enabled_stages: Sequence[str], percent: float | None) -> str:
    """`"ppo 3/4 45%"`: the stage, its position among the enabled stages, and percent done.

    The percent is floored (a stage at 99.9% shows 99%, not a premature 100%) and clamped to
    0..100; without a percent (stage not reporting yet) only `"ppo 3/4"` is shown. A stage that
    is not among `enabled_stages` shows without a position.
    """
    text = stage
    if stage in enabled_stages:
        text += f" {list(enabled_stages).index(stage) + 1}/{len(enabled_stages)}"
    if percent is not None and math.isfinite(percent):
        text += f" {math.floor(min(max(percent, 0.0), 100.0))}%"
    return text


def reward_column(metrics: Mapping[str, float]) -> str | None:
    """`"win 0.85"` after evaluation, `"0.731"` from PPO's `reward_mean`, else None.

    Non-finite values (a NaN reward from a diverged step) show as absent rather than "nan".
    """
    win_rate = _finite(metrics.get(WIN_RATE_METRIC))
    if win_rate is not None:
        return f"win {win_rate:.2f}"
    reward_mean = _finite(metrics.get(REWARD_MEAN_METRIC))
    if reward_mean is not None:
        return f"{reward_mean:.3f}"
    return None


def _finite(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
