"""Per-token advantages of every RL algorithm (`spec.stages.ppo.algorithm`) from a rollout's
sequence scores, per-token KL and (PPO only) values: the one place where the algorithms differ
before the shared clipped policy loss.

Kept apart from ppo.py so that rollout, scoring, KL and checkpointing stay shared and this
module stays pure (no engines; cross-rank sums come in as a `reduce` callable). Rollouts of one
prompt's group must be adjacent in the batch (ppo.py repeats each prompt `samplesPerPrompt`
times in a row), and a group never spans ranks.

Checked against OpenRLHF `experience_maker.py` (advantage_estimator group_norm / rloo /
reinforce, global advantage normalisation) and TRL `grpo_trainer.py` / `rloo_trainer.py`
(GRPO's k3 KL loss term; RLOO subtracts `beta * sequence KL` from the reward before the
leave-one-out baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch

from rlhf_trainer.losses import (
    group_normalized_advantages,
    leave_one_out_advantages,
    masked_sum,
    masked_whiten,
    reinforce_returns,
)

if TYPE_CHECKING:
    from rlhf_operator.api.spec import PPOStage

Reduce = Callable[[Sequence[float]], list[float]]
"""Element-wise sum over the data-parallel ranks (worker.all_sum); the identity on one rank."""
_WHITEN_EPS = 1e-8

CriticFree = Literal["grpo", "rloo", "reinforce_pp"]
KLIn = Literal["loss", "reward"]


@torch.no_grad()
def critic_free_advantages(
    algorithm: CriticFree,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
    group_size: int,
    gamma: float = 1.0,
    kl_in: KLIn = "loss",
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """``[B, T]`` advantages, zero off the response.

    - grpo: group-normalised scores on every response token; with ``kl_in == "reward"`` the
      sequence KL (times ``kl_coef``) is taken off the score first, else the KL is a loss term
      (``losses.kl_loss``, GRPO's default) and the scores are used as they are.
    - rloo: leave-one-out baseline of ``score - kl_coef * sequence KL`` (OpenRLHF puts RLOO's KL
      in the reward), on every response token.
    - reinforce_pp: token rewards ``-kl_coef * kl`` plus the score on the last token, returns to
      go, whitened over the response tokens of the *global* batch (``reduce`` sums the
      statistics over ranks; REINFORCE++'s batch normalisation, as OpenRLHF).
    """
    from rlhf_trainer.stages.ppo import token_rewards

    weights = mask.to(kl.dtype)
    if algorithm == "reinforce_pp":
        returns = reinforce_returns(token_rewards(scores, kl, mask, kl_coef), mask, gamma)
        return global_whiten(returns, mask, reduce or list)
    penalised = scores.to(kl.dtype)
    if algorithm == "rloo" or kl_in == "reward":
        penalised = penalised - kl_coef * masked_sum(kl, mask, dim=1)
    if algorithm == "grpo":
        per_sequence = group_normalized_advantages(penalised, group_size)
    elif algorithm == "rloo":
        per_sequence = leave_one_out_advantages(penalised, group_size)
    else:
        raise ValueError(f"unknown critic-free algorithm {algorithm!r}")
    return per_sequence.unsqueeze(1) * weights


@torch.no_grad()
def global_whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """``(x - mean) / std`` over the masked positions of every rank's batch together: the token
    count, sum and sum of squares are summed with ``reduce`` (one all-reduce), so the result is
    the same however the rollouts are split over ranks. Variance is the biased one, floored at
    1e-8 (OpenRLHF's global advantage normalisation). Masked-out positions become 0."""
    weights = mask.to(x.dtype)
    local = [weights.sum().item(), (x * weights).sum().item(), (x * x * weights).sum().item()]
    count, total, squares = reduce(local)
    count = max(count, 1.0)
    mean = total / count
    variance = max(squares / count - mean * mean, _WHITEN_EPS)
    return (x - mean) * variance**-0.5 * weights


@torch.no_grad()
def advantages_and_returns(
    ppo: PPOStage,
    scores: torch.Tensor,
    kl: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    values: torch.Tensor | None = None,
    reduce: Reduce | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(advantages, returns)`` of a scored rollout for `ppo.algorithm`; returns (the value
    targets) only for PPO. PPO: the score on the last token and ``-kl_coef * kl`` per token,
    GAE, advantages whitened over the worker's batch. Critic-free: `critic_free_advantages`,
    with the KL in the reward unless GRPO puts it in the loss (`kl_placement`)."""
    from rlhf_trainer.losses import gae
    from rlhf_trainer.stages.ppo import token_rewards

    if ppo.has_critic:
        rewards = token_rewards(scores, kl, mask, kl_coef)
        advantages, returns = gae(rewards, values, mask, ppo.gamma, ppo.gae_lambda)
        return masked_whiten(advantages, mask), returns
    kl_in = ppo.kl_placement
    advantages = critic_free_advantages(
        ppo.algorithm,
        scores,
        kl,
        mask,
        kl_coef=0.0 if kl_in == "loss" else kl_coef,
        group_size=ppo.samples_per_prompt,
        gamma=ppo.gamma,
        kl_in=kl_in,
        reduce=reduce,
    )
    return advantages, None
