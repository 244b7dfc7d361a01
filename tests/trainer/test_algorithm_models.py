"""Which models the RL stage builds per algorithm (no Ray: `load_models` with a one-worker
stand-in for the StageWorker): PPO four, the critic-free algorithms three — no value model is
built, so none is loaded, trained or checkpointed (`train_loop` checkpoints what it trains)."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
from rlhf_trainer.jobspec import parse_job
from rlhf_trainer.stages.ppo import load_models
from rlhf_trainer.worker import StageWorker


def worker_for(tiny_dir: Path, tmp_path: Path, **ppo) -> SimpleNamespace:
    model = str(tiny_dir / "model")
    job = parse_job(
        {
            "metadata": {"name": "j"},
            "spec": {
                "model": {"base": model},
                "storage": {"uri": str(tmp_path)},
                "stages": {
                    "sft": {"enabled": False},
                    "reward": {"model": model},  # a fresh scalar head on the tiny GPT-2
                    "ppo": {"prompts": {"uri": str(tiny_dir / "prompts.jsonl")}, **ppo},
                },
                "parallelism": {"zeroStage": 0, "precision": "fp32"},
            },
        }
    )
    worker = SimpleNamespace(
        job=job,
        use_gpu=False,
        world_size=1,
        is_main=True,
        timed=lambda _name: contextlib.nullcontext(),
    )
    worker.engine = functools.partial(StageWorker.engine, worker)  # the real model loading
    return worker


@pytest.mark.parametrize(
    ("ppo", "models"),
    [
        ({}, {"policy", "reference", "reward", "value"}),
        ({"algorithm": "grpo", "samplesPerPrompt": 4}, {"policy", "reference", "reward"}),
        ({"algorithm": "rloo", "samplesPerPrompt": 2}, {"policy", "reference", "reward"}),
        ({"algorithm": "reinforce_pp"}, {"policy", "reference", "reward"}),
    ],
)
def test_only_ppo_builds_a_value_model(
    tiny_dir: Path, tmp_path: Path, ppo, models, one_rank_group
) -> None:
    built = load_models(worker_for(tiny_dir, tmp_path, **ppo), mini_batch=4)
    assert set(built.modules) == models
    assert set(built.engines) == models
    assert set(built.plans) == models
    trainable = {name for name, plan in built.plans.items() if plan.trainable}
    assert trainable == {"policy", "value"} & models
