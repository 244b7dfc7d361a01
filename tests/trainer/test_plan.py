"""`rlhf plan`: stage memory from the model's config alone (no weights, no GPU), the fit verdict
and the setting that would make a stage fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from rlhf_trainer.cli import main
from rlhf_trainer.jobspec import parse_job
from rlhf_trainer.plan import GiB, gpu_memory_from_spec, parse_bytes, plan_stages

REPO = Path(__file__).resolve().parents[2]
GPTJ = REPO / "examples" / "hh-rlhf-gptj.yaml"


def _job(path: Path, **parallelism):
    manifest = yaml.safe_load(path.read_text())
    manifest["spec"]["parallelism"].update(parallelism)
    return parse_job(manifest)


def _ppo_plan(job):
    (ppo,) = [p for p in plan_stages(job) if p.stage == "ppo"]
    return ppo


def _ppo(job) -> int:
    return _ppo_plan(job).gpu_bytes


def test_gptj_ppo_does_not_fit_40gb_and_the_plan_says_what_would(capsys) -> None:
    assert main(["plan", str(GPTJ), "--gpu-memory", "40GiB"]) == 3
    out = capsys.readouterr().out
    assert "EleutherAI/gpt-j-6b: 6,050.9M parameters (config: rlhf plan's built-in table)" in out
    (ppo,) = [line for line in out.splitlines() if line.strip().startswith("ppo ")]
    assert "DOES NOT FIT" in ppo
    assert "-> ppo fits with spec." in out


def test_gptj_fits_the_80gb_gpus_its_manifest_selects(capsys) -> None:
    assert main(["plan", str(GPTJ)]) == 0  # 80 GB from nvidia.com/gpu.product
    assert "DOES NOT FIT" not in capsys.readouterr().out


def test_sharding_offload_and_lora_each_lower_ppos_gpu_memory() -> None:
    zero2 = _ppo(_job(GPTJ, zeroStage=2))
    zero3 = _ppo(_job(GPTJ, zeroStage=3))
    offloaded = _ppo(_job(GPTJ, zeroStage=3, offload="optimizer"))
    lora = _ppo(_job(GPTJ, zeroStage=3, lora={"rank": 16}))
    assert zero2 > zero3 > offloaded
    assert zero3 > lora
    # 2 trained 6B models in mixed precision under ZeRO-2 over 8 GPUs: 2 x 6.05e9 x (2 + 18/8)
    # bytes of model states alone (DeepSpeed's estimator)
    assert zero2 > 2 * 6.05e9 * (2 + 18 / 8)


def _critic_free(path: Path, algorithm: str = "grpo", **ppo) -> dict:
    manifest = yaml.safe_load(path.read_text())
    stage = manifest["spec"]["stages"]["ppo"]
    for field in ("valueLearningRate", "valueClipRange", "valueLossCoef", "lam"):
        stage.pop(field, None)
    stage.update(algorithm=algorithm, **ppo)
    return manifest


def test_critic_free_algorithms_hold_no_value_model_and_save_its_memory() -> None:
    ppo = _ppo_plan(parse_job(yaml.safe_load(GPTJ.read_text())))
    # the same 256 responses per iteration (64 prompts x 4), no value model
    grpo = _ppo_plan(parse_job(_critic_free(GPTJ, samplesPerPrompt=4, rolloutBatchSize=64)))
    assert [m.role for m in ppo.models] == ["policy", "value", "reference", "reward model"]
    assert [m.role for m in grpo.models] == ["policy", "reference", "reward model"]
    # a 6B value model's trained states (ZeRO-3 over 8 ranks) are what GRPO saves
    assert ppo.gpu_bytes - grpo.gpu_bytes > 6.05e9 * 18 / 8
    lora = _critic_free(GPTJ, "reinforce_pp")
    lora["spec"]["parallelism"]["lora"] = {"rank": 16}
    assert [m.role for m in _ppo_plan(parse_job(lora)).models] == [
        "policy (LoRA) + reference",
        "reward model",
    ]


def test_dpo_is_planned_as_a_trained_policy_beside_its_frozen_reference() -> None:
    manifest = yaml.safe_load(GPTJ.read_text())
    stages = manifest["spec"]["stages"]
    stages["reward"] = {"enabled": False, "model": "EleutherAI/gpt-j-6b"}
    stages["ppo"]["enabled"] = False
    stages["dpo"] = {"dataset": {"uri": "s3://bucket/prefs.jsonl"}, "batchSize": 64}
    plans = {p.stage: p for p in plan_stages(parse_job(manifest))}
    assert list(plans) == ["sft", "dpo", "evaluation"]
    assert [(m.role, bool(m.trainable)) for m in plans["dpo"].models] == [
        ("policy", True),
        ("reference", False),
    ]
    assert plans["sft"].gpu_bytes < plans["dpo"].gpu_bytes


def test_a_local_model_is_sized_from_its_config(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    from tiny_jobs import tiny_manifest, write_manifest

    path = write_manifest(tmp_path / "job.yaml", tiny_manifest(tiny_dir, tmp_path / "out"))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"(config: {tiny_dir / 'model'}/config.json)" in out
    assert "per worker" in out  # CPU workers: host memory per worker


def test_sizes_and_gpu_products() -> None:
    assert parse_bytes("80GiB") == parse_bytes("80GB") == 80 * GiB
    assert parse_bytes("512Mi") == 512 * 1024**2
    job = _job(GPTJ)
    assert gpu_memory_from_spec(job) == 80 * GiB
    with pytest.raises(Exception, match="--gpu-memory"):
        parse_bytes("lots")


def _held(params: int, trainable: bool):
    from rlhf_trainer.plan import Held, ModelShape

    shape = ModelShape("m", params, params // 10, 768, 12, 50257, "test")
    return Held("m", shape, trainable=params if trainable else 0, frozen=0 if trainable else params)


def test_model_states_count_what_deepspeed_allocates_beside_weights_and_grads() -> None:
    from rlhf_operator.api.spec import ParallelismSpec
    from rlhf_trainer.plan import model_states

    params = 1_000_000

    def per_param(zero: int, precision: str, ranks: int = 2) -> float:
        spec = ParallelismSpec.model_validate({"zeroStage": zero, "precision": precision})
        return model_states(_held(params, True), spec, ranks, 1)[0] / params

    assert per_param(0, "fp32") == 4 + 4 + 8  # torch AdamW on the model's own weights
    # FP16_Optimizer (also for bf16): fp32 master + fp32 flattened gradients + Adam
    assert per_param(0, "bf16") == 2 + 2 + 4 + 4 + 8
    # ZeRO-2 fp32: the master partition is a clone, gradients partitioned, over 2 ranks
    assert per_param(2, "fp32") == 4 + 4 / 2 + (4 + 4 + 8) / 2
    # ZeRO-3 fp32: weights are the masters; gradient partition + Adam
    assert per_param(3, "fp32") == (4 + 4 + 4 + 8) / 2


def test_zero3_gathered_parameters_on_cpu_workers_and_gpus() -> None:
    from rlhf_trainer.plan import STAGE3_REUSE_ELEMENTS, zero3_gathered

    held = [_held(100, True), _held(100, True), _held(80, False)]
    assert zero3_gathered(held, 2, 2, 0, on_gpu=False) == 0  # only ZeRO-3 gathers
    # CPU: each model's freed all-gather buffers stay in the process heap
    assert zero3_gathered(held, 3, 2, 200, on_gpu=False) == (100 + 100 + 80) * 2
    # GPU: the larger of a trained model whole at its forward/backward turnaround and
    # generation's gather of the policy
    assert zero3_gathered(held, 3, 2, 150, on_gpu=True) == 200
    assert zero3_gathered(held, 3, 2, 300, on_gpu=True) == 300
    big = [_held(6 * STAGE3_REUSE_ELEMENTS, True)]
    assert zero3_gathered(big, 3, 2, 0, on_gpu=True) == STAGE3_REUSE_ELEMENTS * 2
