"""`summary.json` of a local run and the text `rlhf run` prints: pure functions of the stages'
results (no Ray, no torch)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_trainer.launcher import StageResult

# Overheads printed per stage: what Ray Train and DeepSpeed cost beyond the training itself.
OVERHEADS = (
    ("worker_group_start_s", "worker group start"),
    ("model_load_s", "model load"),
    ("deepspeed_init_s", "DeepSpeed init"),
    ("teardown_s", "teardown"),
)


def _first(history: list[dict[str, float]], metric: str) -> float | None:
    return next((row[metric] for row in history if metric in row), None)


def _last(history: list[dict[str, float]], metric: str) -> float | None:
    return next((row[metric] for row in reversed(history) if metric in row), None)


JUDGE_METRICS = (
    "judge_win_rate",
    "judge_mean_sft",
    "judge_mean_rlhf",
    "judge_prompts_improved_fraction",
)


def build_summary(
    job_name: str,
    wall_seconds: float,
    results: Mapping[str, StageResult],
    judge: str | None = None,
) -> dict[str, Any]:
    """The issue's summary.json: the figures that show each stage learned. With a `judge`
    (spec.stages.evaluation.judge's name), its figures sit beside the reward model's."""
    stages: dict[str, Any] = {}
    if "sft" in results:
        sft = results["sft"]
        stages["sft"] = {
            "eval_loss_before": _first(sft.history, "eval_loss"),
            "eval_loss_after": sft.metrics.get("eval_loss"),
            "seconds": round(sft.seconds, 2),
        }
    if "reward" in results:
        reward = results["reward"]
        stages["reward"] = {
            "eval_accuracy": reward.metrics.get("eval_accuracy"),
            "seconds": round(reward.seconds, 2),
        }
    if "ppo" in results:
        ppo = results["ppo"]
        stages["ppo"] = {
            "reward_before": _first(ppo.history, "reward_mean"),
            "reward_after": _last(ppo.history, "reward_mean"),
            "kl": ppo.metrics.get("kl"),
            "seconds": round(ppo.seconds, 2),
        }
    if "dpo" in results:
        dpo = results["dpo"]
        stages["dpo"] = {
            "eval_loss_before": _first(dpo.history, "eval_loss"),
            "eval_loss_after": dpo.metrics.get("eval_loss"),
            "eval_reward_accuracy": dpo.metrics.get("eval_reward_accuracy"),
            "kl": dpo.metrics.get("kl"),
            "seconds": round(dpo.seconds, 2),
        }
    if "evaluation" in results:
        metrics = results["evaluation"].metrics
        stages["evaluation"] = {
            name: metrics.get(name)
            for name in (
                "win_rate",
                "mean_reward_sft",
                "mean_reward_rlhf",
                "prompts_improved_fraction",
            )
        }
        if judge is not None:
            stages["evaluation"]["judge"] = judge
            stages["evaluation"] |= {name: metrics.get(name) for name in JUDGE_METRICS}
    return {"job": job_name, "wall_seconds": round(wall_seconds, 2), "stages": stages}


def timings_report(ray_start_seconds: float, results: Mapping[str, StageResult]) -> dict[str, Any]:
    """Where the time went, per stage (timings.json)."""
    return {
        "ray_start_s": round(ray_start_seconds, 3),
        "stages": {
            name: {
                "seconds": round(result.seconds, 3),
                "steps_run": result.steps_run,
                "resumed_from_step": result.resumed_from_step,
                **{k: round(v, 3) for k, v in result.timings.items()},
            }
            for name, result in results.items()
        },
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def stage_line(result: StageResult) -> str:
    """One line per finished stage: its headline figures and its Ray/DeepSpeed overheads."""
    if result.skipped and not result.metrics:
        return f"{result.stage}: skipped ({result.skipped})"
    m, h = result.metrics, result.history
    headline = {
        "sft": lambda: f"eval loss {_fmt(_first(h, 'eval_loss'))} → {_fmt(m.get('eval_loss'))}",
        "reward": lambda: (
            f"held-out accuracy {_fmt(_first(h, 'eval_accuracy'))} → {_fmt(m.get('eval_accuracy'))}"
        ),
        "ppo": lambda: (
            f"reward {_fmt(_first(h, 'reward_mean'))} → "
            f"{_fmt(_last(h, 'reward_mean'))}, KL {_fmt(m.get('kl'))}"
        ),
        "dpo": lambda: (
            f"held-out loss {_fmt(_first(h, 'eval_loss'))} → {_fmt(m.get('eval_loss'))}, "
            f"pairs ranked {_fmt(m.get('eval_reward_accuracy'))}, KL {_fmt(m.get('kl'))}"
        ),
        "evaluation": lambda: (
            f"win rate {_fmt(m.get('win_rate'))}, prompts improved "
            f"{_fmt(m.get('prompts_improved_fraction'))}, mean reward SFT "
            f"{_fmt(m.get('mean_reward_sft'))} → RLHF {_fmt(m.get('mean_reward_rlhf'))}"
            + (
                f"; by the judge: win rate {_fmt(m.get('judge_win_rate'))}, prompts improved "
                f"{_fmt(m.get('judge_prompts_improved_fraction'))}, mean SFT "
                f"{_fmt(m.get('judge_mean_sft'))} → RLHF {_fmt(m.get('judge_mean_rlhf'))}"
                if "judge_win_rate" in m
                else ""
            )
        ),
    }[result.stage]()
    if result.skipped:  # finished by an earlier run: its figures, read back from the artifact
        return f"{result.stage}: {headline} ({result.skipped})"
    resumed = f", resumed from step {result.resumed_from_step}" if result.resumed_from_step else ""
    overheads = ", ".join(
        f"{label} {result.timings[key]:.1f}s" for key, label in OVERHEADS if key in result.timings
    )
    compute = result.timings.get("train_s", result.timings.get("evaluate_s", 0.0))
    return (
        f"{result.stage}: {headline} ({result.steps_run} steps{resumed}, {result.seconds:.1f}s: "
        f"compute {compute:.1f}s; overheads: {overheads})"
    )


def overhead_line(ray_start_seconds: float, results: Mapping[str, StageResult]) -> str:
    """Totals over the stages: Ray + Ray Train + DeepSpeed overheads against the compute."""
    ran = [r for r in results.values() if not r.skipped]
    totals = {key: sum(r.timings.get(key, 0.0) for r in ran) for key, _ in OVERHEADS}
    compute = sum(r.timings.get("train_s", r.timings.get("evaluate_s", 0.0)) for r in ran)
    parts = ", ".join(f"{label} {totals[key]:.1f}s" for key, label in OVERHEADS)
    overhead = ray_start_seconds + sum(totals.values())
    return (
        f"overheads: Ray start {ray_start_seconds:.1f}s, {parts} (total {overhead:.1f}s) "
        f"vs compute {compute:.1f}s over {len(ran)} stages"
    )
