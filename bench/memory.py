"""Peak memory per PPO worker, measured beside `rlhf plan`'s estimate for the same job.

    python bench/memory.py [--configs z0-fp32,z3-bf16-lora,...] [--steps 2] [--workers 2]
        [--results rows.jsonl]  # append each row there; the table printed last holds them all
    python bench/memory.py --configs "" --results rows.jsonl  # print the table of a file

The model is the 85M random GPT-2 of bench/trainer_throughput.py (768 wide, 12 layers, the tiny
tokenizer), standing in as the SFT model and, with a one-output head, as the reward model. PPO
holds all four models (policy, value, reference, reward; with LoRA the reference is the policy
with its adapters off), so it is the stage with the largest footprint. Each configuration runs
`--steps` PPO iterations on `--workers` CPU workers (ZeRO-0/2/3 x fp32/bf16 x full/LoRA) and
prints the largest worker's peak RSS (psutil, every 50 ms) beside `rlhf plan`'s per-worker
figure for the same manifest, and their ratio (goal: the estimate within +-25 %).

On CPU workers `rlhf plan`'s per-worker figure is host memory: model states + activations +
the process overhead (plan.HOST_PROCESS_BYTES). RSS also counts heap glibc keeps after frees;
set MALLOC_TRIM_THRESHOLD_=0 MALLOC_MMAP_THRESHOLD_=65536 to see what tensors hold.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from trainer_throughput import MIB, WorkerMemory, base_manifest, ensure_tiny, job_from, medium_model

CONFIGS = {
    f"z{zero}-{precision}{'-lora' if lora else ''}": (zero, precision, lora)
    for zero in (0, 2, 3)
    for precision in ("fp32", "bf16")
    for lora in (False, True)
}


def reward_model(policy_dir: Path, out: Path) -> Path:
    """The policy's backbone with a fresh one-output head: a reward model artifact."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1)
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(policy_dir / name, out / name)
    return out


def manifest_for(base: dict[str, Any], model_dir: Path, storage: Path, config: tuple, args):
    zero, precision, lora = config
    manifest = copy.deepcopy(base)
    spec = manifest["spec"]
    spec["model"]["base"] = str(model_dir)
    spec["storage"]["uri"] = str(storage)
    spec["cluster"]["workers"] = {"replicas": args.workers, "gpusPerWorker": 0}
    spec["parallelism"].update(zeroStage=zero, precision=precision, offload="none")
    if lora:
        spec["parallelism"]["lora"] = {"rank": 16}
    ppo = spec["stages"]["ppo"]
    ppo.update(steps=args.steps, rolloutBatchSize=8 * args.workers, ppoEpochs=1)
    ppo["generation"]["maxNewTokens"] = 20
    return manifest


def phases(result: Any, memory: WorkerMemory) -> dict[str, float]:
    """The largest worker's RSS when its imports and data were done (before any model) and when
    its models were loaded and wrapped by DeepSpeed (before the first rollout), from rank 0's
    block timings (run.json)."""
    run = json.loads((Path(result.artifact) / "run.json").read_text())
    end, out = run["started_at"], {}
    for key, blocks in (
        ("before_models_mib", ("imports", "data")),
        ("models_loaded_mib", ("model_load", "deepspeed_init")),
    ):
        end += sum(run["timings"].get(block, 0.0) for block in blocks)
        out[key] = round(memory.at(end) / MIB, 1)
    return out


HEADER = f"  {'config':<14}{'measured':>12}{'rlhf plan':>12}{'plan/measured':>15}"


def line(row: dict[str, Any], plan: float, parts: dict[str, float]) -> str:
    ratio = plan / row["measured_mib"] if row["measured_mib"] else float("nan")
    verdict = "within 25%" if abs(ratio - 1) <= 0.25 else "OFF"
    return (
        f"  {row['config']:<14}{row['measured_mib']:>9,.0f} MiB{plan:>9,.0f} MiB"
        f"{ratio:>14.2f}  {verdict}   plan: {parts}"
    )


def print_table(rows: list[dict[str, Any]], model_dir: Path, args: argparse.Namespace) -> None:
    """One line per configuration (grid order; a configuration measured twice: its last row),
    beside the plan of today's plan.py."""
    latest = {row["config"]: row for row in rows}
    print(HEADER, flush=True)
    for name in [n for n in CONFIGS if n in latest]:
        print(line(latest[name], *plan_mib(name, model_dir, args)), flush=True)


def job_for(name: str, model_dir: Path, storage: Path, args: argparse.Namespace):
    """The PPO job of configuration `name`, storing under `storage`."""
    base = base_manifest(storage / "unused", steps=1, batch=8, ppo_steps=args.steps)
    manifest = manifest_for(base, model_dir, storage, CONFIGS[name], args)
    manifest["spec"]["stages"]["sft"]["enabled"] = True  # the policy is SFT's artifact
    return job_from(manifest)


def plan_mib(name: str, model_dir: Path, args: argparse.Namespace) -> tuple[float, dict]:
    """`rlhf plan`'s per-worker PPO figure for configuration `name` and its parts (MiB)."""
    from rlhf_trainer.plan import plan_stages

    job = job_for(name, model_dir, model_dir.parent / name, args)
    (ppo,) = [p for p in plan_stages(job) if p.stage == "ppo"]
    return ppo.gpu_bytes / MIB, {k: round(v / MIB, 1) for k, v in ppo.parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument(
        "--results",
        type=Path,
        help="JSON-lines file each measured row is appended to; the closing table prints every "
        "configuration in it (beside the current plan), so a grid measured in several runs is "
        "shown whole",
    )
    args = parser.parse_args(argv)
    names = [name for name in args.configs.split(",") if name]  # "": only print --results
    if unknown := [name for name in names if name not in CONFIGS]:
        parser.error(f"--configs: unknown {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    ensure_tiny()
    from rlhf_trainer.launcher import run_stage

    work = Path(tempfile.mkdtemp(prefix="rlhf-memory-"))
    model_dir = medium_model(work / "policy", args.embd, args.layers)
    rows = []
    print(
        f"Peak RSS per PPO worker, {args.workers} CPU workers, random GPT-2 "
        f"{args.embd}x{args.layers}, {args.steps} iterations; rlhf plan's per-worker estimate",
        flush=True,
    )
    print(HEADER, flush=True)
    for name in names:
        storage = work / name
        for stage, source in (("sft", model_dir), ("reward", None)):
            target = storage / "bench" / stage / "model"
            if source is None:
                reward_model(model_dir, target)
            else:
                shutil.copytree(source, target)
        job = job_for(name, model_dir, storage, args)
        with WorkerMemory() as memory:
            result = run_stage(job, "ppo")
        measured = max(memory.peaks.values(), default=0)
        row = {
            "config": name,
            "measured_mib": round(measured / MIB, 1),
            **phases(result, memory),
            "workers": args.workers,
            "steps": args.steps,
            "model": f"{args.embd}x{args.layers}",
        }
        print(line(row, *plan_mib(name, model_dir, args)), flush=True)
        rows.append(row)
        if args.results:
            with args.results.open("a") as out:
                out.write(json.dumps(row) + "\n")
        shutil.rmtree(storage, ignore_errors=True)
    if args.results:
        rows = [json.loads(text) for text in args.results.read_text().splitlines() if text]
    print(f"\nAll configurations{f' in {args.results}' if args.results else ''}:", flush=True)
    print_table(rows, model_dir, args)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
