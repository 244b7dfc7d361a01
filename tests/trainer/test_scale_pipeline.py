"""The tiny job under the settings a real model needs, meeting the tiny targets (README) by the
reward model and by the true sentiment count: the whole pipeline under ZeRO-3 and bf16 on CPU
(DeepSpeed's CPU accelerator). LoRA PPO: tests/trainer/test_lora_ppo.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from rlhf_trainer.local import LocalRun
from tiny_jobs import tiny_manifest, write_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_bf16_run(ray_session, tiny_dir: Path, tmp_path_factory) -> LocalRun:
    from rlhf_trainer.local import run_local

    work = tmp_path_factory.mktemp("zero3-bf16")
    manifest = tiny_manifest(tiny_dir, work / "unused")
    manifest["spec"]["parallelism"].update(zeroStage=3, precision="bf16")
    path = write_manifest(work / "job.yaml", manifest)
    return run_local(str(path), str(work / "out"), progress_bars=False)


def test_zero3_bf16_pipeline_meets_the_tiny_targets(zero3_bf16_run: LocalRun) -> None:
    stages = zero3_bf16_run.summary["stages"]
    assert stages["sft"]["eval_loss_after"] < 0.7 * stages["sft"]["eval_loss_before"]
    assert stages["reward"]["eval_accuracy"] >= 0.9
    assert stages["ppo"]["reward_after"] > stages["ppo"]["reward_before"] + 0.5
    assert stages["evaluation"]["win_rate"] >= 0.8
    assert stages["evaluation"]["prompts_improved_fraction"] >= 0.9
    assert stages["evaluation"]["judge_win_rate"] >= 0.8
    assert stages["evaluation"]["judge_prompts_improved_fraction"] >= 0.9
    # the policy was saved whole (gathered from the ZeRO-3 shards) and in bf16
    config = (zero3_bf16_run.output / "tiny-reviews" / "ppo" / "model" / "config.json").read_text()
    assert '"bfloat16"' in config
