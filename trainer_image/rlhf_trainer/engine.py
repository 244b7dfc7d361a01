"""DeepSpeed wiring: the spec's parallelism settings -> a DeepSpeed config and engines.

Trained models get an engine with the spec's ZeRO stage, offload and precision, a torch AdamW (or
DeepSpeedCPUAdam when optimizer states are offloaded from a GPU) and a linear warm-up/decay
schedule that DeepSpeed steps and checkpoints. Frozen models (PPO's reference and reward model)
get an optimizer-less engine: ZeRO-3 shards them like the trained ones, any other stage keeps a
full replica per worker (DeepSpeed-Chat's `get_eval_ds_config` does the same).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from rlhf_operator.api.spec import ParallelismSpec

# DeepSpeed's own checkpoint tag inside each Ray Train checkpoint directory.
CHECKPOINT_TAG = "state"
GRADIENT_CLIPPING = 1.0


def select_accelerator(use_gpu: bool) -> None:
    """Pin DeepSpeed's accelerator before it is imported (it probes otherwise, and on a GPU-less
    worker its CPU accelerator is what we want)."""
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def ds_config(
    parallelism: ParallelismSpec,
    *,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    use_gpu: bool,
    trainable: bool = True,
) -> dict[str, Any]:
    """The DeepSpeed config of one engine."""
    zero_stage = parallelism.zero_stage if trainable else (3 if parallelism.zero_stage == 3 else 0)
    zero: dict[str, Any] = {"stage": zero_stage}
    if trainable and parallelism.offload in ("optimizer", "parameters"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if parallelism.offload == "parameters" and zero_stage == 3:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # torch's AdamW is a ZeRO-tested optimizer in spirit; DeepSpeed lists only its own.
        "zero_allow_untested_optimizer": True,
        # On CPU workers there is nothing to offload to: keep torch's AdamW there.
        "zero_force_ds_cpu_optimizer": use_gpu,
    }
    if trainable:
        config["gradient_clipping"] = GRADIENT_CLIPPING
    if parallelism.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif parallelism.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def linear_schedule(optimizer, total_steps: int | None, warmup_steps: int):
    """Linear warm-up to the peak learning rate, then linear decay to zero (HF's "linear");
    constant after the warm-up when `total_steps` is None (PPO)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if total_steps is None:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def initialize(
    model: torch.nn.Module,
    parallelism: ParallelismSpec,
    *,
    use_gpu: bool,
    world_size: int,
    micro_batch: int = 1,
    grad_accum: int = 1,
    learning_rate: float | None = None,
    weight_decay: float = 0.0,
    total_steps: int | None = None,
    warmup_steps: int = 0,
):
    """A DeepSpeed engine for `model`; trainable when `learning_rate` is given, else frozen."""
    import deepspeed

    trainable = learning_rate is not None
    if parallelism.gradient_checkpointing and trainable:
        inner = getattr(model, "model", model)  # ScalarHeadModel wraps the HF model
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = ds_config(
        parallelism,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=world_size,
        use_gpu=use_gpu,
        trainable=trainable,
    )
    optimizer = scheduler = None
    if trainable:
        params = [p for p in model.parameters() if p.requires_grad]
        if use_gpu and parallelism.offload != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=learning_rate, weight_decay=weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
        scheduler = linear_schedule(optimizer, total_steps, warmup_steps)
    else:
        model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    if not trainable:
        engine.eval()
    return engine


def gathered(engine, zero_stage: int):
    """Context in which every rank holds the full parameters (ZeRO-3), else a no-op."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


def save_pretrained(engine, hf_model, tokenizer, out_dir: Path, rank: int, zero_stage: int):
    """`save_pretrained` of an engine's HF model (+ tokenizer) on rank 0; collective under ZeRO-3.

    `hf_model` is the transformers model inside the engine (the engine's module itself, or the
    model a wrapper holds).
    """
    with gathered(engine, zero_stage):
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            hf_model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)


def save_state(engine, directory: Path) -> None:
    """Model, optimizer and scheduler state (this rank's ZeRO shards); every rank calls it."""
    (directory / CHECKPOINT_TAG).mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)


def load_state(engine, directory: Path) -> None:
    path, _ = engine.load_checkpoint(
        str(directory),
        tag=CHECKPOINT_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint in {directory}")
