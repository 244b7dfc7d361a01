"""Trainer throughput: our SFT and reward stages beside TRL's SFTTrainer and RewardTrainer, PPO
rollout speed, and peak memory per worker at ZeRO 0 vs ZeRO 3.

    python bench/trainer_throughput.py [--steps 40] [--batch-size 16] [--ppo-steps 4]
                                       [--skip-trl] [--skip-ppo] [--skip-memory] [--only-memory]

One run, one machine, the same tiny model (examples/tiny, made by examples/make_tiny.py), the
same data, batch size and number of optimizer steps for both sides; one worker with one CPU
thread each (Ray gives a 1-CPU worker OMP_NUM_THREADS=1; TRL runs with torch.set_num_threads(1)).

Figures, not verdicts: it prints each figure beside its target and never fails on timing.
- "loop" throughput: tokens (pairs) of the optimizer steps / time of the training loop only
  (ours: the worker's `train` block; TRL: `trainer.train()`). Both tokenize on the way (TRL up
  front, outside the loop; ours per batch, inside it). Two clocks: CPU seconds of the training
  thread (the verdict: robust when other processes share the CPU) and wall seconds.
- Ray's workers run at nice 0 here (Ray's default is 15, which on a shared machine hands the
  CPU to any other process first; TRL runs at nice 0 in this process).
- "end to end": the whole stage call (ours: Ray start, worker group, DeepSpeed init, held-out
  evaluation before and after, save) vs. building the TRL trainer + train + save.
- memory: peak RSS of each Ray Train worker process (sampled every 50 ms with psutil) for SFT
  of a bigger random GPT-2 (so model states are not lost in the ~0.5 GiB of torch + Ray per
  process), 2 workers, ZeRO 0 vs 3. RSS also counts heap that glibc keeps after frees, and
  ZeRO-3's per-module gather/scatter buffers fragment it (RSS creeps up step after step); run
  with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 in the environment (Ray's workers
  inherit it) to see the memory the tensors really hold.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from trl_baseline import read_jsonl, trl_reward, trl_sft  # bench/ is on sys.path when run

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny"
MANIFEST = ROOT / "examples" / "tiny-local.yaml"
TARGET_RATIO = 1.0  # our loop throughput / TRL's, on the same model, data, batch and steps
MIB = 1024**2
# Ray starts its workers at nice 15 (RAY_worker_niceness) so that its own daemons win the CPU.
# TRL runs in this process at nice 0: on a shared machine the comparison would then measure the
# scheduler, not the trainers. Ray reads this when it starts (run_stage starts it here).
RAY_WORKER_NICENESS = "0"


# ---------------------------------------------------------------------- setup


def ensure_tiny() -> None:
    if not (TINY / "model" / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny.py")], check=True)


def base_manifest(storage: Path, steps: int, batch: int, ppo_steps: int) -> dict[str, Any]:
    """The tiny example's manifest on one 1-CPU worker, ZeRO 0, sized for the benchmark."""
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["metadata"]["name"] = "bench"
    spec = manifest["spec"]
    spec["model"]["base"] = str(TINY / "model")
    spec["storage"]["uri"] = str(storage)
    stages = spec["stages"]
    for name in ("sft", "reward"):
        stage = stages[name]
        stage["dataset"]["uri"] = str(TINY / Path(stage["dataset"]["uri"]).name)
        stage.update(
            batchSize=batch, epochs=100, maxSteps=steps, warmupRatio=0.0, checkpointEverySteps=10**6
        )
    stages["ppo"]["prompts"]["uri"] = str(TINY / "prompts.jsonl")
    stages["ppo"].update(steps=ppo_steps, checkpointEverySteps=10**6)
    stages["evaluation"] = {"enabled": False}
    spec["cluster"]["workers"] = {"replicas": 1, "gpusPerWorker": 0}
    spec["parallelism"]["zeroStage"] = 0
    return manifest


def job_from(manifest: dict[str, Any]):
    from rlhf_operator.api import RLHFJob

    return RLHFJob.model_validate(manifest)


def token_counts(tokenizer_dir: Path) -> tuple[float, float]:
    """Mean non-padding tokens of one SFT example and of one preference pair (both sides)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))

    def length(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    sft = [length(r["prompt"]) + length(r["response"]) + 1 for r in read_jsonl(TINY / "sft.jsonl")]
    pairs = [
        2 * length(r["prompt"]) + length(r["chosen"]) + length(r["rejected"]) + 2
        for r in read_jsonl(TINY / "preferences.jsonl")
    ]
    return statistics.fmean(sft), statistics.fmean(pairs)


# ---------------------------------------------------------------------- memory sampling


class WorkerMemory:
    """Peak RSS of every Ray Train worker process under this one, sampled in a thread."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peaks: dict[int, int] = {}
        self.series: list[tuple[float, int]] = []  # (unix time, largest worker RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            largest = 0
            for proc in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "TrainWorker" in " ".join(proc.cmdline()):
                        rss = proc.memory_info().rss
                        self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
                        largest = max(largest, rss)
            if largest:
                self.series.append((time.time(), largest))
            self._stop.wait(self.interval_s)

    def at(self, when: float) -> int:
        """Largest worker RSS sampled closest to `when` (unix time); 0 without samples."""
        return min(self.series, key=lambda sample: abs(sample[0] - when), default=(0, 0))[1]


# ---------------------------------------------------------------------- ours


def run_ours(job, stage: str) -> tuple[Any, dict[int, int]]:
    """Run one stage with `run_stage`; its result (CPU timings added) and peak RSS per worker.

    The result also gets `rss_after_init_mib`: the largest worker's RSS when DeepSpeed's
    initialisation ended (model loaded and, under ZeRO-3, partitioned).
    """
    from rlhf_trainer.launcher import run_stage

    with WorkerMemory() as memory:
        result = run_stage(job, stage)
    # CPU seconds of the worker's training thread per block (rank 0's run.json).
    run = json.loads((Path(result.artifact) / "run.json").read_text())
    result.timings.update({f"{k}_cpu_s": v for k, v in run.get("cpu_timings", {}).items()})
    blocks = ("imports", "data", "model_load", "deepspeed_init")
    init_end = run["started_at"] + sum(run["timings"].get(b, 0.0) for b in blocks)
    result.rss_after_init_mib = memory.at(init_end) / MIB
    return result, memory.peaks


# ---------------------------------------------------------------------- memory model


def medium_model(directory: Path, n_embd: int, n_layer: int) -> Path:
    """A random GPT-2 with the tiny tokenizer, big enough for model states to show in RSS."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = json.loads((TINY / "model" / "config.json").read_text())
    config = GPT2Config(
        vocab_size=tiny["vocab_size"],
        n_positions=tiny["n_positions"],
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=8,
        bos_token_id=tiny["bos_token_id"],
        eos_token_id=tiny["eos_token_id"],
        pad_token_id=tiny["pad_token_id"],
    )
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY / "model" / name, directory / name)
    return directory


def parameters(directory: Path) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118


# ---------------------------------------------------------------------- report


def ratio_line(name: str, ours: float, theirs: float, unit: str) -> str:
    ratio = ours / theirs if theirs else float("nan")
    verdict = "meets" if ratio >= TARGET_RATIO else "below"
    return (
        f"  {name:<30} ours {ours:>10,.0f} {unit}   TRL {theirs:>10,.0f} {unit}   "
        f"ratio {ratio:5.2f}x   (target >= {TARGET_RATIO:.1f}x: {verdict})"
    )


def breakdown(result) -> str:
    keys = (
        "ray_start_s",
        "worker_group_start_s",
        "imports_s",
        "data_s",
        "model_load_s",
        "deepspeed_init_s",
        "eval_s",
        "train_s",
        "rollout_s",
        "update_s",
        "save_s",
        "teardown_s",
    )
    parts = [f"{k[:-2]} {result.timings[k]:.2f}" for k in keys if k in result.timings]
    return "    where the time went (s): " + ", ".join(parts)


def mean_history_loss(result) -> float:
    losses = [row["loss"] for row in result.history if "loss" in row]
    return statistics.fmean(losses) if losses else float("nan")


def _span(values: list[float]) -> str:
    return f"{1000 * min(values):.0f}-{1000 * max(values):.0f} ms"


def supervised_section(
    ours: list[tuple[Any, dict[int, int]]],
    trl: list[dict[str, float]],
    steps: int,
    work: float,
    label: str,
    unit: str,
) -> list[str]:
    """Lines for one supervised stage: throughput ratios, per step, end to end, loss, memory.

    Two clocks: CPU seconds of the training thread (robust on a shared CPU: the verdict) and
    wall seconds (what a user waits; inflated by whatever else runs on the machine).
    """
    best, memory = min(ours, key=lambda run: run[0].timings["train_cpu_s"])
    fastest = min(r.timings["train_s"] for r, _ in ours)
    lines = []
    if trl:
        theirs = min(trl, key=lambda run: run["loop_cpu_s"])
        theirs_wall = min(run["loop_s"] for run in trl)
        lines.append(
            ratio_line(
                f"{label} (CPU time)",
                work / best.timings["train_cpu_s"],
                work / theirs["loop_cpu_s"],
                unit,
            )
        )
        spread = (
            f"CPU s/step over {len(ours)} runs: ours "
            f"{_span([r.timings['train_cpu_s'] / steps for r, _ in ours])}, TRL "
            f"{_span([r['loop_cpu_s'] / steps for r in trl])}"
        )
        wall = (work / fastest) / (work / theirs_wall)
        lines.append(
            f"  {label + ' (wall)':<30} ours {work / fastest:10,.0f} {unit}   "
            f"TRL {work / theirs_wall:10,.0f} {unit}   ratio {wall:5.2f}x   (shared CPU: noisy)"
        )
        lines.append(
            f"  {'CPU per step':<30} ours {1000 * best.timings['train_cpu_s'] / steps:8.1f} ms"
            f"      TRL {1000 * theirs['loop_cpu_s'] / steps:8.1f} ms   ({spread})"
        )
        lines.append(
            f"  {'end to end (wall)':<30} ours {min(r.seconds for r, _ in ours):8.1f} s       "
            f"TRL {min(r['total_s'] for r in trl):8.1f} s   "
            "(ours: + Ray worker group start, 2 held-out evaluations)"
        )
        lines.append(
            f"  {'mean train loss':<30} ours {mean_history_loss(best):8.3f}         "
            f"TRL {theirs['loss']:8.3f}   (same work: similar values expected)"
        )
    else:
        lines.append(
            f"  {label:<30} ours {work / best.timings['train_cpu_s']:10,.0f} {unit} (CPU time)"
        )
    peak = max(memory.values(), default=0) / MIB
    lines.append(f"  {'peak RSS of the worker':<30} {peak:,.0f} MiB")
    lines.append(breakdown(best))
    return lines


def ppo_section(result, memory: dict[int, int], spec) -> list[str]:
    """Rollout throughput and seconds per PPO step (no anchor: TRL 1.16 has no PPOTrainer)."""
    steps = result.steps_run
    generated = steps * spec.rollout_batch_size * spec.generation.max_new_tokens
    t = result.timings
    return [
        f"PPO ({steps} steps x {spec.rollout_batch_size} prompts x "
        f"{spec.generation.max_new_tokens} new tokens, {spec.ppo_epochs} PPO epochs; "
        "policy+value trained, reference+reward frozen, 1 worker; anchor: none, TRL 1.16 has "
        "no PPOTrainer)",
        f"  {'rollout tokens/s':<30} {generated / t['rollout_cpu_s']:10,.0f} tok/s (CPU time)"
        f"   {generated / t['rollout_s']:10,.0f} tok/s (wall)",
        f"  {'seconds per PPO step':<30} {t['train_cpu_s'] / steps:10.2f} s (CPU)"
        f"        {t['train_s'] / steps:10.2f} s (wall); per step: rollout "
        f"{t['rollout_cpu_s'] / steps:.2f} s + update {t['update_cpu_s'] / steps:.2f} s CPU",
        f"  {'peak RSS of the worker':<30} {max(memory.values(), default=0) / MIB:10,.0f} MiB"
        "   (4 models on one worker)",
        breakdown(result),
    ]


def memory_section(manifest: dict[str, Any], workdir: Path, args: argparse.Namespace) -> list[str]:
    """Peak RSS per worker of SFT on a bigger random GPT-2, 2 workers, ZeRO 0 vs ZeRO 3."""
    model_dir = medium_model(workdir / "medium-model", args.memory_embd, args.memory_layers)
    count = parameters(model_dir)
    runs = {}
    for zero in (0, 3):
        m = copy.deepcopy(manifest)
        m["metadata"]["name"] = f"bench-zero{zero}"
        m["spec"]["model"]["base"] = str(model_dir)
        m["spec"]["stages"]["sft"].update(maxSteps=args.memory_steps, batchSize=8)
        m["spec"]["stages"]["sft"]["dataset"]["evalFraction"] = 0.01
        m["spec"]["cluster"]["workers"]["replicas"] = 2
        m["spec"]["parallelism"]["zeroStage"] = zero
        runs[zero] = run_ours(job_from(m), "sft")
    states = 16 * count / MIB  # fp32 weights + grads + Adam m and v
    lines = [
        f"Peak memory per worker: SFT, 2 workers, fp32, random GPT-2 {count / 1e6:.1f}M params "
        f"(model states {states:,.0f} MiB unsharded)"
    ]
    for zero, (result, peak) in runs.items():
        shown = ", ".join(f"{v / MIB:,.0f}" for v in sorted(peak.values())) or "n/a"
        lines.append(
            f"  ZeRO {zero}: peak RSS {shown} MiB; {result.rss_after_init_mib:,.0f} MiB after "
            f"DeepSpeed init; {result.timings['train_cpu_s'] / args.memory_steps:.2f} s CPU/step"
        )
    z0, z3 = (max(runs[z][1].values(), default=0) / MIB for z in (0, 3))
    if z0 and z3:
        lines.append(
            f"  ZeRO 3 saves {z0 - z3:,.0f} MiB per worker   (target: about half the model "
            f"states, ~{states / 2:,.0f} MiB, with 2 workers)"
        )
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        lines.append(
            "  (RSS includes heap glibc keeps after frees; MALLOC_MMAP_THRESHOLD_=65536 "
            "MALLOC_TRIM_THRESHOLD_=0 shows live memory: see the docstring)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per stage")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ppo-steps", type=int, default=4)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-embd", type=int, default=768)
    parser.add_argument("--memory-layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side; best is kept")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--skip-ppo", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--only-memory", action="store_true", help="the memory section alone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_worker_niceness", RAY_WORKER_NICENESS)

    ensure_tiny()
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    steps, batch = args.steps, args.batch_size
    load_before = os.getloadavg()
    sft_tokens, pair_tokens = token_counts(TINY / "model")
    manifest = base_manifest(workdir / "ours", steps, batch, args.ppo_steps)
    job = job_from(manifest)
    stages, seed = manifest["spec"]["stages"], manifest["spec"]["seed"]
    lines: list[str] = []
    try:
        if not args.only_memory:
            # Best of `repeats` for both sides, interleaved (TRL, then ours, per round) so that both
            # see the same weather on a shared machine; the best run is the least disturbed one.
            trl: dict[str, list[dict[str, float]]] = {"sft": [], "reward": []}
            ours: dict[str, list[tuple[Any, dict[int, int]]]] = {"sft": [], "reward": []}
            for i in range(args.repeats):
                for name, runner in (("sft", trl_sft), ("reward", trl_reward)):
                    if not args.skip_trl:
                        out = workdir / f"trl-{name}-{i}"
                        trl[name].append(runner(TINY, steps, batch, stages[name], seed, out))
                    ours[name].append(run_ours(job, name))

            lines.append(
                f"SFT ({steps} steps x batch {batch}, {sft_tokens:.1f} tokens/example, 1 worker, "
                f"ZeRO 0, fp32, 1 CPU thread each; best of {args.repeats})"
            )
            lines += supervised_section(
                ours["sft"], trl["sft"], steps, steps * batch * sft_tokens, "loop tokens/s", "tok/s"
            )
            lines.append(
                f"Reward model ({steps} steps x batch {batch} pairs, {pair_tokens:.1f} "
                f"tokens/pair; best of {args.repeats})"
            )
            lines += supervised_section(
                ours["reward"], trl["reward"], steps, steps * batch, "loop pairs/s", "pair/s"
            )

            if not args.skip_ppo:
                lines += ppo_section(*run_ours(job, "ppo"), job.spec.stages.ppo)
        if not args.skip_memory:
            lines += memory_section(manifest, workdir, args)
    finally:
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    load_after = os.getloadavg()
    print()
    print("=" * 100)
    print(
        f"Trainer throughput ({os.cpu_count()} CPUs; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after: other processes share the CPU if these exceed ~1)"
    )
    print("=" * 100)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
