"""Evaluation: the SFT policy against the PPO policy on held-out prompts, scored by the reward
model.

For each prompt, `samplesPerPrompt` responses are sampled from each policy and scored. Sample j
of the PPO policy is compared with sample j of the SFT policy: a win is a strictly higher reward
(ties are not wins). Metrics: win_rate (wins / comparisons), mean_reward_sft, mean_reward_rlhf,
prompts_improved_fraction (prompts whose mean PPO reward beats their mean SFT reward).
Writes examples.csv (every sample) and examples.md (a readable table) next to metrics.json.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING, Any

from rlhf_trainer.data import load_eval_rows
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path, policy_source, reward_source, stage_model_uri
from rlhf_trainer.reward_model import check_positive_label

if TYPE_CHECKING:
    import datasets
    from rlhf_operator.api import RLHFJob

FIELD = "spec.stages.evaluation"
EXAMPLES_CSV = "examples.csv"
EXAMPLES_MD = "examples.md"
MARKDOWN_PROMPTS = 12
PROMPTS_PER_PASS = 16


def eval_prompts(job: RLHFJob) -> tuple[datasets.Dataset, str]:
    """Held-out prompts and their column: `evaluation.prompts`, else PPO's held-out prompts."""
    evaluation = job.spec.stages.evaluation
    if evaluation.prompts is not None:
        field = evaluation.prompts.prompt_field
        columns = {"promptField": field}
        return load_eval_rows(evaluation.prompts, f"{FIELD}.prompts", columns), field
    from rlhf_trainer.stages.ppo import prompt_split

    held_out = prompt_split(job).held_out
    if held_out is None:
        raise UserError(
            f"{FIELD}.prompts: not set, and spec.stages.ppo.prompts holds nothing out "
            "(evalFraction 0, no testSplit); set one of them."
        )
    return held_out, job.spec.stages.ppo.prompts.prompt_field


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    rows, _ = eval_prompts(job)
    if len(rows) < job.spec.cluster.workers.replicas:
        raise UserError(
            f"{FIELD}.prompts: {len(rows)} prompts for {job.spec.cluster.workers.replicas} "
            "workers; give at least one prompt per worker."
        )
    if check_upstream:
        check_model_path(*policy_source(job))
        check_model_path(stage_model_uri(job, "ppo"), "spec.stages.ppo (its model artifact)")
    reward_uri, reward_field = reward_source(job)
    if check_upstream or reward_field.endswith(".model"):
        check_model_path(reward_uri, reward_field)
    check_positive_label(job)
    if (job.spec.stages.evaluation.rollout or job.spec.stages.ppo.rollout).engine == "vllm":
        from rlhf_trainer.rollout.vllm import check_installed

        check_installed(rollout_field(job))


def rollout_field(job: RLHFJob) -> str:
    """The spec field that chose evaluation's engine (its own, else PPO's)."""
    if job.spec.stages.evaluation.rollout is not None:
        return f"{FIELD}.rollout.engine"
    return "spec.stages.ppo.rollout.engine"


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """The evaluation metrics from per-prompt results ({"sft_rewards", "rlhf_rewards"})."""
    wins = comparisons = improved = 0
    sft_total = rlhf_total = 0.0
    for row in results:
        sft, rlhf = row["sft_rewards"], row["rlhf_rewards"]
        wins += sum(r > s for s, r in zip(sft, rlhf, strict=True))
        comparisons += len(sft)
        improved += sum(rlhf) / len(rlhf) > sum(sft) / len(sft)
        sft_total += sum(sft)
        rlhf_total += sum(rlhf)
    return {
        "win_rate": wins / comparisons,
        "mean_reward_sft": sft_total / comparisons,
        "mean_reward_rlhf": rlhf_total / comparisons,
        "prompts_improved_fraction": improved / len(results),
    }


def write_examples(artifact, results: list[dict[str, Any]], metrics: dict[str, float]) -> None:
    artifact.local_dir.mkdir(parents=True, exist_ok=True)
    with artifact.path(EXAMPLES_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["prompt", "sample", "sft_response", "sft_reward", "rlhf_response", "rlhf_reward"]
        )
        for row in results:
            for j, (sft, sft_r, rlhf, rlhf_r) in enumerate(
                zip(row["sft"], row["sft_rewards"], row["rlhf"], row["rlhf_rewards"], strict=True)
            ):
                writer.writerow([row["prompt"], j, sft, f"{sft_r:.4f}", rlhf, f"{rlhf_r:.4f}"])
    lines = [
        "# SFT vs RLHF (PPO) on held-out prompts",
        "",
        f"win rate {metrics['win_rate']:.3f} · mean reward SFT {metrics['mean_reward_sft']:.3f}"
        f" → RLHF {metrics['mean_reward_rlhf']:.3f} · prompts improved "
        f"{metrics['prompts_improved_fraction']:.3f} ({len(results)} prompts; first sample of "
        f"the first {min(MARKDOWN_PROMPTS, len(results))} shown, all in {EXAMPLES_CSV})",
        "",
        "| prompt | SFT response | reward | RLHF response | reward |",
        "|---|---|---:|---|---:|",
    ]
    for row in results[:MARKDOWN_PROMPTS]:
        cells = [
            row["prompt"],
            row["sft"][0],
            f"{row['sft_rewards'][0]:.3f}",
            row["rlhf"][0],
            f"{row['rlhf_rewards'][0]:.3f}",
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    artifact.path(EXAMPLES_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    artifact.publish(EXAMPLES_CSV)
    artifact.publish(EXAMPLES_MD)


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer import engine as ds
    from rlhf_trainer.batches import prompt_ids
    from rlhf_trainer.generation import decode
    from rlhf_trainer.models import hidden_size, load_causal_lm, load_tokenizer
    from rlhf_trainer.reward_model import (
        RewardScorer,
        load_reward_head,
        load_reward_tokenizer,
        max_length,
    )
    from rlhf_trainer.rollout import Sampling, make_engine
    from rlhf_trainer.worker import StageWorker, gather_objects

    worker = StageWorker.start(config)
    spec = worker.job.spec
    evaluation = spec.stages.evaluation
    generation = evaluation.generation or spec.stages.ppo.generation
    with worker.timed("data"):
        rows, prompt_field = eval_prompts(worker.job)
        count = min(evaluation.num_prompts, len(rows))
        count -= count % worker.world_size  # equal shares: ZeRO-3 needs equal passes
        mine = list(range(count))[worker.rank :: worker.world_size]
    (sft_uri, sft_field), (reward_uri, reward_field) = (
        policy_source(worker.job),
        reward_source(worker.job),
    )
    rlhf_uri, rlhf_field = (
        stage_model_uri(worker.job, "ppo"),
        "spec.stages.ppo (its model artifact)",
    )
    loaders = {
        "sft": (sft_uri, sft_field, lambda: load_causal_lm(sft_uri, sft_field)),
        "rlhf": (rlhf_uri, rlhf_field, lambda: load_causal_lm(rlhf_uri, rlhf_field)),
        "reward": (
            reward_uri,
            reward_field,
            lambda: load_reward_head(reward_uri, reward_field, spec.stages.reward.positive_label),
        ),
    }
    with worker.timed("model_load"):
        tokenizer = load_tokenizer(sft_uri, sft_field)
        reward_tokenizer = load_reward_tokenizer(reward_uri, reward_field, tokenizer)
        plans, models = {}, {}
        for name, (uri, field, load) in loaders.items():
            plans[name] = ds.plan_engine(  # frozen: ZeRO-3 shards, any other stage replicates
                spec.parallelism,
                use_gpu=worker.use_gpu,
                world_size=worker.world_size,
                hidden_size=hidden_size(uri, field),
            )
            models[name] = plans[name].build(load)
    with worker.timed("deepspeed_init"):
        engines = {name: plans[name].initialize(model) for name, model in models.items()}
    device = engines["sft"].device
    scorer = RewardScorer(
        engines["reward"],
        tokenizer,
        reward_tokenizer,
        max_length(reward_tokenizer, models["reward"].model) if reward_tokenizer else None,
    )
    with worker.timed("rollout_engine_init"):
        # One engine samples both policies: vllm starts from the SFT weights and takes each
        # policy's weights before its pass (the PPO weight sync).
        rollout = evaluation.rollout or spec.stages.ppo.rollout
        sampler = make_engine(
            rollout,
            rollout_field(worker.job).removesuffix(".engine"),
            model_uri=sft_uri,
            tokenizer=tokenizer,
            module=engines["sft"].module,
            device=device,
            zero_stage=spec.parallelism.zero_stage,
            precision=spec.parallelism.precision,
            max_model_len=spec.stages.ppo.max_prompt_len + generation.max_new_tokens,
            seed=spec.seed,
            rank=worker.rank,
            world_size=worker.world_size,
        )
    passes = [mine[i : i + PROMPTS_PER_PASS] for i in range(0, len(mine), PROMPTS_PER_PASS)]
    worker.start_progress(len(passes))
    results: list[dict[str, Any]] = []
    with worker.timed("evaluate"), torch.no_grad():
        for index, chunk in enumerate(passes):
            texts = rows[chunk][prompt_field]
            repeated = [t for t in texts for _ in range(evaluation.samples_per_prompt)]
            ids = prompt_ids(tokenizer, repeated, spec.stages.ppo.max_prompt_len)
            outputs = {}
            for policy in ("sft", "rlhf"):
                worker.sampling_seed(2 * index + (policy == "rlhf"))
                sampler.load_weights(engines[policy])
                samples = sampler.generate(ids, Sampling.of(generation))
                rewards = scorer(samples.input_ids, samples.attention_mask)
                outputs[policy] = (
                    [decode(tokenizer, r) for r in samples.responses],
                    rewards.tolist(),
                )
            k = evaluation.samples_per_prompt
            for i, text in enumerate(texts):
                results.append(
                    {
                        "index": chunk[i],
                        "prompt": text,
                        "sft": outputs["sft"][0][i * k : (i + 1) * k],
                        "sft_rewards": outputs["sft"][1][i * k : (i + 1) * k],
                        "rlhf": outputs["rlhf"][0][i * k : (i + 1) * k],
                        "rlhf_rewards": outputs["rlhf"][1][i * k : (i + 1) * k],
                    }
                )
            worker.reporter.update(index + 1)
    everyone = sorted(
        (row for part in gather_objects(results) for row in part), key=lambda row: row["index"]
    )
    metrics = summarize(everyone)
    if worker.is_main:
        write_examples(worker.artifact, everyone, metrics)
    worker.log(len(passes), metrics)
    worker.finish(metrics, steps_run=len(passes), total_steps=len(passes))
