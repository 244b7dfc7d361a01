"""The trainer's pure pieces on hand-checked inputs: batch plans, schedules, rollout packing, PPO
per-token rewards, evaluation figures, summary.json, DeepSpeed configs, paths, checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rlhf_operator.api.spec import ParallelismSpec, SFTStage
from rlhf_trainer.artifacts import latest_checkpoint
from rlhf_trainer.batches import BatchPlan, sft_batch
from rlhf_trainer.engine import ds_config
from rlhf_trainer.generation import cut_after_eos, pack
from rlhf_trainer.jobspec import UserError, parse_job, with_absolute_paths
from rlhf_trainer.launcher import StageResult, ray_storage_path, run_stage
from rlhf_trainer.models import last_token
from rlhf_trainer.schedule import plan
from rlhf_trainer.stages.evaluation import summarize
from rlhf_trainer.stages.ppo import token_rewards
from rlhf_trainer.summary import build_summary


def test_batch_plan_reads_every_row_once_per_epoch_split_over_ranks() -> None:
    batches = BatchPlan(num_rows=10, batch_size=4, world_size=2, seed=1)
    assert batches.steps_per_epoch == 2
    epoch0 = [batches.rows(step, rank) for step in (0, 1) for rank in (0, 1)]
    assert all(len(rows) == 2 for rows in epoch0)
    flat = [row for rows in epoch0 for row in rows]
    assert len(set(flat)) == 8  # disjoint across ranks and steps; 2 rows left for next epoch
    again = BatchPlan(num_rows=10, batch_size=4, world_size=2, seed=1)
    assert [again.rows(step, 0) for step in (1, 0)] == [epoch0[2], epoch0[0]]  # pure in step
    assert batches.position(5) == (2, 1)
    assert batches.rows(2, 0) != epoch0[0] or batches.rows(2, 1) != epoch0[1]  # reshuffled


def test_schedule_splits_the_global_batch_and_caps_steps() -> None:
    stage = SFTStage(batch_size=32, micro_batch_size=4, epochs=3, max_steps=50, warmup_ratio=0.1)
    schedule = plan(stage, num_rows=640, world_size=2, field="spec.stages.sft")
    assert (schedule.micro_batch, schedule.grad_accum) == (4, 4)  # 4 x 4 x 2 workers = 32
    assert (schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps) == (20, 50, 5)
    with pytest.raises(UserError, match=r"^spec\.stages\.sft\.batchSize \(32\) is larger"):
        plan(stage, num_rows=31, world_size=2, field="spec.stages.sft")


class WordTokenizer:
    """Enough of a tokenizer for the batch builders: one id per word."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[len(word) + 1 for word in text.split()] for text in texts]}


def test_sft_batch_masks_the_prompt_and_keeps_eos() -> None:
    batch = sft_batch(WordTokenizer(), ["a bb", "ccc"], ["dddd", "e ff g"], max_len=8)
    assert batch["input_ids"].tolist() == [[2, 3, 5, 1, 0], [4, 2, 3, 2, 1]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    cut = sft_batch(WordTokenizer(), ["a bb"], ["dddd"], max_len=3)
    assert cut["input_ids"].tolist() == [[2, 3, 5]] and cut["loss_mask"].tolist() == [[0, 0, 1]]


def test_pack_marks_the_positions_that_predict_response_tokens() -> None:
    assert cut_after_eos([7, 8, 1, 0, 0], eos_id=1) == [7, 8, 1]
    assert cut_after_eos([7, 8, 9], eos_id=1) == [7, 8, 9]
    samples = pack([[5, 6], [5]], [[7, 1], [8, 9, 1]], pad_id=0)
    assert samples.input_ids.tolist() == [[5, 6, 7, 1], [5, 8, 9, 1]]
    # position t predicts token t+1: the first response token is predicted from the prompt's end
    assert samples.action_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    values = torch.tensor([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    assert last_token(values, torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])).tolist() == [2.0, 7.0]


def test_token_rewards_penalise_kl_everywhere_and_add_the_score_at_the_end() -> None:
    kl = torch.tensor([[9.0, 1.0, 2.0, 9.0], [0.5, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    rewards = token_rewards(torch.tensor([3.0, -1.0]), kl, mask, kl_coef=0.1)
    expected = torch.tensor([[0.0, -0.1, -0.2 + 3.0, 0.0], [-0.05, -0.05 - 1.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)


def test_evaluation_counts_strict_wins_only() -> None:
    results = [
        {"sft_rewards": [1.0, 2.0], "rlhf_rewards": [2.0, 2.0]},  # one win, one tie
        {"sft_rewards": [0.0, 0.0], "rlhf_rewards": [-1.0, 0.5]},  # one win; mean -0.25 < 0
    ]
    metrics = summarize(results)
    assert metrics["win_rate"] == 0.5
    assert metrics["prompts_improved_fraction"] == 0.5
    assert metrics["mean_reward_sft"] == pytest.approx(0.75)
    assert metrics["mean_reward_rlhf"] == pytest.approx(0.875)


def test_summary_takes_before_and_after_from_the_curves() -> None:
    results = {
        "sft": StageResult(
            "sft", "a", {"eval_loss": 1.0}, [{"step": 0, "eval_loss": 4.0}], seconds=10
        ),
        "reward": StageResult("reward", "b", {"eval_accuracy": 0.95}, seconds=5),
        "ppo": StageResult(
            "ppo",
            "c",
            {"kl": 2.0},
            [{"step": 1, "reward_mean": -1.0}, {"step": 2, "reward_mean": 3.0}],
            seconds=7,
        ),
        "evaluation": StageResult(
            "evaluation",
            "d",
            {
                "win_rate": 0.9,
                "mean_reward_sft": 0.0,
                "mean_reward_rlhf": 1.0,
                "prompts_improved_fraction": 1.0,
            },
        ),
    }
    summary = build_summary("job", 42.0, results)
    assert summary == {
        "job": "job",
        "wall_seconds": 42.0,
        "stages": {
            "sft": {"eval_loss_before": 4.0, "eval_loss_after": 1.0, "seconds": 10},
            "reward": {"eval_accuracy": 0.95, "seconds": 5},
            "ppo": {"reward_before": -1.0, "reward_after": 3.0, "kl": 2.0, "seconds": 7},
            "evaluation": {
                "win_rate": 0.9,
                "mean_reward_sft": 0.0,
                "mean_reward_rlhf": 1.0,
                "prompts_improved_fraction": 1.0,
            },
        },
    }


def test_deepspeed_config_follows_the_parallelism_spec() -> None:
    spec = ParallelismSpec(zero_stage=3, offload="parameters", precision="bf16")
    trained = ds_config(spec, micro_batch=4, grad_accum=2, world_size=2, use_gpu=True)
    assert trained["train_batch_size"] == 16
    assert trained["zero_optimization"]["stage"] == 3
    assert trained["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert trained["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert trained["bf16"] == {"enabled": True}
    frozen = ds_config(
        spec, micro_batch=4, grad_accum=1, world_size=2, use_gpu=True, trainable=False
    )
    assert frozen["zero_optimization"]["stage"] == 3  # frozen models shard under ZeRO-3 too
    assert "offload_optimizer" not in frozen["zero_optimization"]
    replica = ds_config(
        ParallelismSpec(zero_stage=2, precision="fp32"),
        micro_batch=1,
        grad_accum=1,
        world_size=2,
        use_gpu=False,
        trainable=False,
    )
    assert replica["zero_optimization"] == {"stage": 0}
    assert "bf16" not in replica and "fp16" not in replica


def test_zero3_buckets_are_sized_to_the_model_as_transformers_auto_does() -> None:
    spec = ParallelismSpec(zero_stage=3, precision="fp32")
    for trainable in (True, False):
        zero = ds_config(
            spec,
            micro_batch=1,
            grad_accum=1,
            world_size=2,
            use_gpu=False,
            trainable=trainable,
            hidden_size=768,
        )["zero_optimization"]
        assert zero["reduce_bucket_size"] == 768 * 768  # not DeepSpeed's 5e8 elements
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 768 * 768)
        assert zero["stage3_param_persistence_threshold"] == 7680
    zero2 = ds_config(
        ParallelismSpec(zero_stage=2),
        micro_batch=1,
        grad_accum=1,
        world_size=2,
        use_gpu=False,
        hidden_size=768,
    )["zero_optimization"]
    assert zero2 == {"stage": 2}  # ZeRO-1/2 keep DeepSpeed's defaults


def test_relative_local_paths_become_absolute_hub_ids_do_not(tmp_path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sft.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    job = parse_job(
        {
            "metadata": {"name": "j"},
            "spec": {
                "model": {"base": "gpt2"},
                "storage": {"uri": "out"},
                "stages": {
                    "sft": {"dataset": {"uri": "data/sft.jsonl"}},
                    "reward": {"dataset": {"uri": "Anthropic/hh-rlhf"}},
                    "ppo": {"prompts": {"uri": "imdb"}},
                },
            },
        }
    )
    resolved = with_absolute_paths(job).spec
    assert resolved.model.base == "gpt2"
    assert resolved.storage.uri == str(tmp_path / "out")
    assert resolved.stages.sft.dataset.uri == str(tmp_path / "data" / "sft.jsonl")
    assert resolved.stages.reward.dataset.uri == "Anthropic/hh-rlhf"


def test_latest_checkpoint_skips_incomplete_saves(tmp_path: Path) -> None:
    for step, complete in ((10, True), (20, True), (30, False)):
        directory = tmp_path / f"step_{step:08d}"
        directory.mkdir()
        if complete:
            (directory / "trainer_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    assert latest_checkpoint(str(tmp_path)) == (str(tmp_path / "step_00000020"), 20)
    assert latest_checkpoint(str(tmp_path / "absent")) is None


def test_ray_train_gets_paths_it_can_open(monkeypatch: pytest.MonkeyPatch) -> None:
    # The operator's claim mount root (the real-Ray test's session points it elsewhere).
    monkeypatch.delenv("RLHF_PVC_MOUNT_ROOT", raising=False)
    assert ray_storage_path("pvc://models/rlhf/job/sft") == "/mnt/rlhf/models/rlhf/job/sft"
    assert ray_storage_path("file:///data/job/sft") == "/data/job/sft"
    assert ray_storage_path("s3://bucket/rlhf/job/sft") == "s3://bucket/rlhf/job/sft"


def test_a_pretrained_reward_model_skips_the_reward_stage(tmp_path: Path) -> None:
    model = tmp_path / "rm"
    model.mkdir()
    job = parse_job(
        {
            "metadata": {"name": "j"},
            "spec": {
                "model": {"base": "gpt2"},
                "storage": {"uri": str(tmp_path / "out")},
                "stages": {
                    "sft": {"enabled": False},
                    "reward": {"model": str(model)},
                    "ppo": {"prompts": {"uri": "imdb"}},
                },
            },
        }
    )
    result = run_stage(job, "reward")  # returns before any Ray or worker starts
    assert result.skipped == f"pretrained reward model {model}"
    assert not (tmp_path / "out").exists()


def test_scoring_log_probs_equal_the_ones_generation_sampled_from(tiny_dir: Path) -> None:
    """PPO's log-probs (models.token_logprobs at the sampling temperature) are those of the
    distribution `generate` sampled from: HF's temperature-warped scores, re-computed by one
    forward pass over `prompt + response`."""
    from rlhf_trainer.models import load_causal_lm, load_tokenizer, token_logprobs

    model = load_causal_lm(str(tiny_dir / "model"), "spec.model.base").eval()
    tokenizer = load_tokenizer(str(tiny_dir / "model"), "spec.model.base")
    prompt = tokenizer("about the film :", return_tensors="pt").input_ids
    temperature = 0.7
    torch.manual_seed(0)
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=True,
        max_new_tokens=8,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=-1,  # never stop early: every step is a sampled token
        output_scores=True,
        return_dict_in_generate=True,
    )
    sampled = out.sequences[0, prompt.shape[1] :]
    at_generation = torch.stack(
        [torch.log_softmax(s[0].float(), -1)[t] for s, t in zip(out.scores, sampled, strict=True)]
    )
    with torch.no_grad():
        logits = model(input_ids=out.sequences).logits
    rescored = token_logprobs(logits, out.sequences, temperature)[0, prompt.shape[1] - 1 :]
    torch.testing.assert_close(rescored, at_generation, atol=1e-4, rtol=1e-4)
    untempered = token_logprobs(logits, out.sequences)[0, prompt.shape[1] - 1 :]
    assert not torch.allclose(untempered, at_generation, atol=1e-3)


def _finished(job, stage: str, digest: str | None = None, **metrics: float) -> None:
    """What a stage leaves when it finishes (worker.finish): metrics, history, run.json last."""
    from rlhf_trainer.artifacts import Artifact
    from rlhf_trainer.jobspec import spec_digest

    directory = Path(Artifact(job.spec.storage.uri, job.metadata.name, stage).uri)
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "history.jsonl").write_text(json.dumps({"step": 1, **metrics}) + "\n")
    run = {"stage": stage, "total_steps": 1, "steps_run": 1}
    (directory / "run.json").write_text(
        json.dumps({**run, "spec_digest": digest or spec_digest(job)})
    )


def _tiny_job(root: Path, storage: str = "out", **overrides):
    from tiny_jobs import tiny_manifest

    return parse_job(tiny_manifest(root / "tiny", root / storage, **overrides))


def test_resume_skips_the_finished_stages_of_this_spec_in_order(tmp_path: Path) -> None:
    from rlhf_trainer.launcher import ALREADY_COMPLETE
    from rlhf_trainer.local import finished_stages

    job = _tiny_job(tmp_path)
    _finished(job, "sft", eval_loss=1.3)
    _finished(job, "reward", eval_accuracy=0.99)
    _finished(job, "evaluation", win_rate=0.9)  # a leftover: ppo, before it, must run first

    done = finished_stages(job, job.spec.enabled_stages())

    assert list(done) == ["sft", "reward"]
    assert done["sft"].metrics == {"eval_loss": 1.3} and done["sft"].skipped == ALREADY_COMPLETE
    assert done["reward"].history == [{"step": 1, "eval_accuracy": 0.99}]


def test_resume_reruns_a_stage_finished_under_another_spec(tmp_path: Path) -> None:
    from rlhf_trainer.jobspec import spec_digest
    from rlhf_trainer.local import finished_stages

    before = _tiny_job(tmp_path)
    after = _tiny_job(tmp_path, sft={"maxSteps": 41})
    moved = _tiny_job(tmp_path, storage="elsewhere")
    assert spec_digest(after) != spec_digest(before)
    assert spec_digest(moved) == spec_digest(before)  # where results live is not what they are
    _finished(before, "sft", eval_loss=1.3)

    assert list(finished_stages(before, ["sft", "reward"])) == ["sft"]
    assert finished_stages(after, ["sft", "reward"]) == {}


def test_resume_says_what_is_complete_and_what_runs_next(tmp_path: Path) -> None:
    from rlhf_trainer.local import resume_line
    from rlhf_trainer.summary import stage_line

    all_done = resume_line(["sft", "reward", "ppo", "evaluation"], [], tmp_path)
    assert all_done.startswith(
        f"resume: sft, reward, ppo, evaluation already complete in {tmp_path}"
    )
    assert "nothing to run (run without --resume to train again)" in all_done
    partly = resume_line(["sft"], ["reward", "ppo"], tmp_path)
    assert partly.endswith("(not run again); resuming reward from its checkpoints")

    job = _tiny_job(tmp_path)
    _finished(job, "sft", eval_loss=1.3)
    from rlhf_trainer.local import finished_stages

    line = stage_line(finished_stages(job, ["sft"])["sft"])
    assert line == "sft: eval loss 1.300 → 1.300 (already complete, not run again)"
