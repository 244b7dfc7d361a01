"""Sampling responses (PPO rollouts, evaluation) and packing them for scoring.

Prompts are left-padded for `generate`; the results are re-packed right-padded as
`prompt + response` (response cut after its first EOS), so that every later forward pass
(policy, reference, value and reward model) sees the layout the models were trained on, and a
sequence's score sits at its last attended token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_trainer.batches import pad_left, pad_right

if TYPE_CHECKING:
    from rlhf_operator.api.spec import GenerationSpec


@dataclass
class Samples:
    """Sampled `prompt + response` sequences, right-padded."""

    input_ids: torch.Tensor
    """[B, L] token ids."""
    attention_mask: torch.Tensor
    """[B, L] 1 on prompt and response tokens."""
    action_mask: torch.Tensor
    """[B, L-1]: 1 at position t when token t+1 is a response token (t predicts t+1)."""
    responses: list[list[int]]
    """Each response's token ids (EOS included when the model emitted it)."""

    def part(self, rows: slice) -> Samples:
        """The sequences `rows` (same width: still right-padded to the batch's length)."""
        return Samples(
            self.input_ids[rows],
            self.attention_mask[rows],
            self.action_mask[rows],
            self.responses[rows],
        )

    def to(self, device: torch.device) -> Samples:
        return Samples(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.action_mask.to(device),
            self.responses,
        )


def cut_after_eos(tokens: Sequence[int], eos_id: int) -> list[int]:
    """The response up to and including its first EOS (the rest is generate's padding)."""
    tokens = list(tokens)
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def pack(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int):
    """Right-padded `prompt + response` with the mask of the response's (action) positions."""
    sequences = [[*p, *r] for p, r in zip(prompts, responses, strict=True)]
    input_ids, attention_mask = pad_right(sequences, pad_id)
    action_mask = torch.zeros((len(sequences), input_ids.shape[1] - 1), dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        action_mask[row, len(prompt) - 1 : len(prompt) - 1 + len(response)] = 1
    return Samples(input_ids, attention_mask, action_mask, [list(r) for r in responses])


def chunks(count: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` rows (one slice of all when `size` is None)."""
    size = size or count or 1
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    generation: GenerationSpec,
    *,
    synced_gpus: bool,
    device: torch.device,
    micro_batch: int | None = None,
) -> Samples:
    """Sample one response per prompt from `model` (a transformers causal LM), `micro_batch`
    prompts per `generate` call (all at once when None): the KV cache and logits are bounded by
    the micro-batch, whatever the number of prompts.

    `synced_gpus` keeps every rank stepping until all are done: required when each forward pass
    gathers parameters collectively (ZeRO-3, engine.generation_model). Every rank has as many
    prompts, so as many calls.
    """
    # A prompt needs at least one token to condition on (and to predict the first response
    # token from): an empty prompt starts from EOS, GPT-2's beginning-of-text.
    prompts = [list(p) if len(p) else [tokenizer.eos_token_id] for p in prompts]
    was_training = model.training
    model.eval()
    responses: list[list[int]] = []
    for part in chunks(len(prompts), micro_batch):
        input_ids, attention_mask = pad_left(prompts[part], tokenizer.pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            do_sample=True,
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_k=generation.top_k,
            top_p=generation.top_p,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            synced_gpus=synced_gpus,
        )
        new_tokens = output[:, input_ids.shape[1] :].tolist()
        responses += [cut_after_eos(tokens, tokenizer.eos_token_id) for tokens in new_tokens]
    model.train(was_training)
    return pack(prompts, responses, tokenizer.pad_token_id).to(device)


def decode(tokenizer, response: Sequence[int]) -> str:
    """A response's text without its EOS."""
    return tokenizer.decode(
        [t for t in response if t != tokenizer.eos_token_id], skip_special_tokens=True
    ).strip()
