"""The tiny RLHFJob end to end with `engine: vllm` for PPO and evaluation (local Ray, two
workers, DeepSpeed ZeRO-2, a vLLM engine in each worker): it runs, and PPO learns as with `hf`
(tests/trainer/test_local_run.py holds the same targets)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tiny_jobs import tiny_manifest, write_manifest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_tiny_job_with_vllm_rollouts(ray_session, tiny_vllm_dir: Path, tmp_path: Path) -> None:
    from rlhf_trainer.local import run_local

    manifest = tiny_manifest(
        tiny_vllm_dir,
        tmp_path / "unused",
        ppo={"rollout": {"engine": "vllm", "vllm": {"maxNumSeqs": 64}}},
    )
    path = write_manifest(tmp_path / "job.yaml", manifest)
    run = run_local(str(path), str(tmp_path / "out"), progress_bars=False)

    ppo = run.summary["stages"]["ppo"]
    assert ppo["reward_after"] > ppo["reward_before"] + 0.5
    assert math.isfinite(ppo["kl"]) and ppo["kl"] > 0
    evaluation = run.summary["stages"]["evaluation"]  # PPO's engine: vllm too
    assert evaluation["win_rate"] >= 0.7
    assert evaluation["mean_reward_rlhf"] > evaluation["mean_reward_sft"]
    timings = json.loads((run.output / "timings.json").read_text())
    assert timings["stages"]["ppo"]["rollout_engine_init_s"] > 0
