"""The RL stage (`spec.stages.ppo`), colocated DeepSpeed-Chat style: every worker holds the
policy (trained), the reference and reward model (frozen engines) and, for `algorithm: ppo`
only, the value model (trained). Critic-free algorithms (grpo, rloo, reinforce_pp) never build,
load or checkpoint a value model.

Per iteration each worker takes its share of `rolloutBatchSize` prompts and
  1. samples `samplesPerPrompt` responses per prompt from the policy (a group, adjacent);
  2. scores them: policy and reference log-probabilities, values (ppo), the reward model's score;
  3. advantages per algorithm (stages/advantages.py): ppo: per-token reward -kl_coef * KL (k1)
     plus the score on the last token, GAE (whitened) and returns; grpo/rloo: group baselines;
     reinforce_pp: returns to go whitened over the global batch;
  4. runs `ppoEpochs` passes of clipped policy (and value) updates over minibatches, plus
     GRPO's k3 KL loss term when the KL is in the loss; DeepSpeed averages the gradients.
The KL coefficient is fixed, or adaptive towards `targetKL` (Ziegler et al. 2019).
Policy init and reference: the SFT model; reward model and value init: the reward model. A
pretrained classifier that cannot start a value model (another vocabulary, an encoder, several
labels; reward_model.py) leaves the value model to start from the SFT policy's backbone with a
fresh scalar head.
Writes the PPO policy to `<artifact>/model/`. Metrics: reward_mean (reward-model score of the
iteration's rollouts), kl (per-sequence KL, summed over response tokens), policy_loss,
value_loss, clip_fraction, approx_kl (k2 KL between the rollout policy and the updated one,
mean over minibatches), entropy (of the tempered policy on response tokens), eos_fraction
(responses that ended with EOS; `missingEosPenalty` is subtracted from the others' scores before
the KL and advantages, reward_mean stays the reward model's own score), kl_coef, learning_rate
(value_loss only for ppo). Log-probs are scored with the sampling temperature
(models.token_logprobs).
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
    from rlhf_trainer.stages.advantages import Reduce

FIELD = "spec.stages.ppo"
PROMPTS_FIELD = f"{FIELD}.prompts"


def prompt_split(job: RLHFJob) -> Split:
    """PPO trains on the prompts' train part; the held-out part is evaluation's default."""
    prompts = job.spec.stages.ppo.prompts
    columns = {"promptField": prompts.prompt_field}
    return load_split(prompts, PROMPTS_FIELD, columns, job.spec.seed, job.spec.storage)


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


def ended_with_eos(samples: Samples, eos_id: int | None) -> torch.Tensor:
    """[B] True where the response ends with EOS (generation.py cuts a response after its first
    EOS, so EOS is its last token or absent)."""
    ended = [bool(r) and r[-1] == eos_id for r in samples.responses]
    return torch.tensor(ended, dtype=torch.bool, device=samples.input_ids.device)


def eos_penalised(
    scores: torch.Tensor, samples: Samples, eos_id: int | None, penalty: float | None
) -> torch.Tensor:
    """`scores` less `penalty` for every response that never emitted EOS (cut at maxNewTokens),
    as TRL's `missing_eos_penalty`: the reward model was trained on complete responses and reads
    a cut one at a token it never scored in training. None: no penalty (TRL's default)."""
    if penalty is None or eos_id is None:
        return scores
    return scores - penalty * (~ended_with_eos(samples, eos_id)).to(scores.dtype)


@dataclass
class Rollout:
    """One worker's scored rollouts (everything PPO's update needs), `[B, T-1]` per token."""

    samples: Samples
    logprobs: torch.Tensor
    reference: torch.Tensor
    """The frozen reference's log-probs (GRPO's KL loss term)."""
    values: torch.Tensor | None
    """None without a value model (critic-free), as `returns`."""
    advantages: torch.Tensor
    returns: torch.Tensor | None
    scores: torch.Tensor
    """[B] reward-model score of each sequence."""
    kl: torch.Tensor
    """[B] KL(policy || reference) of each sequence, summed over its response tokens."""
    entropy: float
    """Mean entropy of the policy's (tempered) next-token distribution on response tokens."""
    eos_fraction: float = float("nan")
    """Fraction of responses that ended with EOS (the rest were cut at maxNewTokens)."""


@torch.no_grad()
def forward_passes(samples: Samples, engines: dict[str, Any], reward: RewardScorer, temperature):
    """(policy log-probs, policy entropy, reference log-probs, values) `[B, T-1]` and reward
    scores `[B]` of one micro-batch."""
    from rlhf_trainer.models import token_entropy, token_logprobs

    ids, attention = samples.input_ids, samples.attention_mask
    policy_logits = engines["policy"](input_ids=ids, attention_mask=attention).logits
    logprobs = token_logprobs(policy_logits, ids, temperature)
    entropy = token_entropy(policy_logits, temperature)
    del policy_logits
    reference = token_logprobs(
        engines["reference"](input_ids=ids, attention_mask=attention).logits, ids, temperature
    )
    values = None  # critic-free algorithms have no value model
    if "value" in engines:
        values = engines["value"](input_ids=ids, attention_mask=attention)[:, :-1]
    return logprobs, entropy, reference, values, reward(ids, attention)


@torch.no_grad()
def score(
    samples: Samples,
    engines: dict[str, Any],
    reward: RewardScorer,
    ppo: PPOStage,
    kl_coef: float,
    eos_id: int | None = None,
    reduce: Reduce | None = None,
) -> Rollout:
    """Score a batch of samples. `eos_id`: the policy's EOS, for `missingEosPenalty`; `reduce`:
    sums over all workers (REINFORCE++ whitens over the global batch)."""
    from rlhf_trainer.generation import chunks
    from rlhf_trainer.losses import kl_penalty, masked_mean, masked_sum
    from rlhf_trainer.stages.advantages import advantages_and_returns

    actions = samples.action_mask
    # `rolloutMicroBatchSize` sequences per forward pass: the [B, T, vocab] logits are the
    # largest tensor of a rollout; only the per-token results of all passes are kept.
    passes = [
        forward_passes(samples.part(rows), engines, reward, ppo.generation.temperature)
        for rows in chunks(samples.input_ids.shape[0], ppo.rollout_micro_batch_size)
    ]
    logprobs, entropy, reference, values, raw_scores = (
        None if parts[0] is None else torch.cat(parts) for parts in zip(*passes, strict=True)
    )
    entropy = masked_mean(entropy, actions)
    scores = eos_penalised(raw_scores, samples, eos_id, ppo.missing_eos_penalty)
    kl = kl_penalty(logprobs, reference, "k1")
    advantages, returns = advantages_and_returns(ppo, scores, kl, actions, kl_coef, values, reduce)
    return Rollout(
        samples=samples,
        logprobs=logprobs,
        reference=reference,
        values=values,
        advantages=advantages,
        returns=returns,
        scores=raw_scores,
        kl=masked_sum(kl, actions, dim=1),
        eos_fraction=ended_with_eos(samples, eos_id).float().mean().item(),
        entropy=entropy.item(),
    )


def update(
    rollout: Rollout, engines: dict[str, Any], ppo: PPOStage, mini_batch: int, kl_coef: float
) -> dict[str, float]:
    """`ppoEpochs` passes of clipped policy (and, with a critic, value) updates; the means of
    policy_loss, value_loss (ppo), clip_fraction, approx_kl over the minibatches. With the KL
    in the loss (GRPO), `kl_coef` times the k3 KL to the reference joins the policy loss."""
    from rlhf_trainer.losses import kl_loss, policy_loss, value_loss
    from rlhf_trainer.models import token_logprobs

    policy, value = engines["policy"], engines.get("value")
    kl_in_loss = ppo.kl_placement == "loss"
    samples = rollout.samples
    count = samples.input_ids.shape[0]
    totals = dict.fromkeys(("policy_loss", "clip_fraction", "approx_kl"), 0.0)
    if value is not None:
        totals["value_loss"] = 0.0
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
            if kl_in_loss:
                loss = loss + kl_coef * kl_loss(logprobs, rollout.reference[idx], actions)
            policy.backward(loss)
            policy.step()
            totals["policy_loss"] += loss.item()
            totals["clip_fraction"] += clipped.item()
            totals["approx_kl"] += approx_kl.item()
            if value is not None:
                values = value(input_ids=ids, attention_mask=attention)[:, :-1]
                v_loss = value_loss(
                    values, rollout.values[idx], rollout.returns[idx], actions, ppo.value_clip
                )
                value.backward(ppo.value_coef * v_loss)
                value.step()
                totals["value_loss"] += v_loss.item()
            passes += 1
    return {name: total / max(passes, 1) for name, total in totals.items()}


@dataclass
class Models:
    """The RL stage's models (PPO's four; three for critic-free algorithms) and their DeepSpeed
    engines (under ZeRO-3: partitioned as built).

    With LoRA (`spec.parallelism.lora`) the reference "engine" is the policy engine with its
    adapters off (lora.AdaptersOff): one copy of the base weights serves both."""

    tokenizer: Any
    """The policy's."""
    reward_tokenizer: Any | None
    """The reward model's own, when its vocabulary differs (reward_model.py)."""
    plans: dict[str, Any]
    modules: dict[str, torch.nn.Module]
    engines: dict[str, Any]


def load_models(worker: Any, mini_batch: int) -> Models:
    """Policy and reference from the SFT model; reward model; for ppo only, the value model from
    the reward model when it can start one, else from the SFT model with a fresh scalar head
    (logged). Critic-free algorithms load no value model at all (the memory is the point).

    Each model is loaded in the spec's precision and handed to its DeepSpeed engine before the
    next one is loaded, so a worker's host memory never holds more than one model it does not
    need (four fp32 copies of a 6B model would be ~96 GB)."""
    from rlhf_trainer import lora as peft_lora
    from rlhf_trainer.models import (
        disable_dropout,
        hidden_size,
        load_causal_lm,
        load_scalar_model,
        load_tokenizer,
        model_revision,
        tokenizer_source,
    )
    from rlhf_trainer.reward_model import (
        load_reward_head,
        load_reward_tokenizer,
        value_init_problem,
    )
    from rlhf_trainer.worker import logger

    spec = worker.job.spec
    ppo = spec.stages.ppo
    lora = spec.parallelism.lora
    policy_uri, policy_field = policy_source(worker.job)
    reward_uri, reward_field = reward_source(worker.job)
    plans: dict[str, Any] = {}
    modules: dict[str, torch.nn.Module] = {}
    engines: dict[str, Any] = {}

    def revision(uri: str) -> str | None:  # spec.model.revision where the base is loaded
        return model_revision(worker.job, uri)

    def load(name: str, uri: str, field: str, build, learning_rate: float | None = None) -> None:
        """Plan, build and wrap one model (`build(dtype)` loads it); no learning rate: frozen."""
        plans[name], modules[name], engines[name] = worker.engine(
            hidden_size(uri, field, revision(uri)),
            build,
            micro_batch=mini_batch,
            learning_rate=learning_rate,
        )

    with worker.timed("model_load"):
        tokenizer = load_tokenizer(*tokenizer_source(worker.job, policy_uri, policy_field))
        reward_tokenizer = load_reward_tokenizer(reward_uri, reward_field, tokenizer)
    load(
        "reward",
        reward_uri,
        reward_field,
        lambda dtype: load_reward_head(
            reward_uri, reward_field, spec.stages.reward.positive_label, dtype
        ),
    )
    if ppo.has_critic:
        problem = value_init_problem(modules["reward"], reward_tokenizer is not None, reward_uri)
        value_uri, value_field = (
            (reward_uri, reward_field) if problem is None else policy_source(worker.job)
        )
        if problem is not None and worker.is_main:
            logger.warning(
                "ppo: the value model starts from %s with a fresh scalar head: %s",
                value_field,
                problem,
            )

        def value_model(dtype):
            model = load_scalar_model(
                value_uri, value_field, tokenizer.pad_token_id, revision(value_uri), dtype
            )
            disable_dropout(model)
            if lora is not None:
                peft_lora.add_value_adapters(model, lora, spec.seed, value_field)
            return model

        value_rate = ppo.value_learning_rate or ppo.learning_rate
        load("value", value_uri, value_field, value_model, value_rate)

    def policy_model(dtype):
        model = load_causal_lm(policy_uri, policy_field, revision(policy_uri), dtype=dtype)
        disable_dropout(model)
        if lora is not None:
            model = peft_lora.add_policy_adapters(model, lora, spec.seed, policy_field)
        return model

    load("policy", policy_uri, policy_field, policy_model, ppo.learning_rate)
    if lora is not None:
        engines["reference"] = peft_lora.AdaptersOff(engines["policy"])
        if worker.is_main:
            logger.info(
                "ppo: LoRA rank %d trains %.2f%% of the policy's parameters; the reference is "
                "the policy with its adapters off",
                lora.rank,
                100 * peft_lora.trainable_fraction(modules["policy"]),
            )
    else:
        load(
            "reference",
            policy_uri,
            policy_field,
            lambda dtype: load_causal_lm(
                policy_uri, policy_field, revision(policy_uri), dtype=dtype
            ),
        )
    return Models(tokenizer, reward_tokenizer, plans, modules, engines)


def train_loop(config: dict[str, Any]) -> None:
    from rlhf_trainer.batches import BatchPlan, prompt_ids
    from rlhf_trainer.losses import AdaptiveKLController, FixedKLController
    from rlhf_trainer.reward_model import RewardScorer, max_length
    from rlhf_trainer.rollout import Sampling, make_engine
    from rlhf_trainer.worker import StageWorker, all_mean, all_sum

    worker = StageWorker.start(config)
    spec = worker.job.spec
    ppo = spec.stages.ppo
    with worker.timed("data"):
        prompts = prompt_split(worker.job).train
    group = ppo.samples_per_prompt
    per_worker = ppo.rollout_batch_size // worker.world_size * group
    mini_batch = min(ppo.mini_batch_size or per_worker, per_worker)
    models = load_models(worker, mini_batch)  # times model_load and deepspeed_init
    tokenizer, reward_tokenizer = models.tokenizer, models.reward_tokenizer
    engines = models.engines
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
    trained = {name: engines[name] for name in ("policy", "value") if name in engines}
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
            micro_batch=ppo.rollout_micro_batch_size,
            gather_once=True,
        )
    metrics: dict[str, float] = {}
    with worker.timed("train"):
        for step in range(start, ppo.steps):
            worker.sampling_seed(step)
            texts = prompts[batches.rows(step, worker.rank)][ppo.prompts.prompt_field]
            texts = [text for text in texts for _ in range(group)]  # each group adjacent
            with worker.timed("rollout"):
                # hf: ZeRO-3 gathers the policy once for the rollout (engine.generation_model);
                # vllm: this step's policy weights are copied into the engine.
                rollouts.load_weights(engines["policy"])
                samples = rollouts.generate(
                    prompt_ids(tokenizer, texts, ppo.max_prompt_len, ppo.prompts.truncation_side),
                    Sampling.of(ppo.generation),
                )
                rollouts.sleep()  # vllm on GPU: free its KV cache while the policy trains
                rollout = score(
                    samples, engines, scorer, ppo, kl_control.value, tokenizer.eos_token_id, all_sum
                )
            with worker.timed("update"):
                losses = update(rollout, engines, ppo, mini_batch, kl_control.value)
            local = {
                "reward_mean": rollout.scores.mean().item(),
                "kl": rollout.kl.mean().item(),
                **losses,
                "entropy": rollout.entropy,
                "eos_fraction": rollout.eos_fraction,
            }
            metrics = dict(zip(local, all_mean(list(local.values())), strict=True))
            metrics["kl_coef"] = kl_control.value
            metrics["learning_rate"] = engines["policy"].get_lr()[0]
            kl = metrics["kl"]
            kl_control.update(kl, ppo.rollout_batch_size * group)
            done = step + 1
            worker.log(done, metrics)
            if done < ppo.steps and done % ppo.checkpoint_every_steps == 0:
                worker.save_checkpoint(done, trained, metrics, {"kl_coef": kl_control.value})
    worker.save_model(engines["policy"], tokenizer)
    worker.finish(metrics, steps_run=ppo.steps - start, total_steps=ppo.steps)
