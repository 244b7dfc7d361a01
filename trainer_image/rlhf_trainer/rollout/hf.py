"""The `hf` rollout engine: transformers' `generate` on the policy module itself."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rlhf_trainer.generation import Samples, sample
from rlhf_trainer.rollout import Completion, Sampling


class HFEngine:
    """Samples from the live policy module: new weights need no copy (`load_weights` only
    records which engine/module to sample from).

    `gather_once` (PPO): under ZeRO-3 the full parameters are gathered once per rollout when they
    fit (`engine.generation_model`), else ranks step together; without it (evaluation) every
    forward gathers layer by layer and ranks step together (`synced_gpus`). `micro_batch`
    bounds the prompts per `generate` call (None: all at once).
    """

    def __init__(
        self,
        module: torch.nn.Module,
        tokenizer: Any,
        *,
        device,
        synced_gpus: bool,
        micro_batch: int | None = None,
        gather_once: bool = False,
    ):
        self.module = module
        self.engine: Any = None
        self.tokenizer = tokenizer
        self.device = device
        self.synced_gpus = synced_gpus
        """Under ZeRO-3 every rank keeps stepping until all are done (collective forwards)."""
        self.micro_batch = micro_batch
        self.gather_once = gather_once

    def load_weights(self, engine: Any, module: torch.nn.Module | None = None) -> None:
        self.engine = engine if module is None else None
        self.module = module if module is not None else engine.module

    def sleep(self) -> None:
        """Nothing to free: generate's cache lives only during the call."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Samples:
        if self.gather_once and self.engine is not None:
            from rlhf_trainer.engine import generation_model

            zero_stage = 3 if self.synced_gpus else 0
            with generation_model(self.engine, zero_stage) as (model, synced):
                return self._sample(model, prompts, sampling, synced)
        return self._sample(self.module, prompts, sampling, self.synced_gpus)

    def _sample(self, model, prompts, sampling: Sampling, synced: bool) -> Samples:
        # Sampling carries GenerationSpec's field names: generation.sample reads just those.
        return sample(
            model,
            self.tokenizer,
            prompts,
            sampling,  # type: ignore[arg-type]
            synced_gpus=synced,
            device=self.device,
            micro_batch=self.micro_batch,
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
