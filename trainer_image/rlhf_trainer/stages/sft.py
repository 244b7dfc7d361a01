"""Supervised fine-tuning: causal-LM loss on response tokens only (prompt tokens masked).

Starts from `spec.model.base`; writes the SFT model (+ tokenizer) to `<artifact>/model/`.
Metrics: loss, eval_loss (held-out, exact token mean over all workers; also logged at step 0 as
the "before" figure), learning_rate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import Split, load_split
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path

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
    split = _dataset(job)
    if split.held_out is None:
        raise UserError(
            f"{DATASET_FIELD}: nothing is held out to measure eval_loss; set testSplit or an "
            "evalFraction above 0."
        )


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer import engine as ds
    from rlhf_trainer.batches import BatchPlan, sft_batch
    from rlhf_trainer.losses import masked_lm_loss
    from rlhf_trainer.models import hidden_size, load_causal_lm, load_tokenizer, tokenizer_source
    from rlhf_trainer.schedule import plan
    from rlhf_trainer.worker import StageWorker, all_mean, all_sum

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
        engine_plan = ds.plan_engine(
            spec.parallelism,
            use_gpu=worker.use_gpu,
            world_size=worker.world_size,
            hidden_size=hidden_size(base, "spec.model.base", revision),
            micro_batch=schedule.micro_batch,
            grad_accum=schedule.grad_accum,
            learning_rate=stage.learning_rate,
            weight_decay=stage.weight_decay,
            total_steps=schedule.total_steps,
            warmup_steps=schedule.warmup_steps,
        )
        model = engine_plan.build(
            lambda: load_causal_lm(base, "spec.model.base", revision, engine_plan.dtype)
        )
    with worker.timed("deepspeed_init"):
        engine = engine_plan.initialize(model)
    device = engine.device

    def batch(table, rows: list[int]) -> dict[str, torch.Tensor]:
        picked = table[rows]
        tensors = sft_batch(
            tokenizer,
            picked[dataset.prompt_field],
            picked[dataset.response_field],
            stage.max_seq_len,
        )
        return {name: tensor.to(device) for name, tensor in tensors.items()}

    @torch.no_grad()
    def held_out_loss() -> float:
        """Token-mean NLL of the responses over the whole held-out split (all workers)."""
        engine.eval()
        rows = list(range(len(split.held_out) - len(split.held_out) % worker.world_size))
        mine = rows[worker.rank :: worker.world_size]  # equal shares: ZeRO-3 needs equal passes
        total = count = 0.0
        for start in range(0, len(mine), schedule.micro_batch):
            tensors = batch(split.held_out, mine[start : start + schedule.micro_batch])
            logits = engine(
                input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
            ).logits
            tokens = tensors["loss_mask"][:, 1:].sum().item()
            loss = masked_lm_loss(logits, tensors["input_ids"], tensors["loss_mask"])
            total += loss.item() * tokens
            count += tokens
        engine.train()
        total, count = all_sum([total, count])
        return total / max(count, 1.0)

    worker.restore({"model": engine})
    start = worker.resumed_from_step or 0
    worker.start_progress(schedule.total_steps)
    if start == 0:
        with worker.timed("eval"):
            worker.log(0, {"eval_loss": held_out_loss()})
    batches = BatchPlan(len(split.train), stage.batch_size, worker.world_size, spec.seed)
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, schedule.total_steps):
            rows = batches.rows(step, worker.rank)
            losses = []
            for i in range(schedule.grad_accum):
                micro = rows[i * schedule.micro_batch : (i + 1) * schedule.micro_batch]
                tensors = batch(split.train, micro)
                logits = engine(
                    input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]
                ).logits
                loss = masked_lm_loss(logits, tensors["input_ids"], tensors["loss_mask"])
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
            (loss_mean,) = all_mean([sum(losses) / len(losses)])
            metrics = {"loss": loss_mean, "learning_rate": engine.get_lr()[0]}
            done = step + 1
            if done < schedule.total_steps:  # the last step is logged with eval_loss below
                worker.log(done, metrics)
                if done % stage.checkpoint_every_steps == 0:
                    worker.save_checkpoint(done, {"model": engine}, metrics)
    with worker.timed("eval"):
        metrics["eval_loss"] = held_out_loss()
    worker.log(schedule.total_steps, metrics)
    worker.save_model(engine, tokenizer)
    worker.finish(metrics, steps_run=schedule.total_steps - start, total_steps=schedule.total_steps)
