"""Rollout engines side by side: vLLM vs transformers' generate, then the tiny job both ways.

    .venv-vllm/bin/python bench/rollout_engines.py [--prompts 64] [--max-new-tokens 48]
                                                   [--skip-throughput] [--skip-job]

Run in the vLLM environment (`make vllm-env`). Figures, not verdicts: it prints each figure
beside its goal and never fails on timing.

1. Rollout throughput, one process, one CPU thread each (as a 1-CPU Ray worker runs): the 85M
   random GPT-2 of bench/trainer_throughput.py's memory section (768 wide, 12 layers, the tiny
   vocabulary), the same prompts (the tiny example's), the same sampling (temperature 1, no
   top-k/top-p, up to --max-new-tokens, stop at EOS). A random model ends a response at EOS
   after a varying number of tokens: the case continuous batching exists for. hf pads the
   batch and decodes until its longest response ends; vLLM schedules each sequence alone.
   Generated tokens/s and prompts/s of each engine after one warm-up call; ratio vLLM / hf
   (goal >= 2x on CPU).
2. The tiny job (tests' step counts, 2-head model: vLLM's CPU attention needs 32-dim heads)
   through `rlhf run`'s code with `engine: hf` and with `engine: vllm`: PPO seconds per step
   (rollout + score + update; the rollout share), and the learning figures (PPO reward
   before -> after, KL, evaluation win rate and prompts improved by the reward model and by the
   true sentiment count) beside the targets tests/trainer/test_local_run.py holds the hf run to.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "trainer"))
TARGET_RATIO = 2.0
# tests/trainer/test_local_run.py's learning targets: the tiny targets, by the reward model and
# by the independent judge (the task's true sentiment count)
TARGETS = {
    "reward_gain": 0.5,
    "win_rate": 0.8,
    "prompts_improved_fraction": 0.9,
    "judge_win_rate": 0.8,
    "judge_prompts_improved_fraction": 0.9,
}


def make_models(workdir: Path) -> tuple[Path, Path]:
    """The tiny example (2 heads) and an 85M random GPT-2 with its tokenizer."""
    import torch
    from tiny_jobs import load_make_tiny
    from transformers import GPT2Config, GPT2LMHeadModel

    tiny = workdir / "tiny"
    load_make_tiny().main(["--out", str(tiny), "--heads", "2"])
    config = json.loads((tiny / "model" / "config.json").read_text())
    torch.manual_seed(0)
    big = workdir / "gpt2-85m"
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=config["vocab_size"],
            n_positions=config["n_positions"],
            n_embd=768,
            n_layer=12,
            n_head=8,
            bos_token_id=config["bos_token_id"],
            eos_token_id=config["eos_token_id"],
            pad_token_id=config["pad_token_id"],
        )
    ).save_pretrained(str(big))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / "model" / name, big / name)
    return tiny, big


def throughput(tiny: Path, big: Path, args: argparse.Namespace) -> list[str]:
    import torch
    from rlhf_operator.api.spec import VLLMSpec
    from rlhf_trainer.batches import prompt_ids
    from rlhf_trainer.models import load_causal_lm, load_tokenizer
    from rlhf_trainer.rollout import Sampling
    from rlhf_trainer.rollout.hf import HFEngine
    from rlhf_trainer.rollout.vllm import VLLMEngine

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(str(big), "model")
    texts = [json.loads(line)["prompt"] for line in (tiny / "prompts.jsonl").open()]
    prompts = prompt_ids(tokenizer, texts[: args.prompts], 16)
    sampling = Sampling(max_new_tokens=args.max_new_tokens)
    cpu = torch.device("cpu")

    model = load_causal_lm(str(big), "model").eval()
    hf = HFEngine(model, tokenizer, device=cpu, synced_gpus=False)
    vllm = VLLMEngine(
        VLLMSpec(max_num_seqs=args.prompts),
        "bench",
        model_uri=str(big),
        tokenizer=tokenizer,
        device=cpu,
        precision="fp32",
        max_model_len=16 + args.max_new_tokens,
        seed=0,
        rank=0,
        world_size=1,
    )
    figures = {}
    for name, engine in (("hf", hf), ("vllm", vllm)):
        engine.generate(prompts[:4], sampling)  # warm-up
        torch.manual_seed(0)
        started = time.perf_counter()
        samples = engine.generate(prompts, sampling)
        seconds = time.perf_counter() - started
        lengths = [len(r) for r in samples.responses]
        figures[name] = (sum(lengths) / seconds, len(prompts) / seconds, lengths, seconds)
    lines = [
        f"rollout throughput: GPT-2 85M (768x12, fp32, 1 thread), {len(prompts)} prompts, "
        f"up to {args.max_new_tokens} new tokens, temperature 1, stop at EOS"
    ]
    for name, (tokens_s, prompts_s, lengths, seconds) in figures.items():
        lines.append(
            f"  {name:5s} {tokens_s:8.1f} generated tokens/s  {prompts_s:6.2f} prompts/s  "
            f"({sum(lengths)} tokens in {seconds:.1f} s; response lengths "
            f"{min(lengths)}..{max(lengths)}, mean {sum(lengths) / len(lengths):.1f})"
        )
    ratio = figures["vllm"][0] / figures["hf"][0]
    lines.append(f"  ratio vLLM / hf (tokens/s): {ratio:.2f}x (goal >= {TARGET_RATIO:.0f}x)")
    return lines


def tiny_job(tiny: Path, workdir: Path, engine: str) -> dict:
    from rlhf_trainer.local import run_local
    from tiny_jobs import tiny_manifest, write_manifest

    out = workdir / f"job-{engine}"
    manifest = tiny_manifest(tiny, out / "unused", ppo={"rollout": {"engine": engine}})
    path = write_manifest(workdir / f"job-{engine}.yaml", manifest)
    run = run_local(str(path), str(out), progress_bars=False)
    timings = json.loads((run.output / "timings.json").read_text())["stages"]
    ppo, evaluation = run.summary["stages"]["ppo"], run.summary["stages"]["evaluation"]
    steps = timings["ppo"]["steps_run"]
    return {
        "step_s": timings["ppo"]["train_s"] / steps,
        "rollout_s": timings["ppo"]["rollout_s"] / steps,
        "update_s": timings["ppo"]["update_s"] / steps,
        "engine_init_s": timings["ppo"].get("rollout_engine_init_s", 0.0),
        "reward": (ppo["reward_before"], ppo["reward_after"]),
        "kl": ppo["kl"],
        "evaluation": {name: evaluation[name] for name in TARGETS if name in evaluation},
        "evaluation_s": timings["evaluation"]["seconds"],
    }


def verdict(value: float, target: float) -> str:
    return f"{value:.2f} ({'meets' if value >= target else 'MISSES'} >= {target})"


def job_lines(results: dict[str, dict]) -> list[str]:
    lines = ["tiny job (tests' step counts, 2 workers, ZeRO-2): PPO per step and learning"]
    for engine, r in results.items():
        before, after = r["reward"]
        gain_ok = after - before > TARGETS["reward_gain"]
        evaluation = "  ".join(
            f"{name.replace('_fraction', '')} {verdict(value, TARGETS[name])}"
            for name, value in r["evaluation"].items()
        )
        lines.append(
            f"  {engine:5s} {r['step_s']:6.2f} s/step (rollout+score {r['rollout_s']:.2f}, update "
            f"{r['update_s']:.2f}; engine start {r['engine_init_s']:.1f} s)  reward "
            f"{before:.2f} -> {after:.2f} ({'meets' if gain_ok else 'MISSES'} +"
            f"{TARGETS['reward_gain']})  kl {r['kl']:.2f}  evaluation {r['evaluation_s']:.0f} s"
        )
        lines.append(f"        {evaluation}")
    if len(results) == 2:
        ratio = results["hf"]["step_s"] / results["vllm"]["step_s"]
        lines.append(f"  PPO step time hf / vllm: {ratio:.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-job", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    tiny, big = make_models(workdir)
    lines: list[str] = []
    if not args.skip_throughput:
        lines += throughput(tiny, big, args)
        print("\n".join(lines), flush=True)
    if not args.skip_job:
        results = {engine: tiny_job(tiny, workdir, engine) for engine in ("hf", "vllm")}
        lines += job_lines(results)
    print("\n" + "\n".join(lines))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
