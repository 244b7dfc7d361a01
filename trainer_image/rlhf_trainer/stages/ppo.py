"""PPO, colocated DeepSpeed-Chat style: every worker holds the policy and value model (trained,
each its own DeepSpeed engine) and the reference and reward model (frozen engines).

Per iteration each worker takes its share of `rolloutBatchSize` prompts and
  1. samples one response per prompt from the policy;
  2. scores it: policy and reference log-probabilities, values, the reward model's score;
  3. per-token reward = -kl_coef * KL(policy || reference) (k1), plus the score on the last
     response token; GAE advantages (whitened) and returns;
  4. runs `ppoEpochs` passes of clipped policy and value updates over minibatches; DeepSpeed
     averages the gradients over the workers.
The KL coefficient is fixed, or adaptive towards `targetKL` (Ziegler et al. 2019).
Policy init and reference: the SFT model; reward model and value init: the reward model. A
pretrained classifier that cannot start a value model (another vocabulary, an encoder, several
labels; reward_model.py) leaves the value model to start from the SFT policy's backbone with a
fresh scalar head.
Writes the PPO policy to `<artifact>/model/`. Metrics: reward_mean (reward-model score of the
iteration's rollouts), kl (per-sequence KL, summed over response tokens), policy_loss,
value_loss, clip_fraction, approx_kl (k2 KL between the rollout policy and the updated one,
mean over minibatches), entropy (of the tempered policy on response tokens), kl_coef,
learning_rate. Log-probs are scored with the sampling temperature (models.token_logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from rlhf_trainer.data import Split, load_split
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path, policy_source, reward_source
from rlhf_trainer.reward_model import check_positive_label

if TYPE_CHECKING:
    from rlhf_operator.api import RLHFJob
    from rlhf_operator.api.spec import PPOStage

    from rlhf_trainer.generation import Samples
    from rlhf_trainer.reward_model import RewardScorer

FIELD = "spec.stages.ppo"
PROMPTS_FIELD = f"{FIELD}.prompts"


def prompt_split(job: RLHFJob) -> Split:
    """PPO trains on the prompts' train part; the held-out part is evaluation's default."""
    prompts = job.spec.stages.ppo.prompts
    return load_split(prompts, PROMPTS_FIELD, {"promptField": prompts.prompt_field}, job.spec.seed)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    ppo = job.spec.stages.ppo
    train = prompt_split(job).train
    if len(train) < ppo.rollout_batch_size:
        raise UserError(
            f"{FIELD}.rolloutBatchSize ({ppo.rollout_batch_size}) is larger than the training "
            f"part of {PROMPTS_FIELD} ({len(train)} prompts); lower it or add prompts."
        )
    for uri, field in (policy_source(job), reward_source(job)):
        if check_upstream or field.startswith("spec.model") or field.endswith(".model"):
            check_model_path(uri, field)
    check_positive_label(job)
    if ppo.rollout.engine == "vllm":
        from rlhf_trainer.rollout.vllm import check_installed

        check_installed(f"{FIELD}.rollout.engine")


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards `[B, T]`: `-kl_coef * kl` on every response token, plus the
    sequence's score on its last response token (Ziegler et al. 2019; zero elsewhere)."""
    mask = action_mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, torch.zeros_like(positions)).argmax(dim=1)
    return rewards.scatter_add(1, last.unsqueeze(1), scores.to(kl.dtype).unsqueeze(1))


@dataclass
class Rollout:
    """One worker's scored rollouts (everything PPO's update needs), `[B, T-1]` per token."""

    samples: Samples
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor
    """[B] reward-model score of each sequence."""
    kl: torch.Tensor
    """[B] KL(policy || reference) of each sequence, summed over its response tokens."""
    entropy: float
    """Mean entropy of the policy's (tempered) next-token distribution on response tokens."""


@torch.no_grad()
def score(
    samples: Samples,
    engines: dict[str, Any],
    reward: RewardScorer,
    ppo: PPOStage,
    kl_coef: float,
) -> Rollout:
    from rlhf_trainer.losses import gae, kl_penalty, masked_mean, masked_sum, masked_whiten
    from rlhf_trainer.models import token_entropy, token_logprobs

    ids, attention = samples.input_ids, samples.attention_mask
    actions = samples.action_mask
    temperature = ppo.generation.temperature
    policy_logits = engines["policy"](input_ids=ids, attention_mask=attention).logits
    logprobs = token_logprobs(policy_logits, ids, temperature)
    entropy = masked_mean(token_entropy(policy_logits, temperature), actions)
    del policy_logits
    reference = token_logprobs(
        engines["reference"](input_ids=ids, attention_mask=attention).logits, ids, temperature
    )
    values = engines["value"](input_ids=ids, attention_mask=attention)[:, :-1]
    scores = reward(ids, attention)
    kl = kl_penalty(logprobs, reference, "k1")
    rewards = token_rewards(scores, kl, actions, kl_coef)
    advantages, returns = gae(rewards, values, actions, ppo.gamma, ppo.lam)
    return Rollout(
        samples=samples,
        logprobs=logprobs,
        values=values,
        advantages=masked_whiten(advantages, actions),
        returns=returns,
        scores=scores,
        kl=masked_sum(kl, actions, dim=1),
        entropy=entropy.item(),
    )


def update(rollout: Rollout, engines: dict[str, Any], ppo: PPOStage, mini_batch: int):
    """`ppoEpochs` passes of clipped policy and value updates; mean (policy_loss, value_loss,
    clip_fraction, approx_kl) over the minibatches."""
    from rlhf_trainer.losses import policy_loss, value_loss
    from rlhf_trainer.models import token_logprobs

    policy, value = engines["policy"], engines["value"]
    samples = rollout.samples
    count = samples.input_ids.shape[0]
    totals = [0.0, 0.0, 0.0, 0.0]
    passes = 0
    for _ in range(ppo.ppo_epochs):
        order = torch.randperm(count, device=samples.input_ids.device)
        for start in range(0, count, mini_batch):
            idx = order[start : start + mini_batch]
            ids, attention = samples.input_ids[idx], samples.attention_mask[idx]
            actions = samples.action_mask[idx]
            logprobs = token_logprobs(
                policy(input_ids=ids, attention_mask=attention).logits,
                ids,
                ppo.generation.temperature,
            )
            loss, clipped, approx_kl = policy_loss(
                logprobs, rollout.logprobs[idx], rollout.advantages[idx], actions, ppo.clip_range
            )
            policy.backward(loss)
            policy.step()
            values = value(input_ids=ids, attention_mask=attention)[:, :-1]
            v_loss = value_loss(
                values, rollout.values[idx], rollout.returns[idx], actions, ppo.value_clip_range
            )
            value.backward(ppo.value_loss_coef * v_loss)
            value.step()
            totals[0] += loss.item()
            totals[1] += v_loss.item()
            totals[2] += clipped.item()
            totals[3] += approx_kl.item()
            passes += 1
    return [total / max(passes, 1) for total in totals]


@dataclass
class Models:
    """PPO's four models, each built for its engine (under ZeRO-3: partitioned as built)."""

    tokenizer: Any
    """The policy's."""
    reward_tokenizer: Any | None
    """The reward model's own, when its vocabulary differs (reward_model.py)."""
    plans: dict[str, Any]
    modules: dict[str, torch.nn.Module]


def load_models(worker: Any, mini_batch: int) -> Models:
    """Policy and reference from the SFT model; reward model; value model from the reward model
    when it can start one, else from the SFT model with a fresh scalar head (logged)."""
    from rlhf_trainer import engine as ds
    from rlhf_trainer.models import (
        disable_dropout,
        hidden_size,
        load_causal_lm,
        load_scalar_model,
        load_tokenizer,
    )
    from rlhf_trainer.reward_model import (
        load_reward_head,
        load_reward_tokenizer,
        value_init_problem,
    )
    from rlhf_trainer.worker import logger

    spec = worker.job.spec
    ppo = spec.stages.ppo
    policy_uri, policy_field = policy_source(worker.job)
    reward_uri, reward_field = reward_source(worker.job)

    def plan(uri: str, field: str, learning_rate: float | None = None):
        return ds.plan_engine(
            spec.parallelism,
            use_gpu=worker.use_gpu,
            world_size=worker.world_size,
            hidden_size=hidden_size(uri, field),
            micro_batch=mini_batch,
            learning_rate=learning_rate,  # None: frozen
        )

    tokenizer = load_tokenizer(policy_uri, policy_field)
    reward_tokenizer = load_reward_tokenizer(reward_uri, reward_field, tokenizer)
    plans = {"reward": plan(reward_uri, reward_field)}
    reward = plans["reward"].build(
        lambda: load_reward_head(reward_uri, reward_field, spec.stages.reward.positive_label)
    )
    problem = value_init_problem(reward, reward_tokenizer is not None, reward_uri)
    value_uri, value_field = (
        (reward_uri, reward_field) if problem is None else policy_source(worker.job)
    )
    if problem is not None and worker.is_main:
        logger.warning(
            "ppo: the value model starts from %s with a fresh scalar head: %s", value_field, problem
        )
    plans["value"] = plan(value_uri, value_field, ppo.value_learning_rate or ppo.learning_rate)
    plans["policy"] = plan(policy_uri, policy_field, ppo.learning_rate)
    plans["reference"] = plan(policy_uri, policy_field)
    modules = {
        "policy": plans["policy"].build(lambda: load_causal_lm(policy_uri, policy_field)),
        "value": plans["value"].build(
            lambda: load_scalar_model(value_uri, value_field, tokenizer.pad_token_id)
        ),
        "reference": plans["reference"].build(lambda: load_causal_lm(policy_uri, policy_field)),
        "reward": reward,
    }
    disable_dropout(modules["policy"])
    disable_dropout(modules["value"])
    return Models(tokenizer, reward_tokenizer, plans, modules)


def train_loop(config: dict[str, Any]) -> None:
    from rlhf_trainer import engine as ds
    from rlhf_trainer.batches import BatchPlan, prompt_ids
    from rlhf_trainer.losses import AdaptiveKLController, FixedKLController
    from rlhf_trainer.reward_model import RewardScorer, max_length
    from rlhf_trainer.rollout import Sampling, make_engine
    from rlhf_trainer.worker import StageWorker, all_mean

    worker = StageWorker.start(config)
    spec = worker.job.spec
    ppo = spec.stages.ppo
    with worker.timed("data"):
        prompts = prompt_split(worker.job).train
    per_worker = ppo.rollout_batch_size // worker.world_size
    mini_batch = min(ppo.mini_batch_size or per_worker, per_worker)
    with worker.timed("model_load"):
        models = load_models(worker, mini_batch)
    tokenizer, reward_tokenizer = models.tokenizer, models.reward_tokenizer
    with worker.timed("deepspeed_init"):
        engines = {
            name: models.plans[name].initialize(module) for name, module in models.modules.items()
        }
    device = engines["policy"].device
    scorer = RewardScorer(
        engines["reward"],
        tokenizer,
        reward_tokenizer,
        max_length(reward_tokenizer, models.modules["reward"].model) if reward_tokenizer else None,
    )
    if ppo.target_kl is not None:
        kl_control = AdaptiveKLController(ppo.kl_coef, ppo.target_kl, ppo.kl_horizon)
    else:
        kl_control = FixedKLController(ppo.kl_coef)
    trained = {"policy": engines["policy"], "value": engines["value"]}
    state = worker.restore(trained)
    if state is not None:
        kl_control.value = float(state["kl_coef"])
    start = worker.resumed_from_step or 0
    worker.start_progress(ppo.steps)
    batches = BatchPlan(len(prompts), ppo.rollout_batch_size, worker.world_size, spec.seed)
    with worker.timed("rollout_engine_init"):
        rollouts = make_engine(
            ppo.rollout,
            f"{FIELD}.rollout",
            model_uri=policy_source(worker.job)[0],
            tokenizer=tokenizer,
            module=engines["policy"].module,
            device=device,
            zero_stage=spec.parallelism.zero_stage,
            precision=spec.parallelism.precision,
            max_model_len=ppo.max_prompt_len + ppo.generation.max_new_tokens,
            seed=spec.seed,
            rank=worker.rank,
            world_size=worker.world_size,
        )
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, ppo.steps):
            worker.sampling_seed(step)
            texts = prompts[batches.rows(step, worker.rank)][ppo.prompts.prompt_field]
            with worker.timed("rollout"):
                rollouts.load_weights(engines["policy"])  # vllm: this step's policy weights
                samples = rollouts.generate(
                    prompt_ids(tokenizer, texts, ppo.max_prompt_len), Sampling.of(ppo.generation)
                )
                rollouts.sleep()  # vllm on GPU: free its KV cache while the policy trains
                rollout = score(samples, engines, scorer, ppo, kl_control.value)
            with worker.timed("update"):
                policy_loss, value_loss, clip_fraction, approx_kl = update(
                    rollout, engines, ppo, mini_batch
                )
            reward_mean, kl, policy_loss, value_loss, clip_fraction, approx_kl, entropy = all_mean(
                [
                    rollout.scores.mean().item(),
                    rollout.kl.mean().item(),
                    policy_loss,
                    value_loss,
                    clip_fraction,
                    approx_kl,
                    rollout.entropy,
                ]
            )
            metrics = {
                "reward_mean": reward_mean,
                "kl": kl,
                "policy_loss": policy_loss,
                "value_loss": value_loss,
                "clip_fraction": clip_fraction,
                "approx_kl": approx_kl,
                "entropy": entropy,
                "kl_coef": kl_control.value,
                "learning_rate": engines["policy"].get_lr()[0],
            }
            kl_control.update(kl, ppo.rollout_batch_size)
            done = step + 1
            worker.log(done, metrics)
            if done < ppo.steps and done % ppo.checkpoint_every_steps == 0:
                worker.save_checkpoint(done, trained, metrics, {"kl_coef": kl_control.value})
    with worker.timed("save"):
        ds.save_pretrained(
            engines["policy"],
            engines["policy"].module,
            tokenizer,
            worker.artifact.path("model"),
            worker.rank,
            spec.parallelism.zero_stage,
        )
        if worker.is_main:
            worker.artifact.publish("model")
    worker.finish(metrics, steps_run=ppo.steps - start, total_steps=ppo.steps)
