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

from rlhf_trainer.data import Split
from rlhf_trainer.models import check_model_path, policy_source
from rlhf_trainer.stages.supervised import preference_split, require_held_out

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.dpo"
DATASET_FIELD = f"{FIELD}.dataset"
KL_PROMPTS = 32
"""Held-out prompts sampled once at the end to measure the KL to the reference."""


def _dataset(job: RLHFJob) -> Split:
    return preference_split(job, job.spec.stages.dpo.dataset, DATASET_FIELD)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    source, field = policy_source(job)
    if check_upstream or field == "spec.model.base":
        check_model_path(source, field)
    require_held_out(_dataset(job), DATASET_FIELD, "eval_loss")


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

    from rlhf_trainer.batches import prompt_ids, sft_batch
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
    from rlhf_trainer.stages.supervised import held_out_share, train, trained
    from rlhf_trainer.worker import StageWorker, all_sum

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

    def sft_copy(dtype):
        model = load_causal_lm(source, field, revision, dtype)
        disable_dropout(model)  # the log-ratio at step 0 must be exactly 0
        return model

    # Each engine is made before the next copy is loaded (one unwrapped copy at a time).
    _, _, policy = worker.engine(size, sft_copy, **trained(stage, schedule))
    _, _, reference = worker.engine(size, sft_copy)  # frozen
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
        mine = held_out_share(worker, len(split.held_out))
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

    def micro(rows: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, chosen, rejected = loss_of(split.train, rows)
        return loss, {
            "reward_accuracy": (chosen > rejected).float().sum().item(),
            "reward_margin": (chosen - rejected).sum().item(),
        }

    metrics, steps_run = train(
        worker,
        policy,
        stage,
        schedule,
        len(split.train),
        micro,
        held_out,
        final_evaluate=lambda: {**held_out(), **sampled_kl()},
    )
    worker.save_model(policy, tokenizer)
    worker.finish(metrics, steps_run=steps_run, total_steps=schedule.total_steps)
