"""Direct Preference Optimisation: the SFT policy trained on preference pairs against the frozen
SFT policy as reference, with no reward model and no rollouts (Rafailov et al. 2023; IPO, Azar
et al. 2023). The path SFT -> DPO -> evaluation.

Each pair is `prompt + chosen + EOS` and `prompt + rejected + EOS` in one batch; a response's
log-probability is summed over its tokens (sigmoid) or averaged (ipo, as TRL), by the policy
(trained engine) and by the reference (frozen engine, the same weights at step 0), and
`losses.dpo_loss` compares the two log-ratios. Writes the policy to `<artifact>/model/`.
Metrics: loss, reward_accuracy (implicit reward beta * log-ratio of the chosen response above
the rejected one), reward_margin, learning_rate; eval_loss and eval_reward_accuracy on the
held-out pairs (also at step 0, the "before" figure); kl: the policy's KL to the reference on
its own samples of held-out prompts (k1 summed over response tokens, sampled as evaluation
samples), the figure PPO reports, so that the algorithms compare.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import Split, load_split
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path, policy_source

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.dpo"
DATASET_FIELD = f"{FIELD}.dataset"
KL_PROMPTS = 32
"""Held-out prompts sampled once at the end to measure the KL to the reference."""


def _dataset(job: RLHFJob) -> Split:
    dataset = job.spec.stages.dpo.dataset
    columns = {
        "promptField": dataset.prompt_field,
        "chosenField": dataset.chosen_field,
        "rejectedField": dataset.rejected_field,
    }
    return load_split(dataset, DATASET_FIELD, columns, job.spec.seed)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    source, field = policy_source(job)
    if check_upstream or field == "spec.model.base":
        check_model_path(source, field)
    split = _dataset(job)
    if split.held_out is None:
        raise UserError(
            f"{DATASET_FIELD}: nothing is held out to measure eval_loss; set testSplit or an "
            "evalFraction above 0."
        )


def sequence_logprobs(engine, tensors, temperature: float, average: bool):
    """Each row's log-probability of its response tokens (and EOS): summed, or averaged."""
    from rlhf_trainer.losses import masked_mean, masked_sum
    from rlhf_trainer.models import token_logprobs

    ids = tensors["input_ids"]
    logits = engine(input_ids=ids, attention_mask=tensors["attention_mask"]).logits
    logprobs = token_logprobs(logits, ids, temperature)
    mask = tensors["loss_mask"][:, 1:]
    return (masked_mean if average else masked_sum)(logprobs, mask, dim=1)


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer import engine as ds
    from rlhf_trainer.batches import BatchPlan, prompt_ids, sft_batch
    from rlhf_trainer.generation import sample
    from rlhf_trainer.losses import dpo_loss, kl_penalty, masked_sum
    from rlhf_trainer.models import (
        disable_dropout,
        hidden_size,
        load_causal_lm,
        load_tokenizer,
        model_revision,
        token_logprobs,
        tokenizer_source,
    )
    from rlhf_trainer.schedule import plan
    from rlhf_trainer.worker import StageWorker, all_mean, all_sum

    worker = StageWorker.start(config)
    spec = worker.job.spec
    stage = spec.stages.dpo
    dataset = stage.dataset
    average = stage.loss_type == "ipo"
    with worker.timed("data"):
        split = _dataset(worker.job)
    source, field = policy_source(worker.job)
    schedule = plan(stage, len(split.train), worker.world_size, FIELD)
    revision = model_revision(worker.job, source)  # spec.model.revision when SFT is off
    with worker.timed("model_load"):
        tokenizer = load_tokenizer(*tokenizer_source(worker.job, source, field))
        size = hidden_size(source, field, revision)

    def engine(learning_rate: float | None = None, **schedule_settings: int):
        """Plan, load (in the spec's precision) and wrap one copy of the SFT policy; each
        engine is made before the next copy is loaded. No learning rate: frozen."""
        with worker.timed("model_load"):
            engine_plan = ds.plan_engine(
                spec.parallelism,
                use_gpu=worker.use_gpu,
                world_size=worker.world_size,
                hidden_size=size,
                learning_rate=learning_rate,
                weight_decay=stage.weight_decay,
                **schedule_settings,
            )
            model = engine_plan.build(
                lambda: load_causal_lm(source, field, revision, engine_plan.dtype)
            )
            disable_dropout(model)  # the log-ratio at step 0 must be exactly 0
        with worker.timed("deepspeed_init"):
            return engine_plan.initialize(model)

    policy = engine(
        stage.learning_rate,
        micro_batch=schedule.micro_batch,
        grad_accum=schedule.grad_accum,
        total_steps=schedule.total_steps,
        warmup_steps=schedule.warmup_steps,
    )
    reference = engine()
    device = policy.device

    def pairs(table, rows: list[int]) -> dict[str, torch.Tensor]:
        """Chosen rows then rejected rows, `prompt + response + EOS`, response tokens marked."""
        picked = table[rows]
        prompts = picked[dataset.prompt_field] if dataset.prompt_field else [""] * len(rows)
        tensors = sft_batch(
            tokenizer,
            [*prompts, *prompts],
            [*picked[dataset.chosen_field], *picked[dataset.rejected_field]],
            stage.max_seq_len,
        )
        return {name: tensor.to(device) for name, tensor in tensors.items()}

    def loss_of(table, rows: list[int]):
        tensors = pairs(table, rows)
        policy_chosen, policy_rejected = sequence_logprobs(policy, tensors, 1.0, average).chunk(2)
        with torch.no_grad():
            ref = sequence_logprobs(reference, tensors, 1.0, average)
        ref_chosen, ref_rejected = ref.chunk(2)
        return dpo_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, stage.beta, stage.loss_type
        )

    @torch.no_grad()
    def held_out() -> dict[str, float]:
        policy.eval()
        rows = list(range(len(split.held_out) - len(split.held_out) % worker.world_size))
        mine = rows[worker.rank :: worker.world_size]  # equal shares: ZeRO-3 needs equal passes
        total = correct = 0.0
        for start in range(0, len(mine), schedule.micro_batch):
            chunk = mine[start : start + schedule.micro_batch]
            loss, chosen, rejected = loss_of(split.held_out, chunk)
            total += loss.item() * len(chunk)
            correct += (chosen > rejected).sum().item()
        policy.train()
        total, correct, count = all_sum([total, correct, float(len(mine))])
        return {"eval_loss": total / max(count, 1.0), "eval_reward_accuracy": correct / count}

    @torch.no_grad()
    def sampled_kl() -> dict[str, float]:
        """Mean KL(policy || reference) of the policy's own samples of held-out prompts."""
        if not dataset.prompt_field:
            return {}
        generation = spec.stages.evaluation.generation or spec.stages.ppo.generation
        count = min(KL_PROMPTS, len(split.held_out))
        mine = list(range(count - count % worker.world_size))[worker.rank :: worker.world_size]
        texts = split.held_out[mine][dataset.prompt_field]
        worker.sampling_seed(schedule.total_steps)
        samples = sample(
            policy.module,
            tokenizer,
            prompt_ids(tokenizer, texts, spec.stages.ppo.max_prompt_len),
            generation,
            synced_gpus=spec.parallelism.zero_stage == 3,
            device=device,
        )
        ids, attention = samples.input_ids, samples.attention_mask
        temperature = generation.temperature
        logprobs = [
            token_logprobs(engine(input_ids=ids, attention_mask=attention).logits, ids, temperature)
            for engine in (policy, reference)
        ]
        kl = masked_sum(kl_penalty(*logprobs, "k1"), samples.action_mask, dim=1)
        total, rows = all_sum([kl.sum().item(), float(len(mine))])
        return {"kl": total / max(rows, 1.0)}

    worker.restore({"model": policy})
    start = worker.resumed_from_step or 0
    worker.start_progress(schedule.total_steps)
    if start == 0:
        with worker.timed("eval"):
            worker.log(0, held_out())
    batches = BatchPlan(len(split.train), stage.batch_size, worker.world_size, spec.seed)
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, schedule.total_steps):
            rows = batches.rows(step, worker.rank)
            losses, correct, margin = [], 0.0, 0.0
            for i in range(schedule.grad_accum):
                micro = rows[i * schedule.micro_batch : (i + 1) * schedule.micro_batch]
                loss, chosen, rejected = loss_of(split.train, micro)
                policy.backward(loss)
                policy.step()
                losses.append(loss.item())
                correct += (chosen > rejected).float().sum().item()
                margin += (chosen - rejected).sum().item()
            loss_mean, accuracy, margin_mean = all_mean(
                [sum(losses) / len(losses), correct / len(rows), margin / len(rows)]
            )
            metrics = {
                "loss": loss_mean,
                "reward_accuracy": accuracy,
                "reward_margin": margin_mean,
                "learning_rate": policy.get_lr()[0],
            }
            done = step + 1
            if done < schedule.total_steps:  # the last step is logged with the eval figures
                worker.log(done, metrics)
                if done % stage.checkpoint_every_steps == 0:
                    worker.save_checkpoint(done, {"model": policy}, metrics)
    with worker.timed("eval"):
        metrics.update(held_out())
        metrics.update(sampled_kl())
    worker.log(schedule.total_steps, metrics)
    worker.save_model(policy, tokenizer)
    worker.finish(metrics, steps_run=schedule.total_steps - start, total_steps=schedule.total_steps)
