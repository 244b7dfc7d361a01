"""The `hf` rollout engine: transformers' `generate` on the policy module itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_trainer.generation import Samples, sample
from rlhf_trainer.rollout import Completion, Sampling


class HFEngine:
    """Samples from the live policy module: new weights need no copy (`load_weights` only
    records which module to sample from)."""

    def __init__(self, module: torch.nn.Module, tokenizer: Any, *, device, synced_gpus: bool):
        self.module = module
        self.tokenizer = tokenizer
        self.device = device
        self.synced_gpus = synced_gpus
        """Under ZeRO-3 every rank keeps stepping until all are done (collective forwards)."""

    def load_weights(self, engine: Any, module: torch.nn.Module | None = None) -> None:
        self.module = module if module is not None else engine.module

    def sleep(self) -> None:
        """Nothing to free: generate's cache lives only during the call."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Samples:
        # Sampling carries GenerationSpec's field names: generation.sample reads just those.
        return sample(
            self.module,
            self.tokenizer,
            prompts,
            sampling,  # type: ignore[arg-type]
            synced_gpus=self.synced_gpus,
            device=self.device,
        )

    @torch.no_grad()
    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        from rlhf_trainer.models import token_logprobs

        samples = self.generate(prompts, sampling)
        logits = self.module(
            input_ids=samples.input_ids, attention_mask=samples.attention_mask
        ).logits
        logprobs = token_logprobs(logits, samples.input_ids, 1.0)
        return [
            Completion(tokens, logprobs[row][samples.action_mask[row].bool()].tolist())
            for row, tokens in enumerate(samples.responses)
        ]
