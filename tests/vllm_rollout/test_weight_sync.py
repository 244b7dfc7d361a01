"""After a policy update, vLLM samples from the updated weights: its greedy output and its
log-probs equal the DeepSpeed policy's (ZeRO-2 and ZeRO-3: gathered once per sync)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], [10, 11], [20, 21, 22, 23], [30]]
GREEDY = {"max_new_tokens": 12, "top_k": 1}  # top-k 1: greedy in both engines


def _world_of_one() -> None:
    import deepspeed.ops
    import torch.distributed as dist

    # One process: DeepSpeed's shared-memory collectives (an op it JIT-compiles for minutes on
    # first use) have nothing to share; torch.distributed's gloo serves.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29561")
        dist.init_process_group("gloo", rank=0, world_size=1)


def _policy(model_dir: Path, zero_stage: int):
    from rlhf_operator.api.spec import ParallelismSpec
    from rlhf_trainer import engine as ds
    from rlhf_trainer.models import disable_dropout, load_causal_lm

    ds.select_accelerator(use_gpu=False)
    plan = ds.plan_engine(
        ParallelismSpec(zero_stage=zero_stage, precision="fp32"),
        use_gpu=False,
        world_size=1,
        hidden_size=64,
        learning_rate=3e-2,
    )
    model = plan.build(lambda: load_causal_lm(str(model_dir), "spec.model.base"))
    disable_dropout(model)
    return plan.initialize(model)


def _train_towards(policy, token: int, steps: int = 8) -> None:
    """Make `token` the policy's favourite continuation (a real DeepSpeed update)."""
    ids = torch.tensor([[*p, token, token, token] for p in PROMPTS[:1]] * 2)
    for _ in range(steps):
        loss = policy(input_ids=ids, labels=ids).loss
        policy.backward(loss)
        policy.step()


def _policy_greedy(policy, prompts, max_new_tokens):
    from rlhf_trainer.rollout import Sampling
    from rlhf_trainer.rollout.hf import HFEngine

    hf = HFEngine(policy.module, TOKENIZER, device=policy.device, synced_gpus=False)
    return hf.complete(prompts, Sampling(max_new_tokens=max_new_tokens, top_k=1))


class _Tokenizer:
    eos_token_id = 2
    pad_token_id = 0


TOKENIZER = _Tokenizer()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_vllm_follows_the_updated_policy(tiny_vllm_dir: Path, zero_stage: int) -> None:
    from rlhf_trainer.models import load_tokenizer
    from rlhf_trainer.rollout import Sampling

    _world_of_one()
    model_dir = tiny_vllm_dir / "model"
    tokenizer = load_tokenizer(str(model_dir), "spec.model.base")
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (2, 0)
    policy = _policy(model_dir, zero_stage)
    engine = _engine(model_dir, tokenizer)
    sampling = Sampling(**GREEDY)
    engine.load_weights(policy)  # vLLM already holds these weights: no change
    before = engine.complete(PROMPTS, sampling)
    assert [c.tokens for c in before] == [c.tokens for c in _policy_greedy(policy, PROMPTS, 12)]

    great = tokenizer.convert_tokens_to_ids("great")
    _train_towards(policy, great)
    expected = _policy_greedy(policy, PROMPTS, 12)
    assert expected[0].tokens[:3] == [great] * 3  # the update changed the greedy output
    stale = engine.complete(PROMPTS, sampling)
    assert [c.tokens for c in stale] == [c.tokens for c in before]  # not synced yet

    engine.load_weights(policy)
    synced = engine.complete(PROMPTS, sampling)
    assert [c.tokens for c in synced] == [c.tokens for c in expected]
    for got, want in zip(synced, expected, strict=True):
        torch.testing.assert_close(
            torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=1e-4
        )


_ENGINES: dict[str, object] = {}


def _engine(model_dir: Path, tokenizer):
    """One vLLM engine per process (its distributed groups are process-wide), shared by the
    parametrized cases; each case first loads its own policy's starting weights."""
    from rlhf_operator.api.spec import VLLMSpec
    from rlhf_trainer.rollout.vllm import VLLMEngine

    if "engine" not in _ENGINES:
        _ENGINES["engine"] = VLLMEngine(
            VLLMSpec(max_num_seqs=8),
            "spec.stages.ppo.rollout.engine",
            model_uri=str(model_dir),
            tokenizer=tokenizer,
            device=torch.device("cpu"),
            precision="fp32",
            max_model_len=40,
            seed=0,
            rank=0,
            world_size=1,
        )
    return _ENGINES["engine"]
