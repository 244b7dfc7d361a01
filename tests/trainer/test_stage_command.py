"""`python -m rlhf_trainer stage ... --job '<JSON>'`: the command a stage RayJob runs
(docs/CONTRACTS.md §1). It attaches to the running Ray cluster (here: the session's local Ray,
through RAY_ADDRESS, as on a KubeRay head) and exits 0 with the stage's metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from rlhf_trainer.jobspec import job_to_json, parse_job
from rlhf_trainer.local import LocalRun
from tiny_jobs import tiny_manifest

pytestmark = pytest.mark.slow


def test_evaluation_stage_as_a_rayjob_runs_it(tiny_run: LocalRun, tiny_dir, tmp_path) -> None:
    import ray

    source = tiny_run.output / "tiny-reviews"
    for stage in ("sft", "reward", "ppo"):
        shutil.copytree(source / stage / "model", tmp_path / "tiny-reviews" / stage / "model")
    job = parse_job(tiny_manifest(tiny_dir, tmp_path))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_trainer",
            "stage",
            "evaluation",
            "--job",
            job_to_json(job),
            "--attempt",
            "1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    # Attached to a cluster, the workers' logs stream to stdout too (what a RayJob's log shows).
    (line,) = [line for line in done.stdout.splitlines() if line.startswith('{"stage"')]
    result = json.loads(line)
    assert result["stage"] == "evaluation"
    expected = tiny_run.results["evaluation"].metrics
    # Same models, prompts and seeds as the pipeline's evaluation: the same figures.
    assert result["metrics"]["win_rate"] == pytest.approx(expected["win_rate"])
    assert (tmp_path / "tiny-reviews" / "evaluation" / "examples.csv").is_file()
