"""Peak memory per PPO worker, measured beside `rlhf plan`'s estimate for the same job.

    python bench/memory.py [--configs z0-fp32,z3-bf16-lora,...] [--steps 2] [--workers 2]

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    args = parser.parse_args(argv)
    ensure_tiny()
    from rlhf_trainer.launcher import run_stage
    from rlhf_trainer.plan import GiB, plan_stages

    work = Path(tempfile.mkdtemp(prefix="rlhf-memory-"))
    model_dir = medium_model(work / "policy", args.embd, args.layers)
    base = base_manifest(work / "unused", steps=1, batch=8, ppo_steps=args.steps)
    rows = []
    print(
        f"Peak RSS per PPO worker, {args.workers} CPU workers, random GPT-2 "
        f"{args.embd}x{args.layers}, {args.steps} iterations; rlhf plan's per-worker estimate",
        flush=True,
    )
    print(f"  {'config':<14}{'measured':>12}{'rlhf plan':>12}{'plan/measured':>15}", flush=True)
    for name in args.configs.split(","):
        storage = work / name
        for stage, source in (("sft", model_dir), ("reward", None)):
            target = storage / "bench" / stage / "model"
            if source is None:
                reward_model(model_dir, target)
            else:
                shutil.copytree(source, target)
        manifest = manifest_for(base, model_dir, storage, CONFIGS[name], args)
        manifest["spec"]["stages"]["sft"]["enabled"] = True  # the policy is SFT's artifact
        job = job_from(manifest)
        (ppo,) = [p for p in plan_stages(job) if p.stage == "ppo"]
        with WorkerMemory() as memory:
            run_stage(job, "ppo")
        measured = max(memory.peaks.values(), default=0)
        ratio = ppo.gpu_bytes / measured if measured else float("nan")
        verdict = "within 25%" if abs(ratio - 1) <= 0.25 else "OFF"
        rows.append((name, measured, ppo.gpu_bytes, ratio))
        print(
            f"  {name:<14}{measured / MIB:>9,.0f} MiB{ppo.gpu_bytes / MIB:>9,.0f} MiB"
            f"{ratio:>14.2f}  {verdict}",
            flush=True,
        )
        shutil.rmtree(storage, ignore_errors=True)
    print(f"  (plan parts of the last: { {k: round(v / GiB, 2) for k, v in ppo.parts.items()} })")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
