"""Losses on tiny tensors whose expected values are worked out by hand in each test."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from rlhf_trainer.losses import (
    AdaptiveKLController,
    FixedKLController,
    dpo_loss,
    gae,
    group_normalized_advantages,
    kl_loss,
    kl_penalty,
    leave_one_out_advantages,
    masked_lm_loss,
    masked_mean,
    masked_whiten,
    pairwise_loss,
    policy_loss,
    reinforce_returns,
    value_loss,
)

LN = math.log


def close(actual: torch.Tensor | float, expected: float | list, atol: float = 1e-6) -> None:
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def test_module_imports_no_heavy_frameworks() -> None:
    code = (
        "import sys, rlhf_trainer.losses\n"
        "heavy = [m for m in ('ray', 'deepspeed', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


class TestMaskedMean:
    def test_counts_only_masked_tokens(self) -> None:
        x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        mask = torch.tensor([[1, 0], [1, 1]])
        close(masked_mean(x, mask), (1 + 3 + 4) / 3)
        close(masked_mean(x, mask, dim=1), [1.0, 3.5])

    def test_empty_mask_is_zero_not_nan(self) -> None:
        close(masked_mean(torch.tensor([5.0, 7.0]), torch.tensor([0, 0])), 0.0)

    def test_nan_under_mask_does_not_leak_into_value_or_gradient(self) -> None:
        x = torch.tensor([2.0, float("nan"), 4.0], requires_grad=True)
        mask = torch.tensor([True, False, True])
        result = masked_mean(x, mask)
        result.backward()
        close(result, 3.0)
        close(x.grad, [0.5, 0.0, 0.5])

    def test_shard_means_average_to_global_mean_when_token_counts_match(self) -> None:
        x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 6.0]])
        mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
        per_rank = [masked_mean(x[i : i + 1], mask[i : i + 1]) for i in range(2)]
        close(sum(per_rank) / 2, masked_mean(x, mask).item())
        close(masked_mean(x, mask), (1 + 2 + 3 + 6) / 4)


class TestMaskedWhiten:
    def test_zero_mean_unit_variance_over_masked_tokens(self) -> None:
        # mean of [1, 2, 3] is 2, Bessel variance (1 + 0 + 1) / 2 = 1; 100 is padding.
        x = torch.tensor([1.0, 2.0, 3.0, 100.0])
        mask = torch.tensor([1, 1, 1, 0])
        close(masked_whiten(x, mask), [-1.0, 0.0, 1.0, 0.0], atol=1e-6)

    def test_shift_mean_false_keeps_the_mean(self) -> None:
        # x = [0, 4]: mean 2, Bessel variance 8, std 2*sqrt(2): (x - 2)/std + 2.
        x = torch.tensor([0.0, 4.0, -50.0])
        mask = torch.tensor([1, 1, 0])
        s = 1 / math.sqrt(2)
        close(masked_whiten(x, mask, shift_mean=False), [2 - s, 2 + s, 0.0], atol=1e-6)


class TestMaskedLMLoss:
    def setup_method(self) -> None:
        # vocab 3, sequence [0, 1, 2]: logits[0] predicts labels[1]=1, logits[1] predicts
        # labels[2]=2, logits[2] predicts nothing (garbage on purpose).
        self.logits = torch.tensor(
            [[[0.0, 0.0, 0.0], [LN(2), 0.0, 0.0], [50.0, -50.0, 9.0]]], requires_grad=True
        )
        self.labels = torch.tensor([[0, 1, 2]])

    def test_averages_shifted_cross_entropy_over_response_tokens(self) -> None:
        # token 1: uniform over 3 -> log 3; token 2: p = 1 / (2 + 1 + 1) -> log 4.
        loss = masked_lm_loss(self.logits, self.labels, torch.tensor([[0, 1, 1]]))
        close(loss, (LN(3) + LN(4)) / 2)

    def test_prompt_tokens_are_not_targets(self) -> None:
        loss = masked_lm_loss(self.logits, self.labels, torch.tensor([[1, 0, 1]]))
        close(loss, LN(4))
        loss.backward()
        # Only the position predicting the response token gets gradient:
        # d/dlogits CE = softmax - onehot = [1/2, 1/4, 1/4] - [0, 0, 1].
        close(self.logits.grad[0, 0], [0.0, 0.0, 0.0])
        close(self.logits.grad[0, 1], [0.5, 0.25, -0.75])
        close(self.logits.grad[0, 2], [0.0, 0.0, 0.0])

    def test_ignore_index_labels_under_the_mask_are_harmless(self) -> None:
        labels = torch.tensor([[-100, 1, -100]])
        loss = masked_lm_loss(self.logits, labels, torch.tensor([[0, 1, 0]]))
        close(loss, LN(3))


class TestPairwiseLoss:
    def test_bradley_terry_value(self) -> None:
        chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
        # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2.
        close(pairwise_loss(chosen, rejected), (LN(1 + math.exp(-1)) + LN(2)) / 2)

    def test_invariant_to_a_constant_reward_offset(self) -> None:
        chosen, rejected = torch.tensor([0.3, -1.2]), torch.tensor([0.1, 0.4])
        close(pairwise_loss(chosen + 7, rejected + 7), pairwise_loss(chosen, rejected).item())

    def test_large_margins_stay_finite(self) -> None:
        close(pairwise_loss(torch.tensor([0.0]), torch.tensor([200.0])), 200.0, atol=1e-4)
        close(pairwise_loss(torch.tensor([200.0]), torch.tensor([0.0])), 0.0)


class TestPolicyLoss:
    def test_clipping_on_both_sides(self) -> None:
        eps = 0.2
        ratios = [1.5, 0.5, 0.5, 1.5, 3.0]
        advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0, 100.0]])
        mask = torch.tensor([[1, 1, 1, 1, 0]])
        old = torch.zeros(1, 5)
        logprobs = torch.tensor([[LN(r) for r in ratios]], requires_grad=True)
        loss, clip_fraction, approx_kl = policy_loss(logprobs, old, advantages, mask, eps)
        # max(-A r, -A clip(r)): A>0 r=1.5 -> -1.2 (clipped above); A<0 r=0.5 -> 0.8 (clipped
        # below); A>0 r=0.5 -> -0.5 and A<0 r=1.5 -> 1.5 (pessimistic side, unclipped).
        close(loss, (-1.2 + 0.8 - 0.5 + 1.5) / 4)
        close(clip_fraction, 2 / 4)
        close(approx_kl, 0.5 * (2 * LN(1.5) ** 2 + 2 * LN(0.5) ** 2) / 4, atol=1e-6)
        loss.backward()
        # d/dlogp (-A r)/4 = -A r / 4 on unclipped tokens; 0 where clipped or masked.
        close(logprobs.grad, [[0.0, 0.0, -0.5 / 4, 1.5 / 4, 0.0]])
        assert not clip_fraction.requires_grad and not approx_kl.requires_grad

    def test_on_policy_loss_is_minus_mean_advantage(self) -> None:
        logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
        advantages = torch.tensor([[0.5, -1.5, 4.0]])
        loss, clip_fraction, approx_kl = policy_loss(
            logprobs, logprobs.clone(), advantages, torch.ones(1, 3), 0.2
        )
        close(loss, -(0.5 - 1.5 + 4.0) / 3)
        close(clip_fraction, 0.0)
        close(approx_kl, 0.0)


class TestValueLoss:
    def test_clipping_on_both_sides(self) -> None:
        eps = 0.2
        old = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
        values = torch.tensor([[1.0, -1.0, 0.1, 50.0]])
        returns = torch.tensor([[1.0, 0.0, 1.0, -50.0]])
        mask = torch.tensor([[1, 1, 1, 0]])
        # token 1: v hits the return (0) but v_clip = 0.2 -> 0.64 counts;
        # token 2: v_clip = -0.2 -> 0.04 but unclipped 1.0 counts; token 3 in range: 0.81.
        close(value_loss(values, old, returns, mask, eps), 0.5 * (0.64 + 1.0 + 0.81) / 3)


class TestGAE:
    def test_matches_hand_unrolled_recursion_with_padded_tail(self) -> None:
        gamma, lam = 0.9, 0.8
        rewards = torch.tensor([[0.5, 1.0, 33.0]])
        values = torch.tensor([[0.2, 0.4, 77.0]])
        mask = torch.tensor([[1, 1, 0]])
        advantages, returns = gae(rewards, values, mask, gamma, lam)
        delta1 = 1.0 - 0.4  # last response token: nothing to bootstrap from
        delta0 = 0.5 + gamma * 0.4 - 0.2
        a1 = delta1
        a0 = delta0 + gamma * lam * a1
        close(advantages, [[a0, a1, 0.0]])
        close(returns, [[a0 + 0.2, a1 + 0.4, 0.0]])

    def test_gamma_lam_one_is_reward_to_go_minus_value(self) -> None:
        rewards = torch.tensor([[1.0, 2.0, 3.0]])
        values = torch.tensor([[0.5, 1.0, 1.5]])
        advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
        close(advantages, [[6 - 0.5, 5 - 1.0, 3 - 1.5]])
        close(returns, [[6.0, 5.0, 3.0]])

    def test_lam_zero_is_one_step_td(self) -> None:
        rewards = torch.tensor([[1.0, 2.0, 3.0]])
        values = torch.tensor([[0.5, 1.0, 1.5]])
        advantages, _ = gae(rewards, values, torch.ones(1, 3), 0.5, 0.0)
        close(advantages, [[1 + 0.5 * 1.0 - 0.5, 2 + 0.5 * 1.5 - 1.0, 3 - 1.5]])

    def test_rows_are_independent_of_how_the_batch_is_sharded(self) -> None:
        torch.manual_seed(0)
        rewards, values = torch.randn(4, 6), torch.randn(4, 6)
        mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 1 + [0] * 5, [1] * 5 + [0]])
        full_adv, full_ret = gae(rewards, values, mask, 0.99, 0.95)
        for shard in (slice(0, 1), slice(1, 3), slice(3, 4)):
            adv, ret = gae(rewards[shard], values[shard], mask[shard], 0.99, 0.95)
            close(adv, full_adv[shard].tolist())
            close(ret, full_ret[shard].tolist())


class TestKLPenalty:
    def test_estimators_on_one_token(self) -> None:
        logprobs, ref = torch.tensor([LN(0.5)]), torch.tensor([LN(0.25)])
        close(kl_penalty(logprobs, ref, "k1"), [LN(2)])
        close(kl_penalty(logprobs, ref, "k2"), [0.5 * LN(2) ** 2])
        close(kl_penalty(logprobs, ref, "k3"), [0.5 - 1 + LN(2)])

    def test_k1_and_k3_are_unbiased_and_k3_non_negative(self) -> None:
        # p = [0.5, 0.5], q = [0.25, 0.75]: E_p[k] over both tokens must equal KL(p || q).
        p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
        kl = 0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75)
        for estimator in ("k1", "k3"):
            close((p * kl_penalty(p.log(), q.log(), estimator)).sum(), kl)
        assert (kl_penalty(p.log(), q.log(), "k3") >= 0).all()
        assert (kl_penalty(p.log(), q.log(), "k2") >= 0).all()

    def test_unknown_estimator_names_the_choices(self) -> None:
        with pytest.raises(ValueError, match="k1, k2, k3"):
            kl_penalty(torch.zeros(1), torch.zeros(1), "k4")  # type: ignore[arg-type]


class TestKLControllers:
    def test_fixed_never_moves(self) -> None:
        controller = FixedKLController(0.05)
        controller.update(current_kl=100.0, n_steps=1000)
        assert controller.value == 0.05

    def test_adaptive_moves_towards_target_with_clipped_error(self) -> None:
        above = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
        above.update(current_kl=12.0, n_steps=100)  # error 1.0 clipped to 0.2
        close(above.value, 0.1 * (1 + 0.2 * 100 / 10000), atol=1e-12)
        below = AdaptiveKLController(0.1, 6.0, 10000)
        below.update(current_kl=3.0, n_steps=100)  # error -0.5 clipped to -0.2
        close(below.value, 0.1 * (1 - 0.2 * 100 / 10000), atol=1e-12)
        near = AdaptiveKLController(0.1, 6.0, 10000)
        near.update(current_kl=6.6, n_steps=100)  # error 0.1, unclipped
        close(near.value, 0.1 * (1 + 0.1 * 100 / 10000), atol=1e-12)
        assert below.value < 0.1 < near.value < above.value

    def test_adaptive_rejects_a_non_positive_target(self) -> None:
        with pytest.raises(ValueError, match="target"):
            AdaptiveKLController(0.1, 0.0, 10)


# --------------------------------------------------------------------------- critic-free, DPO


def test_group_normalized_advantages_by_hand() -> None:
    # group [1, 3]: mean 2, unbiased std sqrt(2) -> -+1/(sqrt(2)+1e-4); group [0, 0]: all zero
    adv = group_normalized_advantages(torch.tensor([1.0, 3.0, 0.0, 0.0]), 2)
    s = math.sqrt(2) + 1e-4
    close(adv, [-1 / s, 1 / s, 0.0, 0.0])


def test_group_normalized_advantages_group_of_three() -> None:
    # [0, 1, 5]: mean 2, var ((4 + 1 + 9) / 2) = 7
    adv = group_normalized_advantages(torch.tensor([0.0, 1.0, 5.0]), 3)
    s = math.sqrt(7) + 1e-4
    close(adv, [-2 / s, -1 / s, 3 / s])


def test_leave_one_out_advantages_by_hand() -> None:
    # [0, 1, 5]: baselines (1+5)/2=3, (0+5)/2=2.5, (0+1)/2=0.5
    close(leave_one_out_advantages(torch.tensor([0.0, 1.0, 5.0]), 3), [-3.0, -1.5, 4.5])


@pytest.mark.parametrize("fn", [group_normalized_advantages, leave_one_out_advantages])
def test_group_advantages_reject_bad_groups(fn) -> None:
    with pytest.raises(ValueError, match="groups of 2"):
        fn(torch.tensor([1.0, 2.0, 3.0]), 2)
    with pytest.raises(ValueError, match="groups of 1"):
        fn(torch.tensor([1.0, 2.0]), 1)


def test_reinforce_returns_by_hand() -> None:
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [0.5, -0.1, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # row 0: G2=1, G1=-0.2+0.5*1=0.3, G0=-0.1+0.5*0.3=0.05; row 1 (padded tail ignored):
    # G1=-0.1, G0=0.5-0.05=0.45
    close(reinforce_returns(rewards, mask, 0.5), [[0.05, 0.3, 1.0], [0.45, -0.1, 0.0]])


def test_kl_loss_is_k3_token_mean() -> None:
    logp = torch.tensor([[LN(0.5), LN(0.25), 0.0]], requires_grad=True)
    ref = torch.tensor([[LN(0.25), LN(0.5), 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: r = ref/p = 0.5 -> 0.5 - 1 - ln 0.5; token 1: r = 2 -> 2 - 1 - ln 2
    expected = ((0.5 - 1 - LN(0.5)) + (2 - 1 - LN(2))) / 2
    loss = kl_loss(logp, ref, mask)
    close(loss, expected)
    loss.backward()
    # d/dlogp (exp(ref - logp) - (ref - logp) - 1) = 1 - exp(ref - logp), halved by the mean
    close(logp.grad, [[(1 - 0.5) / 2, (1 - 2) / 2, 0.0]])


def test_dpo_sigmoid_and_ipo_by_hand() -> None:
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    # h = (pc - rc) - (pr - rr) = [1 - (-1), 0 - 1] = [2, -1]
    loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=0.5)
    close(loss, (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(0.5)))) / 2)
    close(chosen, [0.5, 0.0])
    close(rejected, [-0.5, 0.5])
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")
    close(ipo, ((2 - 1) ** 2 + (-1 - 1) ** 2) / 2)


def test_dpo_at_reference_is_log_two() -> None:
    x = torch.tensor([-4.0, -7.0])
    loss, _, _ = dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    close(loss, math.log(2))
