"""The PROGRESS and REWARD column strings of `kubectl get rlhfjobs`."""

from __future__ import annotations

import pytest
from rlhf_operator.api.columns import progress_column, reward_column

ALL = ["sft", "reward", "ppo", "evaluation"]


@pytest.mark.parametrize(
    ("stage", "enabled", "percent", "expected"),
    [
        ("ppo", ALL, 45.0, "ppo 3/4 45%"),
        ("sft", ALL, 0.0, "sft 1/4 0%"),
        ("evaluation", ALL, 100.0, "evaluation 4/4 100%"),
        ("ppo", ["ppo", "evaluation"], 12.5, "ppo 1/2 12%"),  # skipped stages are not counted
        ("ppo", ALL, 99.96, "ppo 3/4 99%"),  # never a premature 100%
        ("ppo", ALL, 130.0, "ppo 3/4 100%"),
        ("ppo", ALL, -3.0, "ppo 3/4 0%"),
        ("ppo", ALL, None, "ppo 3/4"),  # not reporting yet
        ("ppo", ALL, float("nan"), "ppo 3/4"),
        ("ppo", ["sft"], 50.0, "ppo 50%"),  # stage outside the enabled list: no position
    ],
)
def test_progress_column(stage: str, enabled: list[str], percent: float | None, expected: str):
    assert progress_column(stage, enabled, percent) == expected


@pytest.mark.parametrize(
    ("metrics", "expected"),
    [
        ({"reward_mean": 0.7314, "kl": 0.02}, "0.731"),
        ({"reward_mean": -1.25}, "-1.250"),
        ({"win_rate": 0.85, "mean_reward_rlhf": 1.2}, "win 0.85"),
        ({"win_rate": 0.5, "reward_mean": 0.9}, "win 0.50"),  # evaluation's headline wins
        ({"loss": 0.4, "accuracy": 0.9}, None),  # SFT / reward stages have no reward column
        ({}, None),
        ({"reward_mean": float("nan")}, None),
        ({"win_rate": float("inf"), "reward_mean": 0.25}, "0.250"),
    ],
)
def test_reward_column(metrics: dict[str, float], expected: str | None) -> None:
    assert reward_column(metrics) == expected
