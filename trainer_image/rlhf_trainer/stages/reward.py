"""Reward model: a one-output sequence-classification head on the SFT (or base) backbone, trained
with the pairwise Bradley–Terry loss on (chosen, rejected) responses.

A response's reward is the head's output at its last token (EOS). Writes the reward model to
`<artifact>/model/`. Metrics: loss, accuracy (chosen scored above rejected, training batches),
eval_accuracy (held-out pairs, logged at step 0 too), learning_rate. When
`spec.stages.reward.model` names a pretrained reward model, the stage is skipped (launcher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import Split, load_split
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path, policy_source

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.reward"
DATASET_FIELD = f"{FIELD}.dataset"


def _dataset(job: RLHFJob) -> Split:
    dataset = job.spec.stages.reward.dataset
    columns = {
        "promptField": dataset.prompt_field,
        "chosenField": dataset.chosen_field,
        "rejectedField": dataset.rejected_field,
    }
    return load_split(dataset, DATASET_FIELD, columns, job.spec.seed, job.spec.storage)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    if job.spec.stages.reward.model:
        check_model_path(job.spec.stages.reward.model, f"{FIELD}.model")
        return
    backbone, field = policy_source(job)
    if check_upstream or field == "spec.model.base":
        check_model_path(backbone, field)
    split = _dataset(job)
    if split.held_out is None:
        raise UserError(
            f"{DATASET_FIELD}: nothing is held out to measure eval_accuracy; set testSplit or "
            "an evalFraction above 0."
        )


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer import engine as ds
    from rlhf_trainer.batches import BatchPlan, preference_batch
    from rlhf_trainer.losses import pairwise_loss
    from rlhf_trainer.models import (
        hidden_size,
        last_token,
        load_scalar_model,
        load_tokenizer,
        model_revision,
        tokenizer_source,
    )
    from rlhf_trainer.schedule import plan
    from rlhf_trainer.worker import StageWorker, all_mean, all_sum

    worker = StageWorker.start(config)
    spec = worker.job.spec
    stage = spec.stages.reward
    dataset = stage.dataset
    with worker.timed("data"):
        split = _dataset(worker.job)
    backbone, field = policy_source(worker.job)
    revision = model_revision(worker.job, backbone)
    schedule = plan(stage, len(split.train), worker.world_size, FIELD)
    with worker.timed("model_load"):
        tokenizer = load_tokenizer(*tokenizer_source(worker.job, backbone, field))
        engine_plan = ds.plan_engine(
            spec.parallelism,
            use_gpu=worker.use_gpu,
            world_size=worker.world_size,
            hidden_size=hidden_size(backbone, field, revision),
            micro_batch=schedule.micro_batch,
            grad_accum=schedule.grad_accum,
            learning_rate=stage.learning_rate,
            weight_decay=stage.weight_decay,
            total_steps=schedule.total_steps,
            warmup_steps=schedule.warmup_steps,
        )
        model = engine_plan.build(
            lambda: load_scalar_model(
                backbone, field, tokenizer.pad_token_id, revision, engine_plan.dtype
            )
        )
    with worker.timed("deepspeed_init"):
        engine = engine_plan.initialize(model)
    device = engine.device

    def scores(table, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the chosen and of the rejected responses of `rows`."""
        picked = table[rows]
        prompts = picked[dataset.prompt_field] if dataset.prompt_field else None
        tensors = preference_batch(
            tokenizer,
            prompts,
            picked[dataset.chosen_field],
            picked[dataset.rejected_field],
            stage.max_seq_len,
        )
        ids, mask = tensors["input_ids"].to(device), tensors["attention_mask"].to(device)
        rewards = last_token(engine(input_ids=ids, attention_mask=mask), mask)
        return rewards.chunk(2)

    @torch.no_grad()
    def held_out_accuracy() -> float:
        engine.eval()
        rows = list(range(len(split.held_out) - len(split.held_out) % worker.world_size))
        mine = rows[worker.rank :: worker.world_size]  # equal shares: ZeRO-3 needs equal passes
        correct = 0.0
        for start in range(0, len(mine), schedule.micro_batch):
            chosen, rejected = scores(split.held_out, mine[start : start + schedule.micro_batch])
            correct += (chosen > rejected).sum().item()
        engine.train()
        correct, count = all_sum([correct, float(len(mine))])
        return correct / max(count, 1.0)

    worker.restore({"model": engine})
    start = worker.resumed_from_step or 0
    worker.start_progress(schedule.total_steps)
    if start == 0:
        with worker.timed("eval"):
            worker.log(0, {"eval_accuracy": held_out_accuracy()})
    batches = BatchPlan(len(split.train), stage.batch_size, worker.world_size, spec.seed)
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, schedule.total_steps):
            rows = batches.rows(step, worker.rank)
            losses, correct = [], 0.0
            for i in range(schedule.grad_accum):
                micro = rows[i * schedule.micro_batch : (i + 1) * schedule.micro_batch]
                chosen, rejected = scores(split.train, micro)
                loss = pairwise_loss(chosen, rejected)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                correct += (chosen > rejected).float().sum().item()
            loss_mean, accuracy = all_mean([sum(losses) / len(losses), correct / len(rows)])
            metrics = {"loss": loss_mean, "accuracy": accuracy, "learning_rate": engine.get_lr()[0]}
            done = step + 1
            if done < schedule.total_steps:  # the last step is logged with eval_accuracy below
                worker.log(done, metrics)
                if done % stage.checkpoint_every_steps == 0:
                    worker.save_checkpoint(done, {"model": engine}, metrics)
    with worker.timed("eval"):
        metrics["eval_accuracy"] = held_out_accuracy()
    worker.log(schedule.total_steps, metrics)
    worker.save_model(engine, tokenizer, engine.module.model)
    worker.finish(metrics, steps_run=schedule.total_steps - start, total_steps=schedule.total_steps)
