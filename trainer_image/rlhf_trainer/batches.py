"""Which rows each worker reads at each step, and how text becomes padded token tensors.

The batch plan is a pure function of (seed, step): a resumed stage reads exactly the rows the
interrupted one would have read next, with nothing to save but the step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class BatchPlan:
    """Global batch `step` = rows `[i*B, (i+1)*B)` of epoch `e`'s permutation; rank r reads its
    equal slice of it (a DistributedSampler without replacement, epoch-seeded)."""

    num_rows: int
    batch_size: int
    world_size: int
    seed: int
    _epoch: int = field(default=-1, init=False)
    _order: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ValueError("batch size must be a multiple of the world size")

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.batch_size

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a 0-based global step."""
        return divmod(step, self.steps_per_epoch)

    def rows(self, step: int, rank: int) -> list[int]:
        epoch, index = self.position(step)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.num_rows, generator=generator).tolist()
            self._epoch = epoch
        share = self.batch_size // self.world_size
        start = index * self.batch_size + rank * share
        return self._order[start : start + share]


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s strided share of `indices` (for held-out sets: each row read once)."""
    return list(indices[rank::world_size])


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (the stages add EOS themselves)."""
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids padded on the right, and the attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, : len(sequence)] = 1
    return ids, mask


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids padded on the left (prompts for generation), and the attention mask."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if sequence:
            ids[row, length - len(sequence) :] = torch.tensor(sequence, dtype=torch.long)
            mask[row, length - len(sequence) :] = 1
    return ids, mask


def sft_batch(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int
) -> dict[str, torch.Tensor]:
    """`prompt + response + EOS`, cut to `max_len`; `loss_mask` marks response tokens and EOS."""
    sequences, masks = [], []
    for prompt, response in zip(
        encode(tokenizer, prompts), encode(tokenizer, responses), strict=True
    ):
        target = [*response, tokenizer.eos_token_id]
        sequences.append((prompt + target)[:max_len])
        masks.append(([0] * len(prompt) + [1] * len(target))[:max_len])
    input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id)
    loss_mask, _ = pad_right(masks, 0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def preference_batch(
    tokenizer,
    prompts: Sequence[str] | None,
    chosen: Sequence[str],
    rejected: Sequence[str],
    max_len: int,
) -> dict[str, torch.Tensor]:
    """Chosen then rejected sequences in one [2B, L] batch (`prompt + response + EOS`).

    Without prompts (`promptField: null`) the responses are complete texts. A cut keeps the end
    of the text, where a reward model reads its score.
    """
    prompt_ids = encode(tokenizer, prompts) if prompts is not None else [[] for _ in chosen]
    sequences = []
    for responses in (chosen, rejected):
        for prompt, response in zip(prompt_ids, encode(tokenizer, responses), strict=True):
            sequences.append([*prompt, *response, tokenizer.eos_token_id][-max_len:])
    input_ids, attention_mask = pad_right(sequences, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def prompt_ids(
    tokenizer, prompts: Sequence[str], max_prompt_len: int, truncation_side: str = "right"
) -> list[list[int]]:
    """Prompt token ids, at most `max_prompt_len` each: a long prompt loses its end ("right":
    the opening is kept, as TRL's IMDB example continues a review's first words) or its start
    ("left": the end is kept, e.g. the last turn of a conversation)."""
    if truncation_side == "left":
        return [ids[-max_prompt_len:] for ids in encode(tokenizer, prompts)]
    return [ids[:max_prompt_len] for ids in encode(tokenizer, prompts)]
