"""The RL stage under each critic-free algorithm (GRPO, RLOO, REINFORCE++) and the DPO stage, on
the tiny task from the session's SFT and reward models (tiny_run): each meets the tiny targets
(evaluation win rate >= 0.8 and prompts improved >= 0.9 by the reward model and by the true
sentiment count, KL finite), critic-free runs hold no value model anywhere, and each resumes from
its own checkpoints to where the uninterrupted run ended. Test-sized: 32 rollouts per iteration
for REINFORCE++, 64 (16 prompts x 4) for the group algorithms."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from rlhf_trainer.jobspec import parse_job, with_absolute_paths
from rlhf_trainer.launcher import run_stage
from rlhf_trainer.local import LocalRun
from tiny_jobs import tiny_manifest

pytestmark = pytest.mark.slow

WIN_RATE, IMPROVED = 0.8, 0.9
STEPS, EVERY = 30, 10
CRITIC_FIELDS = ("valueLearningRate", "valueClipRange", "valueLossCoef", "lam")
ALGORITHMS: dict[str, dict[str, Any]] = {
    # 16 prompts x 4: at 8 x 4 GRPO reached win rate 0.81 but prompts improved 0.875 (< 0.9)
    "grpo": {"algorithm": "grpo", "samplesPerPrompt": 4, "rolloutBatchSize": 16},
    "rloo": {"algorithm": "rloo", "samplesPerPrompt": 4, "rolloutBatchSize": 16},
    "reinforce_pp": {"algorithm": "reinforce_pp", "rolloutBatchSize": 32},
}
# 2 epochs (112 steps) from a 40-step SFT: pairs ranked 0.9+, but evaluation win rate 0.67 and
# prompts improved 0.75; 3 epochs is the bench's setting (0.91 / 0.95 from the demo's SFT).
DPO = {"epochs": 3, "batchSize": 32, "learningRate": 1.0e-3, "maxSeqLen": 64}
DPO_EVERY = 20


def copy_upstream(tiny_run: LocalRun, storage: Path, stages=("sft", "reward")) -> None:
    for stage in stages:
        source = tiny_run.output / "tiny-reviews" / stage / "model"
        shutil.copytree(source, storage / "tiny-reviews" / stage / "model")


def rl_job(tiny_dir: Path, storage: Path, algorithm: str):
    manifest = tiny_manifest(
        tiny_dir,
        storage,
        ppo={**ALGORITHMS[algorithm], "steps": STEPS, "checkpointEverySteps": EVERY},
    )
    for field in CRITIC_FIELDS:  # critic-only settings are refused on critic-free algorithms
        manifest["spec"]["stages"]["ppo"].pop(field, None)
    return with_absolute_paths(parse_job(manifest))


def dpo_job(tiny_dir: Path, storage: Path, judge: Path):
    manifest = tiny_manifest(
        tiny_dir,
        storage,
        reward={"enabled": False, "model": str(judge)},
        ppo={"enabled": False},
    )
    manifest["spec"]["stages"]["dpo"] = {
        "dataset": {"uri": str(tiny_dir / "preferences.jsonl"), "evalFraction": 0.1},
        **DPO,
        "checkpointEverySteps": DPO_EVERY,
    }
    return with_absolute_paths(parse_job(manifest))


def assert_meets_the_tiny_targets(evaluation: dict[str, float], kl: float) -> None:
    """By the reward model and by the independent judge (the task's true sentiment count): a
    win by the reward model alone would be reward hacking."""
    for prefix in ("", "judge_"):
        assert evaluation[f"{prefix}win_rate"] >= WIN_RATE, evaluation
        assert evaluation[f"{prefix}prompts_improved_fraction"] >= IMPROVED, evaluation
    assert evaluation["mean_reward_rlhf"] > evaluation["mean_reward_sft"]
    assert evaluation["judge_mean_rlhf"] > evaluation["judge_mean_sft"]
    assert math.isfinite(kl), kl


@pytest.fixture(scope="module")
def runs(tiny_run: LocalRun, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An algorithm's RL stage and evaluation, run once per module on first use (the resume
    test reuses it; `-k grpo` runs only GRPO's)."""
    done = {}

    def run(algorithm: str):
        if algorithm not in done:
            storage = tmp_path_factory.mktemp(algorithm)
            copy_upstream(tiny_run, storage)
            job = rl_job(tiny_dir, storage, algorithm)
            done[algorithm] = (storage, run_stage(job, "ppo"), run_stage(job, "evaluation"))
        return done[algorithm]

    return run


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_critic_free_algorithm_meets_the_tiny_targets_without_a_value_model(
    runs, algorithm: str
) -> None:
    storage, rl, evaluation = runs(algorithm)
    assert_meets_the_tiny_targets(evaluation.metrics, rl.metrics["kl"])
    rewards = [row["reward_mean"] for row in rl.history]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3, rewards
    assert "value_loss" not in rl.metrics  # no value model was trained
    checkpoints = storage / "tiny-reviews" / "ppo" / "checkpoints"
    saved = {p.name for step in checkpoints.iterdir() if step.is_dir() for p in step.iterdir()}
    assert "policy" in saved and "value" not in saved  # nor checkpointed


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_critic_free_algorithm_resumes_from_its_checkpoints(
    runs, algorithm: str, tiny_run: LocalRun, tiny_dir: Path, tmp_path: Path
) -> None:
    storage, fresh, _ = runs(algorithm)
    copy_upstream(tiny_run, tmp_path)
    source = storage / "tiny-reviews" / "ppo" / "checkpoints"
    shutil.copytree(source, tmp_path / "tiny-reviews" / "ppo" / "checkpoints")
    resumed = run_stage(
        rl_job(tiny_dir, tmp_path, algorithm),
        "ppo",
        resume_from=str(tmp_path / "tiny-reviews" / "ppo" / "checkpoints"),
    )
    last_checkpoint = (STEPS - 1) // EVERY * EVERY
    assert resumed.resumed_from_step == last_checkpoint
    assert resumed.steps_run == STEPS - last_checkpoint
    # Seeded rollouts, restored policy and optimizer: it ends where the fresh run ended.
    assert resumed.metrics["reward_mean"] == pytest.approx(fresh.metrics["reward_mean"], rel=1e-4)


def test_dpo_meets_the_tiny_targets_and_resumes(
    tiny_run: LocalRun, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SFT -> DPO -> evaluation, judged by the session's reward model given as a pretrained
    one (DPO trains none); then DPO again from its own last checkpoint."""
    judge = tiny_run.output / "tiny-reviews" / "reward" / "model"
    storage = tmp_path_factory.mktemp("dpo")
    copy_upstream(tiny_run, storage, stages=("sft",))
    job = dpo_job(tiny_dir, storage, judge)
    assert job.spec.enabled_stages() == ["sft", "dpo", "evaluation"]

    dpo = run_stage(job, "dpo")
    before = dpo.history[0]
    assert dpo.metrics["eval_loss"] < before["eval_loss"]  # log 2 at step 0 (policy = reference)
    assert dpo.metrics["eval_reward_accuracy"] > 0.9
    evaluation = run_stage(job, "evaluation")
    assert_meets_the_tiny_targets(evaluation.metrics, dpo.metrics["kl"])
    assert dpo.metrics["kl"] > 0

    again = tmp_path_factory.mktemp("dpo-resumed")
    copy_upstream(tiny_run, again, stages=("sft",))
    checkpoints = storage / "tiny-reviews" / "dpo" / "checkpoints"
    shutil.copytree(checkpoints, again / "tiny-reviews" / "dpo" / "checkpoints")
    resumed = run_stage(
        dpo_job(tiny_dir, again, judge),
        "dpo",
        resume_from=str(again / "tiny-reviews" / "dpo" / "checkpoints"),
    )
    last_checkpoint = (dpo.total_steps - 1) // DPO_EVERY * DPO_EVERY
    assert resumed.resumed_from_step == last_checkpoint > 0
    assert resumed.metrics["eval_loss"] == pytest.approx(dpo.metrics["eval_loss"], rel=1e-4)
