"""Rollout engines: what samples responses for PPO and evaluation.

One small interface, two engines (`spec.stages.ppo.rollout.engine`, and evaluation's):

- `hf`: transformers' `generate` on the policy module itself (padded static batches);
- `vllm`: a vLLM engine in the same worker process as the policy (TRL's colocate mode,
  OpenRLHF's hybrid engine): PagedAttention and continuous batching, with the policy's weights
  loaded into it before every rollout (`load_weights`).

Both sample with the same `Sampling` (temperature, top-k, top-p, max new tokens, stop at EOS)
and return the same right-padded `Samples`; PPO recomputes every log-probability with the policy,
so the engine never enters the PPO math. `complete` also returns the engine's own log-prob of
each sampled token (tests and benchmarks compare engines with it). `top_k=1` is greedy decoding
in both engines.

    engine = make_engine(ppo.rollout, "spec.stages.ppo.rollout", model_uri=..., ...)
    engine.load_weights(policy_engine)   # every step: the policy's current weights
    samples = engine.generate(prompt_ids, Sampling.of(ppo.generation))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from rlhf_operator.api.spec import GenerationSpec, RolloutSpec

    from rlhf_trainer.generation import Samples


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters, meaning the same in every engine."""

    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    """0: no top-k cut."""
    top_p: float = 1.0
    """1: no nucleus cut."""

    @classmethod
    def of(cls, generation: GenerationSpec) -> Sampling:
        return cls(
            max_new_tokens=generation.max_new_tokens,
            temperature=generation.temperature,
            top_k=generation.top_k,
            top_p=generation.top_p,
        )


@dataclass
class Completion:
    """One sampled response: its token ids (EOS included when the model emitted it) and the
    engine's log-prob of each (untempered: log-softmax of the raw logits)."""

    tokens: list[int]
    logprobs: list[float]


class RolloutEngine(Protocol):
    """Generate a batch with given sampling parameters; take new weights."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> Samples:
        """One response per prompt, packed (`prompt + response`, right-padded) as `Samples`
        on the policy's device."""
        ...

    def complete(self, prompts: Sequence[Sequence[int]], sampling: Sampling) -> list[Completion]:
        """One response per prompt with the engine's log-probs (tests, benchmarks)."""
        ...

    def load_weights(self, engine: Any, module: torch.nn.Module | None = None) -> None:
        """Sample from these weights from now on: `module` (default `engine.module`), the
        transformers model inside the DeepSpeed `engine` (gathered once under ZeRO-3)."""
        ...

    def sleep(self) -> None:
        """Rollouts are done until the next `load_weights`: free what the engine can."""
        ...


def make_engine(
    rollout: RolloutSpec,
    field: str,
    *,
    model_uri: str,
    tokenizer: Any,
    module: torch.nn.Module,
    device: Any,
    zero_stage: int,
    precision: str,
    max_model_len: int,
    seed: int,
    rank: int,
    world_size: int,
    micro_batch: int | None = None,
    gather_once: bool = False,
) -> RolloutEngine:
    """The engine `rollout.engine` names (`field`: its spec path, for error messages).

    `module` is the policy's transformers model the `hf` engine samples from; the `vllm` engine
    loads `model_uri` (the same weights) once and afterwards takes weights by `load_weights`.
    `micro_batch` and `gather_once` (ZeRO-3: gather the full policy once per rollout) are the
    `hf` engine's; vLLM batches and gathers by itself.
    """
    config = getattr(module, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    max_model_len = min(max_model_len, limit) if limit else max_model_len
    if rollout.engine == "hf":
        from rlhf_trainer.rollout.hf import HFEngine

        return HFEngine(
            module,
            tokenizer,
            device=device,
            synced_gpus=zero_stage == 3,
            micro_batch=micro_batch,
            gather_once=gather_once,
        )
    from rlhf_trainer.rollout.vllm import VLLMEngine

    return VLLMEngine(
        rollout.vllm,
        f"{field}.engine",
        model_uri=model_uri,
        tokenizer=tokenizer,
        device=device,
        precision=precision,
        max_model_len=max_model_len,
        seed=seed,
        rank=rank,
        world_size=world_size,
    )
