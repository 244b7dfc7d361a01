"""What the supervised stages (SFT, the reward model, DPO) share: the held-out check of their
datasets, the engine settings of their trained model, and the training loop.

    _, _, engine = worker.engine(size, load, **trained(stage, schedule))
    metrics, steps_run = train(worker, engine, stage, schedule, len(split.train), micro, evaluate)

`train` restores the checkpoint to resume from, logs the held-out figures at step 0 (the
"before"), runs the optimizer steps (each `schedule.grad_accum` micro-batches per worker,
DeepSpeed accumulating), checkpoints every `checkpointEverySteps`, and logs the last step with
the final held-out figures. Each stage supplies its loss (`micro`) and its evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rlhf_trainer.jobspec import UserError

if TYPE_CHECKING:
    import torch
    from rlhf_operator.api import RLHFJob
    from rlhf_operator.api.spec import PreferenceDataset, TrainingSchedule

    from rlhf_trainer.data import Split
    from rlhf_trainer.schedule import Schedule
    from rlhf_trainer.worker import StageWorker

MicroStep = Callable[[list[int]], "tuple[torch.Tensor, dict[str, float]]"]
"""A micro-batch's rows -> its loss (to backpropagate) and sums over its rows of per-row figures
(e.g. {"accuracy": pairs ranked right}); a step's metrics average those per row of its batch."""


def preference_split(job: RLHFJob, dataset: PreferenceDataset, field: str) -> Split:
    """A preference dataset's train and held-out pairs (the reward model's, DPO's)."""
    from rlhf_trainer.data import load_split

    columns = {
        "promptField": dataset.prompt_field,
        "chosenField": dataset.chosen_field,
        "rejectedField": dataset.rejected_field,
    }
    return load_split(dataset, field, columns, job.spec.seed, job.spec.storage)


def require_held_out(split: Split, field: str, metric: str) -> None:
    if split.held_out is None:
        raise UserError(
            f"{field}: nothing is held out to measure {metric}; set testSplit or an "
            "evalFraction above 0."
        )


def held_out_share(worker: StageWorker, rows: int) -> list[int]:
    """This worker's rows of a held-out split, equal shares (ZeRO-3 needs equal passes)."""
    usable = list(range(rows - rows % worker.world_size))
    return usable[worker.rank :: worker.world_size]


def trained(stage: TrainingSchedule, schedule: Schedule) -> dict[str, Any]:
    """The engine settings of the stage's trained model (`StageWorker.engine`)."""
    return {
        "micro_batch": schedule.micro_batch,
        "grad_accum": schedule.grad_accum,
        "learning_rate": stage.learning_rate,
        "weight_decay": stage.weight_decay,
        "total_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
    }


def train(
    worker: StageWorker,
    engine: Any,
    stage: TrainingSchedule,
    schedule: Schedule,
    train_rows: int,
    micro: MicroStep,
    evaluate: Callable[[], dict[str, float]],
    final_evaluate: Callable[[], dict[str, float]] | None = None,
) -> tuple[dict[str, float], int]:
    """The stage's optimizer steps (see the module docstring); (the last step's metrics with
    the final evaluation's, steps run here). `final_evaluate`: instead of `evaluate` at the
    end (DPO adds the sampled KL)."""
    from rlhf_trainer.batches import BatchPlan
    from rlhf_trainer.worker import all_mean

    worker.restore({"model": engine})
    start = worker.resumed_from_step or 0
    worker.start_progress(schedule.total_steps)
    if start == 0:
        with worker.timed("eval"):
            worker.log(0, evaluate())
    batches = BatchPlan(train_rows, stage.batch_size, worker.world_size, worker.job.spec.seed)
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, schedule.total_steps):
            rows = batches.rows(step, worker.rank)
            losses: list[float] = []
            sums: dict[str, float] = {}
            for i in range(schedule.grad_accum):
                loss, row_sums = micro(
                    rows[i * schedule.micro_batch : (i + 1) * schedule.micro_batch]
                )
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                for name, value in row_sums.items():
                    sums[name] = sums.get(name, 0.0) + value
            means = all_mean([sum(losses) / len(losses), *(v / len(rows) for v in sums.values())])
            metrics = dict(zip(["loss", *sums], means, strict=True))
            metrics["learning_rate"] = engine.get_lr()[0]
            done = step + 1
            if done < schedule.total_steps:  # the last step is logged with the evaluation's
                worker.log(done, metrics)
                if done % stage.checkpoint_every_steps == 0:
                    worker.save_checkpoint(done, {"model": engine}, metrics)
    with worker.timed("eval"):
        metrics.update((final_evaluate or evaluate)())
    worker.log(schedule.total_steps, metrics)
    return metrics, schedule.total_steps - start
