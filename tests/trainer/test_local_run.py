"""The tiny RLHFJob end to end through `rlhf run`'s code (local runner, one shared local Ray, two
workers, DeepSpeed ZeRO-2 on CPU), with test-sized step counts. One run serves every test here:
each asserts that its stage learned, and what the user finds in the output directory."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from rlhf_trainer.local import LocalRun
from tiny_jobs import load_make_tiny

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {
    "sft": {"eval_loss_before", "eval_loss_after", "seconds"},
    "reward": {"eval_accuracy", "seconds"},
    "ppo": {"reward_before", "reward_after", "kl", "seconds"},
    "evaluation": {
        "win_rate",
        "mean_reward_sft",
        "mean_reward_rlhf",
        "prompts_improved_fraction",
        "judge",
        "judge_win_rate",
        "judge_mean_sft",
        "judge_mean_rlhf",
        "judge_prompts_improved_fraction",
    },
}
# docs/CONTRACTS.md §5
STAGE_METRICS = {
    "sft": {"loss", "eval_loss", "learning_rate"},
    "reward": {"loss", "accuracy", "eval_accuracy", "learning_rate"},
    "ppo": {
        "reward_mean",
        "kl",
        "policy_loss",
        "value_loss",
        "clip_fraction",
        "approx_kl",
        "entropy",
        "eos_fraction",
        "kl_coef",
        "learning_rate",
    },
    "evaluation": {
        "win_rate",
        "mean_reward_sft",
        "mean_reward_rlhf",
        "prompts_improved_fraction",
        "judge_win_rate",
        "judge_mean_sft",
        "judge_mean_rlhf",
        "judge_prompts_improved_fraction",
    },
}


@pytest.fixture()
def run(tiny_run: LocalRun) -> LocalRun:
    return tiny_run


def stage_dir(run: LocalRun, stage: str) -> Path:
    return run.output / run.summary["job"] / stage


def test_summary_json_has_the_issue_shape(run: LocalRun) -> None:
    written = json.loads((run.output / "summary.json").read_text())
    assert written == run.summary
    assert set(written) == {"job", "wall_seconds", "stages"}
    assert written["job"] == "tiny-reviews"
    assert {stage: set(figures) for stage, figures in written["stages"].items()} == SUMMARY_KEYS
    assert written["wall_seconds"] > 0


def test_sft_held_out_loss_fell(run: LocalRun) -> None:
    sft = run.summary["stages"]["sft"]
    assert sft["eval_loss_after"] < 0.7 * sft["eval_loss_before"]
    assert (stage_dir(run, "sft") / "model" / "config.json").is_file()
    assert (stage_dir(run, "sft") / "model" / "tokenizer.json").is_file()


def test_reward_model_ranks_held_out_pairs(run: LocalRun) -> None:
    history = run.results["reward"].history
    before = history[0]["eval_accuracy"]
    after = run.summary["stages"]["reward"]["eval_accuracy"]
    assert after >= 0.85
    assert after > before + 0.2


def test_ppo_raised_the_reward_and_reports_kl(run: LocalRun) -> None:
    ppo = run.summary["stages"]["ppo"]
    assert ppo["reward_after"] > ppo["reward_before"] + 0.5
    assert math.isfinite(ppo["kl"]) and ppo["kl"] > 0
    assert len(run.results["ppo"].history) == run.results["ppo"].total_steps


def test_evaluation_prefers_the_rlhf_policy_by_the_reward_model(run: LocalRun) -> None:
    evaluation = run.summary["stages"]["evaluation"]
    assert evaluation["win_rate"] >= 0.8
    assert evaluation["prompts_improved_fraction"] >= 0.9
    assert evaluation["mean_reward_rlhf"] > evaluation["mean_reward_sft"]
    with (stage_dir(run, "evaluation") / "examples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 32 * 2  # numPrompts x samplesPerPrompt
    assert all(row["rlhf_response"] or row["sft_response"] for row in rows)
    assert "| prompt | SFT response |" in (stage_dir(run, "evaluation") / "examples.md").read_text()


def test_the_judge_is_the_true_sentiment_count_and_reported_beside_the_reward_model(
    run: LocalRun,
) -> None:
    evaluation = run.summary["stages"]["evaluation"]
    assert evaluation["judge"] == "true sentiment count"
    assert evaluation["judge_mean_rlhf"] > evaluation["judge_mean_sft"]
    with (stage_dir(run, "evaluation") / "examples.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    make_tiny = load_make_tiny()
    for row in rows:  # the judge's score is the net count of sentiment words
        for policy in ("sft", "rlhf"):
            words = row[f"{policy}_response"].split()
            true = sum(w in make_tiny.POSITIVE_WORDS for w in words)
            true -= sum(w in make_tiny.NEGATIVE_WORDS for w in words)
            assert float(row[f"{policy}_judge"]) == true


def test_evaluation_prefers_the_rlhf_policy_by_the_true_score(run: LocalRun) -> None:
    """The tiny target by the independent judge (the true sentiment count): a win by the
    reward model alone would be reward hacking."""
    evaluation = run.summary["stages"]["evaluation"]
    assert evaluation["judge_win_rate"] >= 0.8
    assert evaluation["judge_prompts_improved_fraction"] >= 0.9


def test_every_stage_wrote_its_contract_artifacts(run: LocalRun) -> None:
    for stage, names in STAGE_METRICS.items():
        metrics = json.loads((stage_dir(run, stage) / "metrics.json").read_text())
        assert set(metrics) >= names, stage
        assert all(math.isfinite(value) for value in metrics.values()), stage
        assert list((stage_dir(run, stage) / "tensorboard").glob("events.out.tfevents.*")), stage
    for stage in ("sft", "reward", "ppo"):
        checkpoints = [
            p.name for p in (stage_dir(run, stage) / "checkpoints").iterdir() if p.is_dir()
        ]
        assert checkpoints, stage
        assert (stage_dir(run, stage) / "model" / "config.json").is_file(), stage


def test_plot_and_timings(run: LocalRun) -> None:
    assert (run.output / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timings = json.loads((run.output / "timings.json").read_text())
    for stage in SUMMARY_KEYS:
        measured = timings["stages"][stage]
        assert measured["worker_group_start_s"] > 0
        assert measured["deepspeed_init_s"] > 0


def test_the_deepspeed_op_the_run_built_reads_as_built(run: LocalRun) -> None:
    """What `rlhf run` checks before its first stage (rlhf_trainer.jit_ops) against the real
    build the run's workers left: the next run gets no compile notice."""
    from rlhf_trainer import jit_ops

    cache = os.environ[jit_ops.EXTENSIONS_ENV]  # set for the local Ray's workers
    assert (Path(cache) / jit_ops.SHM_OP / "build.ninja").is_file()
    assert not jit_ops.shm_op_pending(Path(cache))
    assert jit_ops.compile_notice(0) is None
