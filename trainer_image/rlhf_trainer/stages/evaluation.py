"""Evaluation: the SFT policy against the tuned policy (the RL stage's, or DPO's) on held-out
prompts, scored by the reward model and, when `judge` is set, by an independent judge (judge.py).

`numPrompts` prompts are drawn from the held-out rows by a seeded shuffle (spec.seed). For each,
`samplesPerPrompt` responses are sampled from each policy and scored. Sample j of the PPO policy
is compared with sample j of the SFT policy: a win is a strictly higher score (ties are not
wins). Metrics: win_rate (wins / comparisons), mean_reward_sft, mean_reward_rlhf,
prompts_improved_fraction (prompts whose mean PPO reward beats their mean SFT reward); with a
judge the same four by the judge's score: judge_win_rate, judge_mean_sft, judge_mean_rlhf,
judge_prompts_improved_fraction.
Writes examples.csv (every sample) and examples.md (a readable table) next to metrics.json.
"""

from __future__ import annotations

import csv
from typing import TYPE_CHECKING, Any

from rlhf_trainer import judge as judges
from rlhf_trainer.data import load_eval_rows, sample_rows
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.models import check_model_path, policy_source, reward_source, tuned_source
from rlhf_trainer.reward_model import check_positive_label

if TYPE_CHECKING:
    import datasets
    from rlhf_operator.api import RLHFJob
    from rlhf_operator.api.spec import PromptDataset

FIELD = "spec.stages.evaluation"
EXAMPLES_CSV = "examples.csv"
EXAMPLES_MD = "examples.md"
MARKDOWN_PROMPTS = 12
PROMPTS_PER_PASS = 16


def eval_prompts(job: RLHFJob) -> tuple[datasets.Dataset, PromptDataset]:
    """Held-out prompts and their spec (column, truncation side): `evaluation.prompts`, else
    PPO's held-out prompts."""
    evaluation = job.spec.stages.evaluation
    if evaluation.prompts is not None:
        columns = {"promptField": evaluation.prompts.prompt_field}
        rows = load_eval_rows(evaluation.prompts, f"{FIELD}.prompts", columns, job.spec.storage)
        return rows, evaluation.prompts
    from rlhf_trainer.stages.ppo import prompt_split

    held_out = prompt_split(job).held_out
    if held_out is None:
        raise UserError(
            f"{FIELD}.prompts: not set, and spec.stages.ppo.prompts holds nothing out "
            "(evalFraction 0, no testSplit); set one of them."
        )
    return held_out, job.spec.stages.ppo.prompts


def chosen_prompts(job: RLHFJob, rows: datasets.Dataset, world_size: int) -> datasets.Dataset:
    """The `numPrompts` rows evaluated: a seeded shuffle of the held-out rows (never the first
    N: a split sorted by label would give one class), a multiple of the workers (equal shares:
    ZeRO-3 needs equal passes)."""
    count = min(job.spec.stages.evaluation.num_prompts, len(rows))
    return sample_rows(rows, count - count % world_size, job.spec.seed)


def preflight(job: RLHFJob, check_upstream: bool = True) -> None:
    rows, _ = eval_prompts(job)
    from rlhf_operator.api.spec import ranks

    if len(rows) < ranks(job.spec):
        raise UserError(
            f"{FIELD}.prompts: {len(rows)} prompts for {ranks(job.spec)} "
            "workers; give at least one prompt per worker."
        )
    if job.spec.stages.evaluation.num_prompts < job.spec.cluster.workers.replicas:
        raise UserError(
            f"{FIELD}.numPrompts ({job.spec.stages.evaluation.num_prompts}) is below the "
            f"{job.spec.cluster.workers.replicas} workers; evaluate at least one prompt per worker."
        )
    if check_upstream:
        check_model_path(*policy_source(job))
        check_model_path(*tuned_source(job))
    reward_uri, reward_field = reward_source(job)
    if check_upstream or reward_field.endswith(".model"):
        check_model_path(reward_uri, reward_field)
    check_positive_label(job)
    judges.check(job.spec.stages.evaluation.judge)
    if (job.spec.stages.evaluation.rollout or job.spec.stages.ppo.rollout).engine == "vllm":
        from rlhf_trainer.rollout.vllm import check_installed

        check_installed(rollout_field(job))


def rollout_field(job: RLHFJob) -> str:
    """The spec field that chose evaluation's engine (its own, else PPO's)."""
    if job.spec.stages.evaluation.rollout is not None:
        return f"{FIELD}.rollout.engine"
    return "spec.stages.ppo.rollout.engine"


def _compare(results: list[dict[str, Any]], sft_key: str, rlhf_key: str) -> tuple[float, ...]:
    """(win rate, mean SFT score, mean RLHF score, prompts improved) of two score columns."""
    wins = comparisons = improved = 0
    sft_total = rlhf_total = 0.0
    for row in results:
        sft, rlhf = row[sft_key], row[rlhf_key]
        wins += sum(r > s for s, r in zip(sft, rlhf, strict=True))
        comparisons += len(sft)
        improved += sum(rlhf) / len(rlhf) > sum(sft) / len(sft)
        sft_total += sum(sft)
        rlhf_total += sum(rlhf)
    return (
        wins / comparisons,
        sft_total / comparisons,
        rlhf_total / comparisons,
        improved / len(results),
    )


def summarize(results: list[dict[str, Any]]) -> dict[str, float]:
    """The evaluation metrics from per-prompt results ({"sft_rewards", "rlhf_rewards"}, and
    {"sft_judge", "rlhf_judge"} when a judge scored them)."""
    names = ("win_rate", "mean_reward_sft", "mean_reward_rlhf", "prompts_improved_fraction")
    metrics = dict(zip(names, _compare(results, "sft_rewards", "rlhf_rewards"), strict=True))
    if results and "sft_judge" in results[0]:
        names = ("judge_win_rate", "judge_mean_sft", "judge_mean_rlhf")
        names += ("judge_prompts_improved_fraction",)
        metrics |= dict(zip(names, _compare(results, "sft_judge", "rlhf_judge"), strict=True))
    return metrics


def write_examples(
    artifact, results: list[dict[str, Any]], metrics: dict[str, float], judge: str | None = None
) -> None:
    judged = bool(results) and "sft_judge" in results[0]
    artifact.local_dir.mkdir(parents=True, exist_ok=True)
    with artifact.path(EXAMPLES_CSV).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        header = ["prompt", "sample", "sft_response", "sft_reward", "rlhf_response", "rlhf_reward"]
        writer.writerow(header + (["sft_judge", "rlhf_judge"] if judged else []))
        for row in results:
            for j in range(len(row["sft"])):
                cells = [
                    row["prompt"],
                    j,
                    row["sft"][j],
                    f"{row['sft_rewards'][j]:.4f}",
                    row["rlhf"][j],
                    f"{row['rlhf_rewards'][j]:.4f}",
                ]
                if judged:
                    cells += [f"{row['sft_judge'][j]:.4f}", f"{row['rlhf_judge'][j]:.4f}"]
                writer.writerow(cells)
    by_judge = (
        f" · by the judge ({judge}): win rate {metrics['judge_win_rate']:.3f}, mean SFT "
        f"{metrics['judge_mean_sft']:.3f} → RLHF {metrics['judge_mean_rlhf']:.3f}, prompts "
        f"improved {metrics['judge_prompts_improved_fraction']:.3f}"
        if judged
        else ""
    )
    lines = [
        "# SFT vs RLHF (PPO) on held-out prompts",
        "",
        f"win rate {metrics['win_rate']:.3f} · mean reward SFT {metrics['mean_reward_sft']:.3f}"
        f" → RLHF {metrics['mean_reward_rlhf']:.3f} · prompts improved "
        f"{metrics['prompts_improved_fraction']:.3f}{by_judge} ({len(results)} prompts; first "
        f"sample of the first {min(MARKDOWN_PROMPTS, len(results))} shown, all in {EXAMPLES_CSV})",
        "",
        "| prompt | SFT response | reward | RLHF response | reward |"
        + (" judge SFT | judge RLHF |" if judged else ""),
        "|---|---|---:|---|---:|" + ("---:|---:|" if judged else ""),
    ]
    for row in results[:MARKDOWN_PROMPTS]:
        cells = [
            row["prompt"],
            row["sft"][0],
            f"{row['sft_rewards'][0]:.3f}",
            row["rlhf"][0],
            f"{row['rlhf_rewards'][0]:.3f}",
        ]
        if judged:
            cells += [f"{row['sft_judge'][0]:.3f}", f"{row['rlhf_judge'][0]:.3f}"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    artifact.path(EXAMPLES_MD).write_text("\n".join(lines) + "\n", encoding="utf-8")
    artifact.publish(EXAMPLES_CSV)
    artifact.publish(EXAMPLES_MD)


def train_loop(config: dict[str, Any]) -> None:
    import torch

    from rlhf_trainer.batches import prompt_ids
    from rlhf_trainer.generation import decode
    from rlhf_trainer.models import (
        hidden_size,
        load_causal_lm,
        load_tokenizer,
        model_revision,
        tokenizer_source,
    )
    from rlhf_trainer.reward_model import (
        RewardScorer,
        decode_sequences,
        load_reward_head,
        load_reward_tokenizer,
        max_length,
    )
    from rlhf_trainer.rollout import Sampling, make_engine
    from rlhf_trainer.worker import StageWorker, gather_objects

    worker = StageWorker.start(config)
    job = worker.job
    spec = job.spec
    evaluation = spec.stages.evaluation
    judge_spec = evaluation.judge
    generation = evaluation.generation or spec.stages.ppo.generation
    with worker.timed("data"):
        rows, prompts_spec = eval_prompts(job)
        rows = chosen_prompts(job, rows, worker.world_size)
        mine = list(range(len(rows)))[worker.rank :: worker.world_size]
    (sft_uri, sft_field), (reward_uri, reward_field) = policy_source(job), reward_source(job)
    rlhf_uri, rlhf_field = tuned_source(job)
    sft_revision = model_revision(job, sft_uri)
    loaders = {
        "sft": (
            sft_uri,
            sft_field,
            lambda dtype: load_causal_lm(sft_uri, sft_field, sft_revision, dtype=dtype),
        ),
        "rlhf": (
            rlhf_uri,
            rlhf_field,
            lambda dtype: load_causal_lm(rlhf_uri, rlhf_field, dtype=dtype),
        ),
        "reward": (
            reward_uri,
            reward_field,
            lambda dtype: load_reward_head(
                reward_uri, reward_field, spec.stages.reward.positive_label, dtype
            ),
        ),
    }
    lexicon = None
    if judge_spec is not None and judge_spec.model:
        judge_field = f"{judges.FIELD}.model"
        loaders["judge"] = (
            judge_spec.model,
            judge_field,
            lambda _dtype: judges.load_model(judge_spec),
        )  # the judge keeps its own precision
    elif judge_spec is not None:
        lexicon = judges.LexiconJudge(judges.read_lexicon(judge_spec.lexicon))
    with worker.timed("model_load"):
        tokenizer = load_tokenizer(*tokenizer_source(job, sft_uri, sft_field))
    models, engines = {}, {}
    for name, (uri, field, load) in loaders.items():  # each engine made before the next load
        # frozen: ZeRO-3 shards, any other stage replicates
        _, models[name], engines[name] = worker.engine(
            hidden_size(uri, field, model_revision(job, uri)), load
        )
    device = engines["sft"].device

    def scorer(name: str, uri: str, field: str) -> RewardScorer:
        own = load_reward_tokenizer(uri, field, tokenizer)
        limit = max_length(own, models[name].model) if own else None
        return RewardScorer(engines[name], tokenizer, own, limit)

    scorers = {"reward": scorer("reward", reward_uri, reward_field)}
    if "judge" in loaders:
        scorers["judge"] = scorer("judge", judge_spec.model, f"{judges.FIELD}.model")
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
    k = evaluation.samples_per_prompt
    with worker.timed("evaluate"), torch.no_grad():
        for index, chunk in enumerate(passes):
            texts = rows[chunk][prompts_spec.prompt_field]
            repeated = [t for t in texts for _ in range(k)]
            ids = prompt_ids(
                tokenizer, repeated, spec.stages.ppo.max_prompt_len, prompts_spec.truncation_side
            )
            outputs = {}
            for policy in ("sft", "rlhf"):
                worker.sampling_seed(2 * index + (policy == "rlhf"))
                sampler.load_weights(engines[policy])
                samples = sampler.generate(ids, Sampling.of(generation))
                seq = (samples.input_ids, samples.attention_mask)
                outputs[policy] = {
                    "responses": [decode(tokenizer, r) for r in samples.responses],
                    "rewards": scorers["reward"](*seq).tolist(),
                }
                if "judge" in scorers:
                    outputs[policy]["judge"] = scorers["judge"](*seq).tolist()
                elif lexicon is not None:
                    outputs[policy]["judge"] = lexicon.score_texts(
                        decode_sequences(tokenizer, *seq)
                    )
            for i, text in enumerate(texts):
                mine_of = slice(i * k, (i + 1) * k)
                row = {"index": chunk[i], "prompt": text}
                for policy in ("sft", "rlhf"):
                    row[policy] = outputs[policy]["responses"][mine_of]
                    row[f"{policy}_rewards"] = outputs[policy]["rewards"][mine_of]
                    if "judge" in outputs[policy]:
                        row[f"{policy}_judge"] = outputs[policy]["judge"][mine_of]
                results.append(row)
            worker.reporter.update(index + 1)
    everyone = sorted(
        (row for part in gather_objects(results) for row in part), key=lambda row: row["index"]
    )
    metrics = summarize(everyone)
    if worker.is_main:
        name = judge_spec.display_name() if judge_spec is not None else None
        write_examples(worker.artifact, everyone, metrics, name)
    worker.log(len(passes), metrics)
    worker.finish(metrics, steps_run=len(passes), total_steps=len(passes))
