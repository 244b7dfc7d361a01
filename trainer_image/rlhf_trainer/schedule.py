"""How many optimizer steps a supervised stage runs, and how each global batch is split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_trainer.jobspec import UserError

if TYPE_CHECKING:
    from rlhf_operator.api.spec import TrainingSchedule


@dataclass(frozen=True)
class Schedule:
    micro_batch: int
    """Rows per forward pass on one worker."""
    grad_accum: int
    """Forward passes per optimizer step on one worker."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def plan(schedule: TrainingSchedule, num_rows: int, world_size: int, field: str) -> Schedule:
    """`batchSize` rows per optimizer step over all workers, `epochs` passes capped by
    `maxSteps`; a batch larger than the data is an error naming `batchSize`."""
    micro = schedule.micro_batch_size or max(schedule.batch_size // world_size, 1)
    grad_accum = max(schedule.batch_size // (micro * world_size), 1)
    steps_per_epoch = num_rows // schedule.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"{field}.batchSize ({schedule.batch_size}) is larger than the training split "
            f"({num_rows} rows); lower it or add data."
        )
    total = schedule.epochs * steps_per_epoch
    if schedule.max_steps is not None:
        total = min(total, schedule.max_steps)
    return Schedule(
        micro_batch=micro,
        grad_accum=grad_accum,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        warmup_steps=int(schedule.warmup_ratio * total),
    )
