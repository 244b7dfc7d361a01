"""Critic-free advantages on tiny hand-checked rollouts (two prompts x two samples)."""

from __future__ import annotations

import math

import torch
from rlhf_trainer.stages.advantages import critic_free_advantages

SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])
KL = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
MASK = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])


def close(actual, expected) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected).double(), atol=1e-6, rtol=0)


def test_grpo_kl_in_loss_uses_raw_scores() -> None:
    adv = critic_free_advantages("grpo", SCORES, KL, MASK, kl_coef=1.0, group_size=2)
    s = 1 / (math.sqrt(2) + 1e-4)
    close(adv, [[-s, -s], [s, s], [0.0, 0.0], [0.0, 0.0]])


def test_grpo_kl_in_reward_penalises_before_normalising() -> None:
    # penalised scores: [1-1, 3-0, 2-1, 2-0] = [0, 3, 1, 2]; groups (0,3) and (1,2)
    adv = critic_free_advantages(
        "grpo", SCORES, KL, MASK, kl_coef=1.0, group_size=2, kl_in="reward"
    )
    a, b = 1.5 / (1.5 * math.sqrt(2) + 1e-4), 0.5 / (0.5 * math.sqrt(2) + 1e-4)
    close(adv, [[-a, -a], [a, a], [-b, 0.0], [b, 0.0]])


def test_rloo_leave_one_out_of_penalised_scores() -> None:
    # penalised [0, 3, 1, 2]: k=2, so A_i = r_i - r_other
    adv = critic_free_advantages("rloo", SCORES, KL, MASK, kl_coef=1.0, group_size=2)
    close(adv, [[-3.0, -3.0], [3.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])


def test_reinforce_pp_whitened_returns() -> None:
    # token rewards (kl_coef 1): [[-0.5, 0.5], [0, 3], [1, 0], [2, 0]] -> returns to go (gamma 1)
    # [[0, 0.5], [3, 3], [1, -], [2, -]]; whitened over the 6 response tokens
    adv = critic_free_advantages("reinforce_pp", SCORES, KL, MASK, kl_coef=1.0, group_size=2)
    values = torch.tensor([0.0, 0.5, 3.0, 3.0, 1.0, 2.0])
    z = (values - values.mean()) / (values.var() + 1e-8).sqrt()
    close(adv, [[z[0], z[1]], [z[2], z[3]], [z[4], 0.0], [z[5], 0.0]])
