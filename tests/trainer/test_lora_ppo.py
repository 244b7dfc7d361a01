"""LoRA PPO (`spec.parallelism.lora`) on the tiny task meets the tiny targets (win rate >= 0.8
and prompts improved >= 0.9 by the reward model and by the true sentiment count), only the
adapters (and the value model's scalar head) trained, and the policy is saved as a plain
transformers model with the adapters merged.

The tiny model here has an output layer of its own (`make_tiny --untied-head`, as GPT-J and Llama
have; GPT-2 ties it to the token embeddings) and the adapters reach it (`lm_head`). On the tied
tiny model LoRA cannot: SFT trains the ten positive and ten negative words as interchangeable,
so their (tied) output embeddings barely differ (class means 0.07 apart, each class spread
0.14), and with the embeddings frozen and the final LayerNorm bounding the hidden state, no
adapter on the blocks can make the policy prefer one class much. Every tied recipe levelled off
at win rates 0.56-0.64 (README, "LoRA"); the same recipe with the head adapted meets the targets
as full fine-tuning does. Own SFT and reward models (the untied model), test-sized as tiny_run's.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rlhf_trainer.jobspec import parse_job, with_absolute_paths
from rlhf_trainer.launcher import run_stage
from tiny_jobs import load_make_tiny, tiny_manifest

pytestmark = pytest.mark.slow

WIN_RATE, IMPROVED = 0.8, 0.9
TARGETS = ["c_attn", "c_proj", "c_fc", "lm_head"]  # every matrix of the blocks, and the head
LORA = {"rank": 16, "alpha": 32, "targetModules": TARGETS}
PPO = {"learningRate": 3.0e-3, "valueLearningRate": 3.0e-3}


@pytest.fixture(scope="module")
def lora_run(ray_session, tmp_path_factory: pytest.TempPathFactory):
    tiny_dir = tmp_path_factory.mktemp("tiny-untied")
    load_make_tiny().main(["--out", str(tiny_dir), "--untied-head"])
    storage = tmp_path_factory.mktemp("lora")
    manifest = tiny_manifest(tiny_dir, storage, ppo=PPO)
    manifest["spec"]["parallelism"]["lora"] = LORA
    job = with_absolute_paths(parse_job(manifest))
    results = {stage: run_stage(job, stage) for stage in ("sft", "reward", "ppo", "evaluation")}
    return storage / "tiny-reviews", results["ppo"], results["evaluation"]


def test_lora_ppo_meets_the_tiny_targets(lora_run) -> None:
    """By the reward model and by the true sentiment count (the judge), as full fine-tuning."""
    _, rl, evaluation = lora_run
    metrics = evaluation.metrics
    assert metrics["win_rate"] >= WIN_RATE, metrics
    assert metrics["prompts_improved_fraction"] >= IMPROVED, metrics
    assert metrics["judge_win_rate"] >= WIN_RATE, metrics
    assert metrics["judge_prompts_improved_fraction"] >= IMPROVED, metrics
    assert metrics["judge_mean_rlhf"] > metrics["judge_mean_sft"], metrics
    assert math.isfinite(rl.metrics["kl"])


def _trained(state_file: Path) -> list[str]:
    """Names of the parameters a DeepSpeed engine's optimizer held (its checkpoint's record)."""
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    return [name for group in state["param_shapes"] for name in group]


def test_lora_ppo_trains_only_adapters_and_saves_a_plain_merged_model(lora_run) -> None:
    """The optimizers held the adapters (and the value model's head) only; the saved policy
    loads with transformers alone, its untargeted weights (embeddings, layer norms, biases) are
    the SFT model's bit for bit and its targeted matrices, the head included, moved (the
    adapters merged in)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    job_dir, _, _ = lora_run
    step = max((job_dir / "ppo" / "checkpoints").glob("step_*"))
    policy_trained = _trained(step / "policy" / "state" / "mp_rank_00_model_states.pt")
    value_trained = _trained(step / "value" / "state" / "mp_rank_00_model_states.pt")
    assert policy_trained and all(".lora_A." in n or ".lora_B." in n for n in policy_trained)
    assert [n for n in value_trained if ".lora_" not in n] == ["model.score.weight"]

    saved = job_dir / "ppo" / "model"
    assert not (saved / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(saved)  # a plain transformers model
    merged = load_file(saved / "model.safetensors")
    sft = load_file(job_dir / "sft" / "model" / "model.safetensors")
    assert merged.keys() == sft.keys()
    moved = {name for name in sft if not torch.equal(merged[name], sft[name])}
    targeted = {name for name in sft if name.endswith(".weight") and name.split(".")[-2] in TARGETS}
    assert moved == targeted, sorted(moved ^ targeted)
