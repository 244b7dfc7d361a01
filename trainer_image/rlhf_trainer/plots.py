"""The PNG of a local run: PPO's reward and KL over its steps, beside the other curves."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

PANELS = (
    ("ppo", ("reward_mean",), "PPO: reward-model score of rollouts"),
    ("ppo", ("kl",), "PPO: KL(policy || SFT) per sequence"),
    ("ppo", ("policy_loss", "value_loss"), "PPO: losses"),
    ("ppo", ("clip_fraction", "kl_coef"), "PPO: clip fraction, KL coefficient"),
    ("ppo", ("entropy", "approx_kl"), "PPO: policy entropy, approx-KL per update"),
    ("sft", ("loss", "eval_loss"), "SFT: loss (response tokens)"),
    ("reward", ("loss", "accuracy", "eval_accuracy"), "Reward model: loss, pairwise accuracy"),
    ("dpo", ("loss", "eval_loss"), "DPO: loss on preference pairs"),
    ("dpo", ("reward_accuracy", "eval_reward_accuracy"), "DPO: pairs ranked by implicit reward"),
)


def plot_curves(histories: Mapping[str, list[dict[str, float]]], path: Path) -> Path | None:
    """Write the curves of every stage that ran; None when there is nothing to plot."""
    panels = [p for p in PANELS if histories.get(p[0])]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    columns = 2
    rows = (len(panels) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(11, 3.2 * rows), squeeze=False)
    for axis, (stage, metrics, title) in zip(axes.flat, panels, strict=False):
        history = histories[stage]
        for metric in metrics:
            points = [(row["step"], row[metric]) for row in history if metric in row]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o" if len(points) < 3 else None, label=metric)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
