"""Reward model: a one-output sequence-classification head on the SFT (or base) backbone, trained
with the pairwise Bradley–Terry loss on (chosen, rejected) responses.

A response's reward is the head's output at its last token (EOS). Writes the reward model to
`<artifact>/model/`. Metrics: loss, accuracy (chosen scored above rejected, training batches),
eval_accuracy (held-out pairs, logged at step 0 too), learning_rate. When
`spec.stages.reward.model` names a pretrained reward model, the stage is skipped (launcher).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import Split
from rlhf_trainer.models import check_model_path, policy_source
from rlhf_trainer.stages.supervised import preference_split, require_held_out

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.reward"
DATASET_FIELD = f"{FIELD}.dataset"


def _dataset(job: RLHFJob) -> Split:
    return preference_split(job, job.spec.stages.reward.dataset, DATASET_FIELD)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    if job.spec.stages.reward.model:
        check_model_path(job.spec.stages.reward.model, f"{FIELD}.model")
        return
    backbone, field = policy_source(job)
    if check_upstream or field == "spec.model.base":
        check_model_path(backbone, field)
    require_held_out(_dataset(job), DATASET_FIELD, "eval_accuracy")


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer.batches import preference_batch
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
    from rlhf_trainer.stages.supervised import held_out_share, train, trained
    from rlhf_trainer.worker import StageWorker, all_sum

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
        size = hidden_size(backbone, field, revision)
    _, _, engine = worker.engine(
        size,
        lambda dtype: load_scalar_model(backbone, field, tokenizer.pad_token_id, revision, dtype),
        **trained(stage, schedule),
    )
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

    def micro(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        chosen, rejected = scores(split.train, rows)
        accuracy = (chosen > rejected).float().sum().item()
        return pairwise_loss(chosen, rejected), {"accuracy": accuracy}

    @torch.no_grad()
    def held_out_accuracy() -> dict[str, float]:
        engine.eval()
        mine = held_out_share(worker, len(split.held_out))
        correct = 0.0
        for start in range(0, len(mine), schedule.micro_batch):
            chosen, rejected = scores(split.held_out, mine[start : start + schedule.micro_batch])
            correct += (chosen > rejected).sum().item()
        engine.train()
        correct, count = all_sum([correct, float(len(mine))])
        return {"eval_accuracy": correct / max(count, 1.0)}

    metrics, steps_run = train(
        worker, engine, stage, schedule, len(split.train), micro, held_out_accuracy
    )
    worker.save_model(engine, tokenizer, engine.module.model)
    worker.finish(metrics, steps_run=steps_run, total_steps=schedule.total_steps)
