"""The tiny job under the settings a real model needs, each meeting the tiny targets (README):
the whole pipeline under ZeRO-3 and bf16 on CPU (DeepSpeed's CPU accelerator), and PPO with
LoRA adapters (on the session pipeline's SFT and reward models, to keep CI time down)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rlhf_trainer.jobspec import parse_job
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
    # the policy was saved whole (gathered from the ZeRO-3 shards) and in bf16
    config = (zero3_bf16_run.output / "tiny-reviews" / "ppo" / "model" / "config.json").read_text()
    assert '"bfloat16"' in config


def test_lora_ppo_meets_the_tiny_targets(tiny_run: LocalRun, tiny_dir: Path, tmp_path) -> None:
    from rlhf_trainer.launcher import run_stage

    source = tiny_run.output / "tiny-reviews"
    for stage in ("sft", "reward"):
        shutil.copytree(source / stage / "model", tmp_path / "tiny-reviews" / stage / "model")
    # Adapters on every projection and a higher learning rate: LoRA's usual recipe (the tiny
    # model is 64 wide; adapters on c_attn alone barely move it in 30 iterations).
    manifest = tiny_manifest(
        tiny_dir, tmp_path, ppo={"learningRate": 5e-3, "valueLearningRate": 5e-3}
    )
    manifest["spec"]["parallelism"]["lora"] = {
        "rank": 16,
        "alpha": 32,
        "targetModules": ["c_attn", "c_proj", "c_fc"],
    }
    job = parse_job(manifest)

    ppo = run_stage(job, "ppo")
    evaluation = run_stage(job, "evaluation").metrics

    rewards = [row["reward_mean"] for row in ppo.history]
    assert rewards[-1] > rewards[0] + 0.5
    assert evaluation["win_rate"] >= 0.8
    assert evaluation["prompts_improved_fraction"] >= 0.9
    # merged on save: a plain transformers model, which evaluation just loaded without peft
    saved = tmp_path / "tiny-reviews" / "ppo" / "model"
    assert (saved / "config.json").is_file() and not (saved / "adapter_config.json").exists()
