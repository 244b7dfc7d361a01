"""DeepSpeed wiring: the spec's parallelism settings -> a DeepSpeed config and engines.

Trained models get an engine with the spec's ZeRO stage, offload and precision, a torch AdamW (or
DeepSpeedCPUAdam when optimizer states are offloaded from a GPU) and a linear warm-up/decay
schedule that DeepSpeed steps and checkpoints. Frozen models (PPO's reference and reward model)
get an optimizer-less engine: ZeRO-3 shards them like the trained ones, any other stage keeps a
full replica per worker (DeepSpeed-Chat's `_init_ref`/`_init_reward` with `get_eval_ds_config`
do the same).

Each engine is planned before its model is built (`plan_engine`): under ZeRO-3 the model is then
built inside `EnginePlan.building()`, where transformers' `from_pretrained` constructs it under
`deepspeed.zero.Init` and rank 0 reads the checkpoint (in CPU memory) into the partitions: no
GPU ever holds the whole model, other workers not even in CPU memory (DeepSpeed-Chat's and
OpenRLHF's `HfDeepSpeedConfig` before `from_pretrained`).

    plan = plan_engine(spec.parallelism, use_gpu=..., world_size=..., hidden_size=..., ...)
    model = plan.build(lambda: load_causal_lm(uri, field, dtype=plan.dtype))
    engine = plan.initialize(model)

Models are loaded in the spec's precision and each engine is made right after its model (before
the next model is loaded): the host never holds several full-precision models at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from rlhf_operator.api.spec import ParallelismSpec

M = TypeVar("M", bound=torch.nn.Module)

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
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config of one engine (`hidden_size`: the model's, to size ZeRO-3's
    buckets)."""
    zero_stage = parallelism.zero_stage if trainable else (3 if parallelism.zero_stage == 3 else 0)
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3 and hidden_size:
        zero.update(zero3_buckets(hidden_size))
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


def zero3_buckets(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 bucket sizes scaled to the model, as transformers fills DeepSpeed's "auto" values.

    DeepSpeed's defaults (reduce 5e8, prefetch 5e7 elements) suit billions of parameters; on a
    small model the gradient bucket alone grows to the whole model's gradients before it is
    reduced. hidden² elements per reduce, 0.9·hidden² prefetched, and parameters of fewer than
    10·hidden elements (biases, norms) kept whole instead of sharded.
    """
    return {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


@dataclass
class EnginePlan:
    """One model's DeepSpeed engine, decided before the model is built."""

    config: dict[str, Any]
    parallelism: ParallelismSpec
    use_gpu: bool
    learning_rate: float | None = None
    """None: a frozen model (no optimizer)."""
    weight_decay: float = 0.0
    total_steps: int | None = None
    warmup_steps: int = 0

    @property
    def trainable(self) -> bool:
        return self.learning_rate is not None

    @property
    def zero_stage(self) -> int:
        return int(self.config["zero_optimization"]["stage"])

    @property
    def dtype(self) -> torch.dtype:
        """The dtype to load the model in: the spec's precision (models.load_dtype)."""
        from rlhf_trainer.models import load_dtype

        return load_dtype(self.parallelism.precision)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Under ZeRO-3, transformers models made in this block are partitioned over the workers
        as they are built (`from_pretrained` under `deepspeed.zero.Init`; rank 0 reads the
        checkpoint, each worker keeps its shard). A no-op for stages 0-2."""
        if self.zero_stage != 3:
            yield
            return
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # zero.Init reads the world size from DeepSpeed's communicator, which adopts Ray Train's
        # torch.distributed group here (deepspeed.initialize would do it later).
        deepspeed.init_distributed()
        # transformers keeps only a weak reference: the object must live through the block.
        hf_config = HfDeepSpeedConfig(self.config)
        try:
            yield
        finally:
            unset_hf_deepspeed_config()
            del hf_config

    def build(self, load: Callable[[], M]) -> M:
        """`load()` (a `from_pretrained`) inside `building()`."""
        with self.building():
            return load()

    def initialize(self, model: torch.nn.Module):
        """The DeepSpeed engine of `model` (built by `build`)."""
        import deepspeed

        if self.parallelism.gradient_checkpointing and self.trainable:
            inner = getattr(model, "model", model)  # ScalarHeadModel wraps the HF model
            inner.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        optimizer = scheduler = None
        if self.trainable:
            params = [p for p in model.parameters() if p.requires_grad]
            if self.use_gpu and self.parallelism.offload != "none":
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                optimizer = DeepSpeedCPUAdam(
                    params, lr=self.learning_rate, weight_decay=self.weight_decay
                )
            else:
                optimizer = torch.optim.AdamW(
                    params, lr=self.learning_rate, weight_decay=self.weight_decay
                )
            scheduler = linear_schedule(optimizer, self.total_steps, self.warmup_steps)
        else:
            model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.config
        )
        if not self.trainable:
            engine.eval()
        return engine


def plan_engine(
    parallelism: ParallelismSpec,
    *,
    use_gpu: bool,
    world_size: int,
    hidden_size: int | None,
    micro_batch: int = 1,
    grad_accum: int = 1,
    learning_rate: float | None = None,
    weight_decay: float = 0.0,
    total_steps: int | None = None,
    warmup_steps: int = 0,
) -> EnginePlan:
    """The plan of one engine; trainable when `learning_rate` is given, else frozen."""
    config = ds_config(
        parallelism,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=world_size,
        use_gpu=use_gpu,
        trainable=learning_rate is not None,
        hidden_size=hidden_size,
    )
    return EnginePlan(
        config,
        parallelism,
        use_gpu,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
    )


def gathered(engine, zero_stage: int):
    """Context in which every rank holds the full parameters (ZeRO-3), else a no-op."""
    import contextlib

    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    # Prefetching may leave parameters of the next forward in flight (after an evaluation
    # pass); they must land and be released before everything can be gathered.
    engine.empty_partition_cache()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


# Share of the free device (or host) memory a ZeRO-3 model's full parameters may take to be
# gathered once for generation; the rest is for the KV cache and activations.
GATHER_FOR_GENERATION_SHARE = 0.5


def _zero3_offload(engine):
    """The DeepSpeedZeRoOffload that owns a ZeRO-3 engine's module hooks."""
    optimizer = engine.optimizer
    return getattr(optimizer, "parameter_offload", optimizer)


def full_parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's full (unpartitioned) parameters."""
    return sum(
        int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in module.parameters()
    )


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


@contextlib.contextmanager
def generation_model(engine, zero_stage: int) -> Iterator[tuple[torch.nn.Module, bool]]:
    """(model to `generate` with, whether its forward passes are collective).

    Under ZeRO-3 every forward gathers each layer's parameters from all ranks, and generation
    runs one forward per token: a 256-token response costs 256 all-gathers of the whole model.
    When the full parameters fit (`GATHER_FOR_GENERATION_SHARE` of the free memory, the same on
    every rank), they are gathered once for the whole rollout and DeepSpeed's per-module hooks
    are lifted meanwhile (DeepSpeed's hybrid engine; TRL's `unwrap_model_for_generation`);
    ranks then generate independently. Otherwise generation stays layer by layer and ranks step
    together (`synced_gpus`). Stages 0-2 hold the whole model anyway.
    """
    if zero_stage != 3:
        yield engine.module, False
        return
    import deepspeed

    from rlhf_trainer.worker import all_sum

    needed = full_parameter_bytes(engine.module)
    fits = needed <= GATHER_FOR_GENERATION_SHARE * free_memory_bytes(engine.device)
    # Every rank must choose the same way: gathering is collective.
    if all_sum([float(not fits)])[0] > 0:
        yield engine.module, True
        return
    offload = _zero3_offload(engine)
    engine.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        for param in engine.module.parameters():
            param.ds_active_sub_modules.clear()
        for hook in [*offload.forward_hooks, *offload.backward_hooks]:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield engine.module, False
        finally:
            offload._register_deepspeed_module(offload.module)


def save_pretrained(engine, hf_model, tokenizer, out_dir: Path, rank: int, zero_stage: int):
    """`save_pretrained` of an engine's HF model (+ tokenizer) on rank 0; collective under ZeRO-3.

    `hf_model` is the transformers model inside the engine (the engine's module itself, or the
    model a wrapper holds); a LoRA (PEFT) model is saved with its adapters merged, as a plain
    transformers model.
    """
    from rlhf_trainer.lora import is_peft, save_merged

    with gathered(engine, zero_stage):
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            if is_peft(hf_model):
                save_merged(hf_model, out_dir)
            else:
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
