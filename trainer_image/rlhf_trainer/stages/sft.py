"""Supervised fine-tuning: causal-LM loss on response tokens only (prompt tokens masked).

Starts from `spec.model.base`; writes the SFT model (+ tokenizer) to `<artifact>/model/`.
Metrics: loss, eval_loss (held-out, exact token mean over all workers; also logged at step 0 as
the "before" figure), learning_rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import Split, load_split
from rlhf_trainer.models import check_model_path
from rlhf_trainer.stages.supervised import require_held_out

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.sft"
DATASET_FIELD = f"{FIELD}.dataset"


def _dataset(job: RLHFJob) -> Split:
    dataset = job.spec.stages.sft.dataset
    columns = {"promptField": dataset.prompt_field, "responseField": dataset.response_field}
    return load_split(dataset, DATASET_FIELD, columns, job.spec.seed, job.spec.storage)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    check_model_path(job.spec.model.base, "spec.model.base")
    if job.spec.model.tokenizer:
        check_model_path(job.spec.model.tokenizer, "spec.model.tokenizer")
    require_held_out(_dataset(job), DATASET_FIELD, "eval_loss")


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer.batches import sft_batch
    from rlhf_trainer.losses import masked_lm_loss
    from rlhf_trainer.models import hidden_size, load_causal_lm, load_tokenizer, tokenizer_source
    from rlhf_trainer.schedule import plan
    from rlhf_trainer.stages.supervised import held_out_share, train, trained
    from rlhf_trainer.worker import StageWorker, all_sum

    worker = StageWorker.start(config)
    spec = worker.job.spec
    stage = spec.stages.sft
    dataset = stage.dataset
    with worker.timed("data"):
        split = _dataset(worker.job)
    schedule = plan(stage, len(split.train), worker.world_size, FIELD)
    base, revision = spec.model.base, spec.model.revision
    with worker.timed("model_load"):
        tokenizer = load_tokenizer(*tokenizer_source(worker.job, base, "spec.model.base"))
        size = hidden_size(base, "spec.model.base", revision)
    _, _, engine = worker.engine(
        size,
        lambda dtype: load_causal_lm(base, "spec.model.base", revision, dtype),
        **trained(stage, schedule),
    )
    device = engine.device

    def loss_of(table, rows: list[int]) -> tuple[torch.Tensor, float]:
        """Token-mean NLL of the rows' responses, and how many response tokens it averaged."""
        picked = table[rows]
        tensors = sft_batch(
            tokenizer,
            picked[dataset.prompt_field],
            picked[dataset.response_field],
            stage.max_seq_len,
        )
        ids, mask = tensors["input_ids"].to(device), tensors["loss_mask"].to(device)
        logits = engine(input_ids=ids, attention_mask=tensors["attention_mask"].to(device)).logits
        return masked_lm_loss(logits, ids, mask), mask[:, 1:].sum().item()

    @torch.no_grad()
    def held_out_loss() -> dict[str, float]:
        """Token-mean NLL of the responses over the whole held-out split (all workers)."""
        engine.eval()
        mine = held_out_share(worker, len(split.held_out))
        total = count = 0.0
        for start in range(0, len(mine), schedule.micro_batch):
            loss, tokens = loss_of(split.held_out, mine[start : start + schedule.micro_batch])
            total += loss.item() * tokens
            count += tokens
        engine.train()
        total, count = all_sum([total, count])
        return {"eval_loss": total / max(count, 1.0)}

    metrics, steps_run = train(
        worker,
        engine,
        stage,
        schedule,
        len(split.train),
        lambda rows: (loss_of(split.train, rows)[0], {}),
        held_out_loss,
    )
    worker.save_model(engine, tokenizer)
    worker.finish(metrics, steps_run=steps_run, total_steps=schedule.total_steps)
