"""Scale and memory without GPUs: one Ray Train worker per GPU, loading in the spec's precision,
micro-batched rollouts (same results, bounded calls), LoRA adapters saved as a plain model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rlhf_operator.api.spec import GenerationSpec, LoraSpec, PPOStage
from rlhf_trainer.jobspec import UserError, parse_job
from rlhf_trainer.launcher import worker_layout
from tiny_jobs import tiny_manifest


def _job(tmp_path: Path, tiny_dir: Path, **workers):
    manifest = tiny_manifest(tiny_dir, tmp_path)
    manifest["spec"]["cluster"]["workers"].update(workers)
    return parse_job(manifest)


def test_one_ray_train_worker_per_gpu(tmp_path: Path, tiny_dir: Path) -> None:
    """2 pods x 4 GPUs: 8 one-GPU workers (ranks), packed pod by pod, each with a quarter of
    the pod's CPU request."""
    job = _job(
        tmp_path,
        tiny_dir,
        replicas=2,
        gpusPerWorker=4,
        resources={"requests": {"cpu": "16", "memory": "64Gi"}},
    )
    layout = worker_layout(job, cluster_cpus=40)
    assert (layout.num_workers, layout.use_gpu) == (8, True)
    assert layout.resources_per_worker == {"CPU": 4.0, "GPU": 1.0}
    scaling = layout.scaling_config()
    assert scaling.num_workers == 8 and scaling.use_gpu
    assert scaling.placement_strategy == "PACK"
    assert (scaling.num_gpus_per_worker, scaling.num_cpus_per_worker) == (1.0, 4.0)


def test_cpu_pods_run_one_worker_each_within_the_clusters_cpus(
    tmp_path: Path, tiny_dir: Path
) -> None:
    job = _job(tmp_path, tiny_dir, replicas=2, gpusPerWorker=0)
    layout = worker_layout(job, cluster_cpus=2)  # a 2-core laptop: 1 CPU each, not 4
    assert (layout.num_workers, layout.use_gpu) == (2, False)
    assert layout.resources_per_worker == {"CPU": 1.0}


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_models_load_in_the_specs_precision(tiny_dir: Path, precision: str, dtype) -> None:
    from rlhf_trainer.models import load_causal_lm, load_dtype, load_scalar_model

    model = load_causal_lm(str(tiny_dir / "model"), "spec.model.base", dtype=load_dtype(precision))
    assert {p.dtype for p in model.parameters()} == {dtype}
    value = load_scalar_model(str(tiny_dir / "model"), "f", 0, dtype=load_dtype(precision))
    assert {p.dtype for p in value.parameters()} == {dtype}


def test_micro_batched_generation_calls_generate_per_micro_batch(tiny_dir: Path) -> None:
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import load_causal_lm, load_tokenizer

    model = load_causal_lm(str(tiny_dir / "model"), "spec.model.base")
    tokenizer = load_tokenizer(str(tiny_dir / "model"), "spec.model.base")
    sizes: list[int] = []
    generate = model.generate

    def recording(**kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    model.generate = recording
    prompts = [tokenizer(f"film {'very ' * i}:").input_ids for i in range(10)]
    samples = sample(
        model,
        tokenizer,
        prompts,
        GenerationSpec(max_new_tokens=5),
        synced_gpus=False,
        device=torch.device("cpu"),
        micro_batch=4,
    )
    assert sizes == [4, 4, 2]
    assert samples.input_ids.shape[0] == len(samples.responses) == 10
    for row, prompt in enumerate(prompts):  # each response packed behind its own prompt
        assert samples.input_ids[row, : len(prompt)].tolist() == prompt


def test_micro_batched_scoring_equals_one_pass(tiny_dir: Path) -> None:
    """rolloutMicroBatchSize changes memory, not the rollout: same log-probs, values, KL and
    (batch-whitened) advantages as one pass over all sequences."""
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import (
        ScalarHeadModel,
        last_token,
        load_causal_lm,
        load_scalar_model,
        load_tokenizer,
    )
    from rlhf_trainer.stages.ppo import score

    uri = str(tiny_dir / "model")
    tokenizer = load_tokenizer(uri, "f")
    policy = load_causal_lm(uri, "f").eval()
    torch.manual_seed(0)
    reference = load_causal_lm(uri, "f").eval()
    for p in reference.parameters():
        p.data += 0.01 * torch.randn_like(p)
    value: ScalarHeadModel = load_scalar_model(uri, "f", tokenizer.pad_token_id).eval()
    prompts = [tokenizer(f"film {'good ' * i}:").input_ids for i in range(7)]
    samples = sample(
        policy,
        tokenizer,
        prompts,
        GenerationSpec(max_new_tokens=6),
        synced_gpus=False,
        device=torch.device("cpu"),
    )
    engines = {"policy": policy, "reference": reference, "value": value}

    def reward(ids, mask):
        return last_token(value(ids, mask), mask)

    whole = score(samples, engines, reward, PPOStage(), kl_coef=0.1)
    parts = score(samples, engines, reward, PPOStage(rollout_micro_batch_size=3), kl_coef=0.1)
    for name in ("logprobs", "values", "advantages", "returns", "scores", "kl"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name))
    assert parts.entropy == pytest.approx(whole.entropy)


def test_lora_reference_is_the_base_and_the_policy_saves_merged(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Adapters off = the SFT model exactly (PPO's reference); the saved policy is a plain
    transformers model (no adapter files) whose outputs are the adapted policy's."""
    from rlhf_trainer.lora import AdaptersOff, add_policy_adapters, save_merged, trainable_fraction
    from rlhf_trainer.models import load_causal_lm
    from transformers import AutoModelForCausalLM

    uri = str(tiny_dir / "model")
    base = load_causal_lm(uri, "f").eval()
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits.clone()
    policy = add_policy_adapters(base, LoraSpec(rank=4, alpha=8), seed=0, field="f").eval()
    assert 0 < trainable_fraction(policy) < 0.5
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters do something
            param.data.normal_(0, 0.05)

    class Engine:  # what AdaptersOff needs of a DeepSpeed engine
        module = policy

        def __call__(self, **inputs):
            return policy(**inputs)

    with torch.no_grad():
        adapted = policy(input_ids=ids).logits
        off = AdaptersOff(Engine())(input_ids=ids).logits
    torch.testing.assert_close(off, base_logits)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)

    save_merged(policy, tmp_path / "model")
    assert not (tmp_path / "model" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
        # unmerged again: the policy goes on training its adapters on the base weights
        torch.testing.assert_close(policy(input_ids=ids).logits, adapted)


def test_lora_adapters_take_the_models_precision(tiny_dir: Path) -> None:
    """One dtype for every trainable parameter: ZeRO-3 flattens them into one buffer."""
    from rlhf_trainer.lora import add_policy_adapters, add_value_adapters
    from rlhf_trainer.models import load_causal_lm, load_scalar_model

    uri = str(tiny_dir / "model")
    policy = add_policy_adapters(
        load_causal_lm(uri, "f", dtype=torch.bfloat16), LoraSpec(), seed=0, field="f"
    )
    value = add_value_adapters(
        load_scalar_model(uri, "f", 0, dtype=torch.bfloat16), LoraSpec(), seed=0, field="f"
    )
    for model in (policy, value):
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}


def test_lora_target_modules_that_match_nothing_name_the_field(tiny_dir: Path) -> None:
    from rlhf_trainer.lora import add_policy_adapters
    from rlhf_trainer.models import load_causal_lm

    model = load_causal_lm(str(tiny_dir / "model"), "f")
    with pytest.raises(UserError, match=r"spec\.parallelism\.lora\.targetModules"):
        add_policy_adapters(model, LoraSpec(target_modules=["q_proj"]), seed=0, field="f")


def test_lora_refuses_adapters_on_tied_embeddings(tiny_dir: Path) -> None:
    """GPT-2's lm_head is the token embedding matrix: merged for saving, an adapter on it
    would change the inputs' embeddings too (the saved model would not be the trained one)."""
    from rlhf_trainer.lora import add_policy_adapters
    from rlhf_trainer.models import load_causal_lm

    model = load_causal_lm(str(tiny_dir / "model"), "f")
    assert model.lm_head.weight is model.transformer.wte.weight
    with pytest.raises(UserError, match=r"targetModules: lm_head shares its weight.*drop lm_head"):
        add_policy_adapters(
            model, LoraSpec(target_modules=["c_attn", "lm_head"]), seed=0, field="f"
        )


def test_lora_on_an_untied_head_saves_merged_as_it_was_trained(tiny_dir: Path, tmp_path) -> None:
    """A head of its own takes an adapter; the merged save gives the adapted policy's logits
    and leaves the token embeddings as they were."""
    from rlhf_trainer.lora import add_policy_adapters, save_merged
    from rlhf_trainer.models import load_causal_lm
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(str(tiny_dir / "model"), "f")
    untied = tmp_path / "untied"
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.transformer.wte.weight.detach().clone())
    model.save_pretrained(untied)
    embeddings = model.transformer.wte.weight.detach().clone()

    policy = add_policy_adapters(
        load_causal_lm(str(untied), "f"), LoraSpec(target_modules=["c_attn", "lm_head"]), 0, "f"
    )
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:  # B starts at zero: give the adapters something to merge
                param.normal_(0, 0.1)
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    adapted = policy(input_ids=ids).logits
    save_merged(policy, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(merged(input_ids=ids).logits, adapted, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.transformer.wte.weight, embeddings)
    assert not torch.equal(merged.lm_head.weight, embeddings)


def test_lora_value_model_trains_its_adapters_and_one_head(tiny_dir: Path) -> None:
    """The value model's trainable parameters are its backbone's adapters and the one scalar
    head its forward uses, and each of them gets a gradient (no idle copy in the optimizer)."""
    from rlhf_trainer.lora import add_value_adapters
    from rlhf_trainer.models import load_scalar_model

    value = add_value_adapters(
        load_scalar_model(str(tiny_dir / "model"), "f", 0),
        LoraSpec(rank=4, target_modules=["c_attn", "c_fc"]),
        seed=0,
        field="f",
    )
    trained = {name: p for name, p in value.named_parameters() if p.requires_grad}
    heads = [name for name in trained if "lora_" not in name]
    assert heads == ["model.score.weight"], heads
    ids = torch.tensor([[3, 5, 7, 11, 13, 17]])
    value(ids, torch.ones_like(ids)).sum().backward()
    assert all(p.grad is not None for p in trained.values())


@pytest.mark.slow  # a DeepSpeed ZeRO-3 engine in this process (8 min under a load of 48)
def test_zero3_generation_gathers_once_and_restores_the_hooks(
    tiny_dir: Path, one_rank_group
) -> None:
    """Under ZeRO-3 the policy is gathered whole for the rollout (no collective per token:
    `synced_gpus` off), samples what layer-by-layer generation samples, and is partitioned
    again afterwards with DeepSpeed's hooks back (training forward passes still gather)."""
    from rlhf_operator.api.spec import ParallelismSpec
    from rlhf_trainer.engine import generation_model, plan_engine
    from rlhf_trainer.generation import sample
    from rlhf_trainer.models import load_causal_lm, load_tokenizer

    uri = str(tiny_dir / "model")
    tokenizer = load_tokenizer(uri, "f")
    plan = plan_engine(
        ParallelismSpec(zero_stage=3, precision="fp32"),
        use_gpu=False,
        world_size=1,
        hidden_size=64,
        learning_rate=1e-3,
    )
    engine = plan.initialize(plan.build(lambda: load_causal_lm(uri, "f")))
    params = list(engine.module.parameters())
    assert any(p.numel() == 0 for p in params)  # partitioned
    prompts = [tokenizer(f"film {'good ' * i}:").input_ids for i in range(3)]

    def rollout(model, synced):
        torch.manual_seed(0)
        return sample(
            model,
            tokenizer,
            prompts,
            GenerationSpec(max_new_tokens=6),
            synced_gpus=synced,
            device=torch.device("cpu"),
        )

    layer_by_layer = rollout(engine.module, True)
    with generation_model(engine, 3) as (model, synced):
        assert not synced
        assert all(p.numel() == p.ds_numel for p in model.parameters())  # whole
        whole = rollout(model, synced)
    assert whole.responses == layer_by_layer.responses
    assert any(p.numel() == 0 for p in params)  # partitioned again
    ids = whole.input_ids
    loss = engine(input_ids=ids, attention_mask=whole.attention_mask, labels=ids).loss
    engine.backward(loss)  # the hooks gather and release again for training
    engine.step()
