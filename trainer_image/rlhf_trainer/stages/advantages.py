"""Per-token advantages of the critic-free algorithms (GRPO, RLOO, REINFORCE++), from a
rollout's sequence scores and per-token KL: the one place where they differ from PPO's GAE.

Kept apart from ppo.py so that rollout, scoring, KL and checkpointing stay shared and this
module stays pure (no engines). Rollouts of one prompt's group must be adjacent in the batch.
"""

from __future__ import annotations

from typing import Literal

import torch

from rlhf_trainer.losses import (
    group_normalized_advantages,
    leave_one_out_advantages,
    masked_sum,
    masked_whiten,
    reinforce_returns,
)

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
) -> torch.Tensor:
    """``[B, T]`` advantages, zero off the response.

    - grpo: group-normalised scores on every response token; with ``kl_in == "reward"`` the
      sequence KL (times ``kl_coef``) is taken off the score first, else the KL is a loss term
      (``losses.kl_loss``, GRPO's default) and the scores are used as they are.
    - rloo: leave-one-out baseline of ``score - kl_coef * sequence KL`` (OpenRLHF puts RLOO's KL
      in the reward), on every response token.
    - reinforce_pp: token rewards ``-kl_coef * kl`` plus the score on the last token, returns to
      go, whitened over the batch's response tokens (REINFORCE++; this is the worker's batch).
    """
    from rlhf_trainer.stages.ppo import token_rewards

    weights = mask.to(kl.dtype)
    if algorithm == "reinforce_pp":
        returns = reinforce_returns(token_rewards(scores, kl, mask, kl_coef), mask, gamma)
        return masked_whiten(returns, mask) * weights
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
