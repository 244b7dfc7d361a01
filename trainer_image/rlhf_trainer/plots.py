"""The PNG of a local run: PPO's reward and KL over its steps, beside the other curves.

Metrics logged every step are lines. Held-out evaluations (`eval_*`, measured before training
and at its end) and the evaluation stage's SFT-vs-RLHF comparison are points: a line between
two measurements would draw a curve nobody measured. Metrics of different scales get their own
panel or a right-hand axis, so a small one (policy loss, clip fraction) is not drawn flat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

EVAL_PREFIX = "eval_"
COMPARISON = (("mean_reward_sft", "SFT policy"), ("mean_reward_rlhf", "RLHF policy"))


@dataclass(frozen=True)
class Panel:
    stage: str
    title: str
    left: Sequence[str]
    right: Sequence[str] = ()
    """Metrics on a right-hand axis of their own (another scale)."""
    legend: str = "best"
    """Where the legend goes; "best" only sees one axis, so twin-axis panels name a place
    their curves leave free (both settle away from the middle of the right edge)."""


PANELS = (
    Panel("ppo", "PPO: reward-model score of rollouts", ("reward_mean",)),
    Panel(
        "ppo",
        "PPO: KL(policy || SFT) per sequence, KL coefficient (right)",
        ("kl",),
        ("kl_coef",),
        "center right",
    ),
    Panel("ppo", "PPO: policy loss", ("policy_loss",)),
    Panel("ppo", "PPO: value loss", ("value_loss",)),
    Panel("ppo", "PPO: clip fraction, approx-KL per update", ("clip_fraction", "approx_kl")),
    Panel("ppo", "PPO: policy entropy", ("entropy",)),
    Panel("sft", "SFT: loss (response tokens), held-out loss", ("loss", "eval_loss")),
    Panel(
        "reward",
        "Reward model: loss, pairwise accuracy (right)",
        ("loss",),
        ("accuracy", "eval_accuracy"),
        "center right",
    ),
    Panel("dpo", "DPO: loss on preference pairs", ("loss", "eval_loss")),
    Panel(
        "dpo", "DPO: pairs ranked by implicit reward", ("reward_accuracy", "eval_reward_accuracy")
    ),
)


def series(history: Sequence[Mapping[str, float]], metric: str) -> list[tuple[float, float]]:
    """(step, value) of every row that logged `metric`."""
    return [(row["step"], row[metric]) for row in history if metric in row]


def is_point_metric(metric: str) -> bool:
    """Measured at a few steps only (held-out evaluations): drawn as points, never joined."""
    return metric.startswith(EVAL_PREFIX)


def comparison(histories: Mapping[str, Sequence[Mapping[str, float]]]) -> dict[str, float]:
    """The evaluation stage's mean reward of each policy (its last row), {label: value}."""
    rows = histories.get("evaluation") or []
    last = rows[-1] if rows else {}
    return {label: last[key] for key, label in COMPARISON if key in last}


def _draw(axis, history, metrics: Sequence[str], colors) -> list:
    drawn = []
    for metric in metrics:
        points = series(history, metric)
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        color = next(colors)
        if is_point_metric(metric):
            drawn += axis.plot(steps, values, "o", color=color, markersize=7, label=metric)
        else:
            marker = "o" if len(points) < 3 else None
            drawn += axis.plot(steps, values, color=color, marker=marker, label=metric)
    return drawn


def _draw_panel(axis, panel: Panel, history) -> None:
    import matplotlib.pyplot as plt

    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    drawn = _draw(axis, history, panel.left, colors)
    top = axis
    if panel.right:
        top = axis.twinx()
        right = _draw(top, history, panel.right, colors)
        values = [v for line in right for v in line.get_ydata()]
        if values and min(values) >= 0:  # a coefficient or an accuracy: read from zero
            top.set_ylim(0, max(values) * 1.15 or 1.0)
        drawn += right
    axis.set_title(panel.title, fontsize=10)
    axis.set_xlabel("step")
    axis.grid(alpha=0.3)
    top.legend(drawn, [line.get_label() for line in drawn], fontsize=8, loc=panel.legend)


def _draw_comparison(axis, values: Mapping[str, float], win_rate: float | None) -> None:
    labels, rewards = list(values), list(values.values())
    axis.plot(range(len(labels)), rewards, "o", markersize=9, color="tab:green")
    for x, value in enumerate(rewards):
        axis.annotate(f"{value:.2f}", (x, value), textcoords="offset points", xytext=(10, -4))
    axis.set_xticks(range(len(labels)), labels)
    axis.set_xlim(-0.5, len(labels) - 0.5)
    axis.margins(y=0.25)
    title = "Evaluation: mean reward on held-out prompts"
    if win_rate is not None:
        title += f" (win rate {win_rate:.2f})"
    axis.set_title(title, fontsize=10)
    axis.set_ylabel("reward-model score")
    axis.grid(alpha=0.3, axis="y")


def plot_curves(histories: Mapping[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Write the curves of every stage that ran; None when there is nothing to plot."""
    panels = [p for p in PANELS if histories.get(p.stage)]
    compared = comparison(histories)
    if not panels and not compared:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    columns = 2
    count = len(panels) + (1 if compared else 0)
    rows = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels, strict=False):
        _draw_panel(axis, panel, histories[panel.stage])
    if compared:
        evaluation = histories["evaluation"][-1]
        _draw_comparison(list(axes.flat)[len(panels)], compared, evaluation.get("win_rate"))
    for axis in list(axes.flat)[count:]:
        axis.set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
