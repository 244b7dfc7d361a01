"""training_curves.png (rlhf_trainer.plots): held-out evaluations and the SFT-vs-RLHF comparison
are points, not lines; a small metric gets its own axis instead of being drawn flat."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pytest
from rlhf_trainer import plots

SFT = [{"step": 0, "eval_loss": 4.4}] + [{"step": s, "loss": 4.0 - s / 10} for s in range(1, 20)]
SFT[-1] = {**SFT[-1], "eval_loss": 1.3}
PPO = [
    {"step": s, "policy_loss": 0.001 * (-1) ** s, "value_loss": 5.0 / s, "kl_coef": 0.15}
    for s in range(1, 11)
]
EVALUATION = [{"step": 2, "win_rate": 0.95, "mean_reward_sft": 0.56, "mean_reward_rlhf": 3.72}]


@pytest.fixture()
def axis():
    figure, axis = plt.subplots()
    yield axis
    plt.close(figure)


def panel_of(metric: str) -> plots.Panel:
    return next(p for p in plots.PANELS if metric in (*p.left, *p.right))


def test_held_out_loss_before_and_after_is_two_points_not_a_line(axis) -> None:
    plots._draw_panel(axis, panel_of("eval_loss"), SFT)
    lines = {line.get_label(): line for line in axis.get_lines()}
    held_out = lines["eval_loss"]
    assert list(held_out.get_xdata()) == [0, 19]
    assert held_out.get_linestyle() == "None" and held_out.get_marker() == "o"
    assert lines["loss"].get_linestyle() == "-"  # per-step training loss stays a curve


def test_policy_loss_has_an_axis_of_its_own() -> None:
    panel = panel_of("policy_loss")
    assert (*panel.left, *panel.right) == ("policy_loss",)
    assert "value_loss" not in (*panel.left, *panel.right)


def test_a_second_scale_goes_to_the_right_axis_from_zero(axis) -> None:
    plots._draw_panel(axis, panel_of("kl_coef"), PPO)
    right = next(a for a in axis.figure.axes if a is not axis)
    assert [line.get_label() for line in right.get_lines()] == ["kl_coef"]
    assert right.get_ylim()[0] == 0  # a constant coefficient is not drawn mid-panel


def test_evaluation_compares_the_two_policies_as_points() -> None:
    assert plots.comparison({"evaluation": EVALUATION}) == {
        "SFT policy": 0.56,
        "RLHF policy": 3.72,
    }
    assert plots.comparison({"sft": SFT}) == {}


def test_the_png_has_every_panel_with_data(tmp_path: Path, monkeypatch) -> None:
    drawn: list[str] = []
    monkeypatch.setattr(plots, "_draw_panel", lambda axis, panel, history: drawn.append(panel))
    compared: list[dict] = []
    monkeypatch.setattr(
        plots, "_draw_comparison", lambda axis, values, win: compared.append((values, win))
    )
    path = plots.plot_curves({"sft": SFT, "evaluation": EVALUATION}, tmp_path / "c.png")
    assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert [p.stage for p in drawn] == ["sft"]
    assert compared == [({"SFT policy": 0.56, "RLHF policy": 3.72}, 0.95)]
    assert plots.plot_curves({}, tmp_path / "none.png") is None
