"""A restarted stage resumes from its last checkpoint (model, optimizer, scheduler, step, data
position, PPO's KL coefficient) instead of starting over, and ends where an uninterrupted run
ends. The uninterrupted runs are the session's pipeline run (tiny_run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rlhf_trainer.jobspec import parse_job, with_absolute_paths
from rlhf_trainer.launcher import run_stage
from rlhf_trainer.local import LocalRun
from tiny_jobs import TEST_OVERRIDES, tiny_manifest

pytestmark = pytest.mark.slow


def job_in(tiny_dir: Path, storage: Path):
    return with_absolute_paths(parse_job(tiny_manifest(tiny_dir, storage)))


def test_sft_resumes_from_a_checkpoint_elsewhere(tiny_run: LocalRun, tiny_dir, tmp_path) -> None:
    """`--resume-from` another location: the latest complete checkpoint found there."""
    fresh = tiny_run.results["sft"]
    source = tiny_run.output / "tiny-reviews" / "sft" / "checkpoints"
    every = TEST_OVERRIDES["sft"]["checkpointEverySteps"]
    last_checkpoint = (fresh.total_steps - 1) // every * every

    resumed = run_stage(job_in(tiny_dir, tmp_path), "sft", resume_from=str(source))

    assert resumed.resumed_from_step == last_checkpoint
    assert resumed.steps_run == fresh.total_steps - last_checkpoint < fresh.steps_run
    # Same data order, optimizer and schedule: it ends where the uninterrupted run ended.
    assert resumed.metrics["eval_loss"] == pytest.approx(fresh.metrics["eval_loss"], rel=1e-4)
    # The curve before the checkpoint came back with it (summary's "before" figure).
    assert resumed.history[0] == fresh.history[0]
    assert (tmp_path / "tiny-reviews" / "sft" / "model" / "config.json").is_file()


def test_ppo_resumes_from_its_own_checkpoints(tiny_run: LocalRun, tiny_dir, tmp_path) -> None:
    """What the operator's retry does: `--resume-from <artifact>/checkpoints` of the stage
    itself (Ray Train restores its run directory)."""
    source = tiny_run.output / "tiny-reviews"
    target = tmp_path / "tiny-reviews"
    shutil.copytree(source / "sft" / "model", target / "sft" / "model")
    shutil.copytree(source / "reward" / "model", target / "reward" / "model")
    shutil.copytree(source / "ppo" / "checkpoints", target / "ppo" / "checkpoints")
    fresh = tiny_run.results["ppo"]
    every = TEST_OVERRIDES["ppo"]["checkpointEverySteps"]
    last_checkpoint = (fresh.total_steps - 1) // every * every

    resumed = run_stage(
        job_in(tiny_dir, tmp_path), "ppo", resume_from=str(target / "ppo" / "checkpoints")
    )

    assert resumed.resumed_from_step == last_checkpoint
    assert resumed.steps_run == fresh.total_steps - last_checkpoint < fresh.steps_run
    # Rollouts are seeded by (seed, rank, step): the resumed run samples and learns exactly
    # what the uninterrupted one did after the checkpoint.
    assert resumed.metrics["reward_mean"] == pytest.approx(fresh.metrics["reward_mean"], rel=1e-4)
    assert resumed.metrics["kl_coef"] == pytest.approx(fresh.metrics["kl_coef"])
    assert [row["step"] for row in resumed.history] == list(range(1, fresh.total_steps + 1))


def test_resume_of_a_finished_output_runs_nothing(tiny_run: LocalRun, tiny_dir, tmp_path) -> None:
    """`rlhf run --resume` on an output every stage finished: it says so, trains nothing and
    writes the same summary from the artifacts (no retraining from the last checkpoint)."""
    import io

    from rlhf_trainer.local import run_local
    from tiny_jobs import write_manifest

    output = tmp_path / "out"
    shutil.copytree(tiny_run.output, output)  # a moved output is still the same results
    runs = {p: p.stat().st_mtime_ns for p in output.glob("tiny-reviews/*/run.json")}
    manifest = write_manifest(tmp_path / "job.yaml", tiny_manifest(tiny_dir, tmp_path / "unused"))
    printed = io.StringIO()

    again = run_local(str(manifest), str(output), resume=True, progress_bars=False, out=printed)

    text = printed.getvalue()
    assert (
        f"resume: sft, reward, ppo, evaluation already complete in {output}: every stage is "
        "complete, nothing to run (run without --resume to train again)"
    ) in text
    assert "ray: local instance ready" not in text  # no worker started
    assert "sft: eval loss" in text and "(already complete, not run again)" in text
    assert {p: p.stat().st_mtime_ns for p in runs} == runs
    assert again.summary["stages"]["evaluation"] == tiny_run.summary["stages"]["evaluation"]
    ppo, before = again.summary["stages"]["ppo"], tiny_run.summary["stages"]["ppo"]
    assert (ppo["reward_before"], ppo["reward_after"]) == (
        before["reward_before"],
        before["reward_after"],
    )
    assert (output / "training_curves.png").is_file()
