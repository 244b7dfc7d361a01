"""The tiny job under each alignment algorithm, one table: PPO, GRPO, RLOO, REINFORCE++ and DPO.

    python bench/algorithms.py [--steps 30] [--only grpo,dpo] [--workdir DIR]

One run, one machine. SFT and the reward model are trained once (examples/tiny, made here by
examples/make_tiny.py) and shared: every algorithm starts from the same SFT policy, and the
same reward model scores every evaluation. Per algorithm the RL stage (or DPO) runs, then the
evaluation stage (SFT vs the tuned policy on held-out prompts).

Columns:
- wall: the RL / DPO stage's wall time (worker group start, model load, DeepSpeed init,
  training, save), then the compute alone (the worker's `train` block).
- peak RSS/worker: the largest resident set of any Ray Train worker process during the stage
  (psutil, every 50 ms). On this tiny model ~0.5 GiB of every worker is torch + Ray, so the
  value model PPO builds shows mostly in the next column.
- models: engines each worker holds (trained + frozen); "value states": what PPO's value model
  costs per worker in fp32 training state (weights, gradients, two Adam moments: 16 bytes a
  parameter, ZeRO-0 sizes) and the critic-free algorithms do not build.
- win / improved, RM and true: the evaluation stage's win rate and fraction of prompts improved
  by the reward model (RM) and by the independent judge, the task's true sentiment count (true;
  examples/tiny/judge_lexicon.json): the issue's targets 0.8 and 0.9 by both. A win by the
  reward model alone would be reward hacking.
- KL: KL(policy || SFT) per response, summed over tokens (k1), of the last iteration's
  rollouts (RL) or of the DPO policy's samples of held-out prompts.
Rollouts per iteration are equal across the RL rows (rolloutBatchSize x samplesPerPrompt).
Figures, not verdicts: nothing here fails on time.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "trainer"))  # tiny_jobs: the tiny example's manifests
MIB = 1024**2
TRAINING_BYTES_PER_PARAM = 16  # fp32 weights + gradients + Adam's two moments
CRITIC_FIELDS = ("valueLearningRate", "valueClipRange", "valueLossCoef", "lam")
GROUP = 4

# What each row changes in the tiny manifest's RL stage. 64 rollouts per iteration everywhere.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "ppo": {"algorithm": "ppo", "rolloutBatchSize": 64},
    "grpo": {"algorithm": "grpo", "samplesPerPrompt": GROUP, "rolloutBatchSize": 64 // GROUP},
    "rloo": {"algorithm": "rloo", "samplesPerPrompt": GROUP, "rolloutBatchSize": 64 // GROUP},
    "reinforce_pp": {"algorithm": "reinforce_pp", "rolloutBatchSize": 64},
}
DPO = {"epochs": 3, "batchSize": 32, "learningRate": 1.0e-3, "beta": 0.1, "maxSeqLen": 64}


def rl_manifest(base: dict[str, Any], name: str, steps: int) -> dict[str, Any]:
    manifest = copy.deepcopy(base)
    ppo = manifest["spec"]["stages"]["ppo"]
    ppo.update(ALGORITHMS[name], steps=steps)
    if name != "ppo":
        for field in CRITIC_FIELDS:
            ppo.pop(field, None)
    return manifest


def dpo_manifest(base: dict[str, Any], reward_model: Path, preferences: Path) -> dict[str, Any]:
    manifest = copy.deepcopy(base)
    stages = manifest["spec"]["stages"]
    stages["reward"] = {"enabled": False, "model": str(reward_model)}  # evaluation's judge
    stages["ppo"]["enabled"] = False
    stages["dpo"] = {"dataset": {"uri": str(preferences), "evalFraction": 0.1}, **DPO}
    return manifest


def parse(manifest: dict[str, Any]):
    from rlhf_trainer.jobspec import parse_job, with_absolute_paths

    return with_absolute_paths(parse_job(manifest))


def value_model_mib(reward_model: Path) -> float:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(reward_model), num_labels=1)
    return sum(p.numel() for p in model.parameters()) * TRAINING_BYTES_PER_PARAM / MIB


def run_row(name: str, manifest: dict[str, Any], shared: Path, storage: Path) -> dict[str, Any]:
    """Copy the shared SFT (and reward) models in, run the RL/DPO stage and the evaluation."""
    from rlhf_trainer.launcher import run_stage
    from trainer_throughput import WorkerMemory  # bench/ is on sys.path when run

    job_dir = storage / manifest["metadata"]["name"]
    for stage in ("sft", "reward"):
        shutil.copytree(shared / stage / "model", job_dir / stage / "model")
    job = parse(manifest)
    stage = "dpo" if name == "dpo" else "ppo"
    with WorkerMemory() as memory:
        result = run_stage(job, stage)
    evaluation = run_stage(job, "evaluation").metrics
    models = "policy + ref" if name == "dpo" else "policy + ref + RM"
    if name == "ppo":
        models = "policy + value + ref + RM"
    return {
        "name": name,
        "wall": result.seconds,
        "compute": result.timings.get("train_s", 0.0),
        "rss": max(memory.peaks.values(), default=0) / MIB,
        "models": models,
        "win_rate": evaluation["win_rate"],
        "improved": evaluation["prompts_improved_fraction"],
        "judge_win_rate": evaluation["judge_win_rate"],
        "judge_improved": evaluation["judge_prompts_improved_fraction"],
        "kl": result.metrics.get("kl", float("nan")),
        "steps": result.total_steps,
    }


def table(rows: list[dict[str, Any]], value_mib: float) -> str:
    head = (
        f"{'algorithm':<13} {'steps':>5} {'wall s':>7} {'compute s':>9} {'peak RSS/worker':>16} "
        f"{'value states':>12} {'win RM':>6} {'impr. RM':>8} {'win true':>8} {'impr. true':>10} "
        f"{'KL':>7}  models/worker"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        value = f"{value_mib:.1f} MiB" if row["name"] == "ppo" else "none"
        lines.append(
            f"{row['name']:<13} {row['steps']:>5} {row['wall']:>7.1f} {row['compute']:>9.1f} "
            f"{row['rss']:>12.0f} MiB {value:>12} {row['win_rate']:>6.3f} {row['improved']:>8.3f} "
            f"{row['judge_win_rate']:>8.3f} {row['judge_improved']:>10.3f} {row['kl']:>7.2f}  "
            f"{row['models']}"
        )
    lines.append(
        "targets (tiny task): win rate >= 0.8 and prompts improved >= 0.9 by the reward model "
        "(RM) and by the true sentiment count (true), KL finite"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="RL iterations per algorithm")
    parser.add_argument("--only", default="ppo,grpo,rloo,reinforce_pp,dpo")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "bench"))
    from rlhf_trainer.launcher import ensure_ray, run_stage
    from tiny_jobs import demo_manifest, load_make_tiny

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rlhf-algorithms-"))
    tiny = work / "tiny"
    if not (tiny / "model").exists():
        load_make_tiny().main(["--out", str(tiny)])
    base = demo_manifest(tiny, work / "shared")
    name = base["metadata"]["name"]
    shared = work / "shared" / name
    ensure_ray(attach=False)
    started = time.perf_counter()
    if not (shared / "reward" / "model").exists():
        job = parse(base)
        for stage in ("sft", "reward"):
            print(f"shared {stage}: {run_stage(job, stage).seconds:.1f}s", flush=True)
    rows = []
    for algorithm in args.only.split(","):
        storage = work / algorithm
        shutil.rmtree(storage, ignore_errors=True)
        if algorithm == "dpo":
            manifest = dpo_manifest(base, shared / "reward" / "model", tiny / "preferences.jsonl")
        else:
            manifest = rl_manifest(base, algorithm, args.steps)
        manifest["spec"]["storage"]["uri"] = str(storage)
        rows.append(run_row(algorithm, manifest, shared, storage))
        print(table(rows[-1:], 0.0).splitlines()[2], flush=True)
    print()
    print(f"tiny job, 2 workers x 1 CPU, ZeRO-2 fp32; total {time.perf_counter() - started:.0f}s")
    print(table(rows, value_model_mib(shared / "reward" / "model")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
