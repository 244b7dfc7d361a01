"""A training worker that dies mid-stage is replaced by Ray Train (FailureConfig) and the stage
resumes from its last checkpoint instead of starting over."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from rlhf_trainer.jobspec import parse_job, with_absolute_paths
from rlhf_trainer.launcher import run_stage
from tiny_jobs import tiny_manifest

pytestmark = pytest.mark.slow


def session_train_workers() -> list[int]:
    """Pids of this test session's Ray Train workers: children of *our* raylet only (other
    Ray instances on the machine are left alone)."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    return [
        child.pid
        for child in psutil.Process(raylet).children()
        if "RayTrainWorker" in " ".join(child.cmdline())
    ]


def checkpoint_registered(checkpoints: Path) -> bool:
    """Ray Train has registered a checkpoint (its snapshot lists one): files appear while a
    checkpoint uploads, but only a registered one is handed to a restarted worker group."""
    try:
        snapshot = json.loads((checkpoints / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return bool(snapshot.get("checkpoint_results"))


def kill_a_worker_after_first_checkpoint(checkpoints: Path, killed: list[int]) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if checkpoint_registered(checkpoints):
            workers = session_train_workers()
            if workers:
                os.kill(workers[-1], signal.SIGKILL)
                killed.append(workers[-1])
                return
        time.sleep(0.1)


def test_a_killed_worker_is_replaced_and_the_stage_resumes(ray_session, tiny_dir, tmp_path) -> None:
    sft = {"epochs": 3, "maxSteps": 150, "checkpointEverySteps": 10}
    job = with_absolute_paths(parse_job(tiny_manifest(tiny_dir, tmp_path, sft=sft)))
    killed: list[int] = []
    killer = threading.Thread(
        target=kill_a_worker_after_first_checkpoint,
        args=(tmp_path / "tiny-reviews" / "sft" / "checkpoints", killed),
    )
    killer.start()
    try:
        result = run_stage(job, "sft")
    finally:
        killer.join()

    assert killed, "no training worker was found to kill"
    assert result.resumed_from_step is not None and result.resumed_from_step >= 10
    assert result.resumed_from_step % 10 == 0
    assert result.steps_run == result.total_steps - result.resumed_from_step < result.total_steps
    assert result.metrics["eval_loss"] < 0.7 * result.history[0]["eval_loss"]
