"""Losses and advantage estimation for SFT, reward modelling and PPO: pure torch functions.

No ray, deepspeed or transformers here: these are tested on tiny hand-checked tensors, and every
stage (and the benchmark) calls the same code. Conventions:

- Token tensors are ``[B, T]`` (batch, time); masks are ``[B, T]`` of bool or 0/1 floats, where
  1 marks a token that counts (a response token) and 0 marks prompt or padding.
- Reductions are *token means over the local micro-batch*. Under data parallelism DeepSpeed
  averages gradients over ranks, so the effective loss is the mean of per-rank means. That equals
  the token mean of the global batch exactly when every rank holds the same number of counted
  tokens (or pairs); each docstring says when that holds and what a caller must do otherwise.
  This is the same convention as TRL's and OpenRLHF's default loss reduction.

References: Ziegler et al. 2019 (adaptive KL), Schulman et al. 2016 (GAE) and 2017 (PPO),
Schulman 2020 "Approximating KL divergence" (k1/k2/k3), OpenRLHF ``models/loss.py`` and TRL
``trainer/utils.py`` (whitening, value clipping).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
# Bounds the proportional error of the adaptive KL controller (Ziegler et al. 2019, eq. 2).
ADAPTIVE_KL_ERROR_CLIP = 0.2
_WHITEN_EPS = 1e-8


def _as_weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(dtype=like.dtype, device=like.device)


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Sum of ``x`` over positions where ``mask`` is non-zero (weighted by ``mask``).

    Masked-out positions are excluded with ``where``, so a NaN/inf there (for instance the
    log-probability of a padding token) never leaks into the result or its gradient.
    Sums are additive across shards: all-reduce them to get the global figure.
    """
    weights = _as_weights(mask, x)
    contributions = torch.where(weights != 0, x * weights, torch.zeros_like(x))
    return contributions.sum() if dim is None else contributions.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the positions ``mask`` marks: ``sum(x * m) / sum(m)``.

    With ``dim=None`` every counted token of the batch has equal weight (a token mean, not a mean
    of per-sequence means). An all-zero mask gives 0, not NaN: a micro-batch whose responses are
    all empty contributes nothing instead of poisoning the optimizer state.

    Sharding: a local token mean. The data-parallel gradient average equals the global token mean
    only when ranks count the same number of tokens; for an exact global mean, a caller computes
    ``masked_sum`` and divides by the all-reduced token count (times the world size).
    """
    weights = _as_weights(mask, x)
    total = weights.sum() if dim is None else weights.sum(dim=dim)
    return masked_sum(x, mask, dim) / total.clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default, as TRL does).

    Fewer than two counted tokens with ``unbiased=True`` give the biased variance (no division by
    zero). Sharding: local statistics, see ``masked_whiten``.
    """
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        count = _as_weights(mask, x).sum()
        if count > 1:
            variance = variance * count / (count - 1)
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked positions.

    ``(x - mean) / sqrt(var + 1e-8)`` with mean/variance over counted tokens only (so padding
    cannot drag the statistics). With ``shift_mean=False`` the mean is added back: only the scale
    changes (TRL uses this for returns-like quantities). Masked-out positions are set to 0.

    Sharding: mean and variance are those of the local micro-batch (as in TRL, OpenRLHF and
    DeepSpeed-Chat), so whitened advantages depend on how rollouts are split over ranks. A caller
    wanting batch-global whitening all-reduces ``masked_sum(x)``, ``masked_sum(x**2)`` and the
    token count and normalises with those instead.
    """
    mean = masked_mean(x, mask)
    variance = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(variance + _WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_as_weights(mask, x) != 0, whitened, torch.zeros_like(whitened))


def masked_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Causal-LM cross-entropy averaged over response tokens (the SFT loss).

    ``logits`` ``[B, T, V]`` come from ``input_ids == labels`` ``[B, T]``; position ``t`` predicts
    token ``t + 1``, so the loss pairs ``logits[:, :-1]`` with ``labels[:, 1:]`` and keeps the
    pairs whose *target* token is marked by ``loss_mask[:, 1:]``:

        loss = -sum_{b,t} m[b,t+1] * log softmax(logits[b,t])[labels[b,t+1]] / sum m[b,t+1]

    Prompt and padding tokens are never targets. The softmax runs in float32 (bf16 log-softmax
    loses ~3 significant digits on large vocabularies).

    Sharding: a token mean over the local micro-batch, the default of HF Trainer/TRL's
    SFTTrainer. Equal per-rank response-token counts make it the global token mean; otherwise it
    is the mean of per-rank token means (what packing-free SFT trainers optimise too).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    shift_mask = loss_mask[:, 1:]
    # Non-target labels may be padding ids or -100: point them at a valid class, then mask.
    safe_labels = torch.where(shift_mask != 0, shift_labels, torch.zeros_like(shift_labels))
    token_nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        safe_labels.reshape(-1),
        reduction="none",
    ).view_as(shift_labels)
    return masked_mean(token_nll, shift_mask)


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry preference loss: ``mean(-log sigmoid(r_chosen - r_rejected))``.

    Minimising it maximises the modelled probability ``sigmoid(r_c - r_r)`` that the chosen
    response wins. It depends only on reward differences, so a constant added to every reward
    changes nothing. ``logsigmoid`` is used instead of ``log(sigmoid(.))`` for stability at large
    margins.

    Sharding: a mean over pairs; with equal per-rank pair counts (what a distributed sampler with
    equal shards gives) the gradient average over ranks is exactly the global pair mean.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate loss (Schulman et al. 2017), token-level.

    With ``ratio = exp(logprobs - old_logprobs)`` and advantage ``A``:

        loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))

    i.e. the pessimistic bound: an update gains nothing from moving the ratio beyond
    ``1 + eps`` when ``A > 0`` or below ``1 - eps`` when ``A < 0``.

    Returns ``(loss, clip_fraction, approx_kl)``; the last two are detached diagnostics:
    ``clip_fraction`` is the fraction of counted tokens where the clipped term was chosen (the
    gradient is cut there), ``approx_kl = 0.5 * masked_mean((logprobs - old_logprobs)**2)``
    (Schulman's k2 estimate of KL(old || new), TRL's ``approxkl``).

    Sharding: per-token terms, token-mean reduction; see the module note on equal token counts.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clip_fraction, approx_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> torch.Tensor:
    """Clipped value-function loss (PPO2 / TRL / OpenRLHF):

        v_clip = old_values + clip(values - old_values, -eps, eps)
        loss   = 0.5 * masked_mean(max((values - returns)**2, (v_clip - returns)**2))

    The max makes clipping pessimistic: the value head cannot cut its loss by jumping more than
    ``eps`` away from the value it predicted at rollout time.

    Sharding: per-token terms, token-mean reduction; see the module note.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    return 0.5 * masked_mean(torch.maximum(unclipped_error, clipped_error), mask)


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over per-token rewards.

    For each sequence, with ``m`` the response mask (1 on response tokens, 0 on the padded tail),
    the recursion runs backwards in time:

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (A_T = V_T = 0)
        R_t     = A_t + V_t                                         (the value targets)

    so the last response token bootstraps from nothing (the episode ends there) and padding
    never feeds back. Padded positions get advantage and return 0. No gradient flows (the
    result is a target).

    Sharding: the recursion runs along time within a sequence only, so the result for a
    sequence is the same whichever rank holds it: fully invariant.
    """
    weights = _as_weights(mask, values)
    rewards = rewards * weights
    values = values * weights
    batch, length = rewards.shape
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_advantage)
    next_mask = torch.zeros_like(next_advantage)
    for t in reversed(range(length)):
        delta = rewards[:, t] + gamma * next_mask * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_mask * next_advantage
        advantages[:, t] = next_advantage
        next_value, next_mask = values[:, t], weights[:, t]
    advantages = advantages * weights
    returns = (advantages + values) * weights
    return advantages, returns


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy.

    With ``log_r = logprobs - ref_logprobs`` (Schulman 2020, "Approximating KL divergence"):

        k1 = log_r                       unbiased, high variance, can be negative per token
        k2 = 0.5 * log_r**2              biased, low variance, always >= 0
        k3 = exp(-log_r) - 1 + log_r     unbiased, low variance, always >= 0

    PPO for RLHF adds ``-kl_coef * kl`` to the per-token reward (Ziegler et al. 2019 use k1).

    Sharding: elementwise, so fully invariant; the mean KL a controller sees must be all-reduced
    across ranks (see ``AdaptiveKLController.update``).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}: use one of {', '.join(KL_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient: ``update`` changes nothing (spec.stages.ppo.targetKL empty)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 (as in TRL and OpenRLHF).

    After each batch of ``n_steps`` samples with measured mean KL ``current_kl``:

        e     = clip(current_kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + e * n_steps / horizon)

    so a KL above the target raises the penalty and one below lowers it, by at most 20% per
    ``horizon`` samples.

    Sharding: every rank must call ``update`` with the same, all-reduced ``current_kl`` and the
    global ``n_steps``; then every rank holds the same coefficient.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move the coefficient towards keeping ``current_kl`` at ``target``."""
        error = current_kl / self.target - 1.0
        error = min(max(error, -ADAPTIVE_KL_ERROR_CLIP), ADAPTIVE_KL_ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon


# --------------------------------------------------------------------------- critic-free RL, DPO
# Formulas matched against OpenRLHF `openrlhf/trainer/ppo_utils/experience_maker.py`
# (advantage_estimator "group_norm", "rloo", "reinforce") and `openrlhf/models/loss.py`
# (DPOLoss), and TRL `trl/trainer/grpo_trainer.py` (group-normalised rewards, k3 KL loss term)
# and `dpo_trainer.py` (loss_type "sigmoid" / "ipo").

_GROUP_STD_EPS = 1e-4  # TRL's GRPO epsilon: a group of equal rewards gets advantage 0, not NaN


def _groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(
            f"{scores.numel()} scores do not split into groups of {group_size} (need >= 2)"
        )
    return scores.reshape(-1, group_size)


def group_normalized_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath): ``A_i = (r_i - mean(group)) / (std(group) + eps)``.

    ``scores`` is ``[B]`` with the ``group_size`` responses of one prompt adjacent. ``std`` is
    the unbiased sample std (torch's default, as TRL and OpenRLHF). Each sequence's advantage is
    then applied to every one of its response tokens.

    Sharding: a group lives on one rank, so the result is invariant.
    """
    groups = _groups(scores, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True)
    return ((groups - mean) / (std + _GROUP_STD_EPS)).reshape(-1)


def leave_one_out_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): ``A_i = r_i - mean_{j != i} r_j`` within a prompt's group,
    i.e. ``r_i - (sum(group) - r_i) / (k - 1)`` (OpenRLHF's "rloo" baseline). Invariant like
    GRPO's."""
    groups = _groups(scores, group_size)
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


@torch.no_grad()
def reinforce_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` per response token (no critic):
    REINFORCE++'s per-token target, with the KL penalty already in ``rewards``
    (``token_rewards``). Padding gets 0 and never feeds back."""
    weights = _as_weights(mask, rewards)
    rewards = rewards * weights
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * weights[:, t]
        returns[:, t] = running
    return returns * weights


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GRPO's KL term: the token mean of the k3 estimate of KL(policy || reference),
    ``exp(ref - logp) - (ref - logp) - 1`` (TRL ``per_token_kl``), differentiable in
    ``logprobs``; the caller weights it by ``klCoef`` and adds it to the policy loss."""
    return masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimisation over ``[B]`` sequence log-probabilities (summed over the
    response tokens for sigmoid; for ipo TRL averages them over the response tokens, and
    stages/dpo.py does too), with ``h = (pi_c - ref_c) - (pi_r - ref_r)``:

        sigmoid (Rafailov et al. 2023):  loss = mean(-log sigmoid(beta * h))
        ipo     (Azar et al. 2023):      loss = mean((h - 1 / (2 * beta))**2)

    (TRL ``dpo_loss``; OpenRLHF ``DPOLoss``). Returns ``(loss, chosen_reward, rejected_reward)``,
    the implicit rewards ``beta * (pi - ref)`` detached, as TRL logs them.

    Sharding: a mean over pairs; equal pair counts per rank give the global mean (like
    ``pairwise_loss``).
    """
    logits = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * logits).mean()
    elif loss_type == "ipo":
        loss = ((logits - 1.0 / (2.0 * beta)) ** 2).mean()
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}: use sigmoid or ipo")
    with torch.no_grad():
        chosen = beta * (policy_chosen - reference_chosen)
        rejected = beta * (policy_rejected - reference_rejected)
    return loss, chosen, rejected
