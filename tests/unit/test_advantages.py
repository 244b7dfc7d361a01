"""Critic-free advantages on tiny hand-checked rollouts (two prompts x two samples)."""

from __future__ import annotations

import math

import torch
from rlhf_operator.api.spec import PPOStage
from rlhf_trainer.stages.advantages import (
    advantages_and_returns,
    critic_free_advantages,
    global_whiten,
)

SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])
KL = torch.tensor([[0.5, 0.5], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
MASK = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]])


def close(actual, expected) -> None:
    torch.testing.assert_close(
        actual.double(), torch.as_tensor(expected).double(), atol=1e-6, rtol=0
    )


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
    z = (values - values.mean()) / values.var(unbiased=False).sqrt()  # OpenRLHF: biased
    close(adv, [[z[0], z[1]], [z[2], z[3]], [z[4], 0.0], [z[5], 0.0]])


def test_reinforce_pp_whitens_over_the_global_batch_not_the_ranks_share() -> None:
    """Two ranks holding half the batch each, summing their statistics (the all-reduce), get
    the advantages one rank holding the whole batch gets; local whitening would not."""
    whole = critic_free_advantages("reinforce_pp", SCORES, KL, MASK, kl_coef=1.0, group_size=2)
    shards = [slice(0, 2), slice(2, 4)]
    sent: list[list[float]] = []

    def advantages(part, reduce):
        return critic_free_advantages(
            "reinforce_pp", SCORES[part], KL[part], MASK[part], kl_coef=1.0, group_size=2,
            reduce=reduce,
        )  # fmt: skip

    for part in shards:  # what each rank contributes to the all-reduce
        advantages(part, lambda local: sent.append(local) or local)

    def all_sum(local):
        return [sum(column) for column in zip(*sent, strict=True)]

    per_rank = [advantages(part, all_sum) for part in shards]
    close(torch.cat(per_rank), whole)
    alone = advantages(shards[1], None)  # one rank's statistics only
    assert not torch.allclose(alone, whole[2:])


def test_global_whiten_ignores_padding_and_floors_the_variance() -> None:
    x = torch.tensor([[2.0, 2.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    close(global_whiten(x, mask, list), [[0.0, 0.0, 0.0]])


def test_ppo_uses_gae_and_value_targets_critic_free_algorithms_do_not() -> None:
    values = torch.zeros(4, 2)
    ppo = PPOStage(algorithm="ppo", lam=1.0)
    advantages, returns = advantages_and_returns(ppo, SCORES, KL, MASK, 1.0, values)
    # values 0, gamma = lam = 1: returns are the returns to go of the token rewards
    close(returns, [[0.0, 0.5], [3.0, 3.0], [1.0, 0.0], [2.0, 0.0]])
    assert advantages.shape == (4, 2)
    grpo = PPOStage(algorithm="grpo", samples_per_prompt=2)
    advantages, returns = advantages_and_returns(grpo, SCORES, KL, MASK, 1.0)
    assert returns is None
    close(advantages, critic_free_advantages("grpo", SCORES, KL, MASK, kl_coef=1.0, group_size=2))
    rloo = PPOStage(algorithm="rloo", samples_per_prompt=2)
    advantages, _ = advantages_and_returns(rloo, SCORES, KL, MASK, 1.0)
    close(advantages, [[-3.0, -3.0], [3.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
