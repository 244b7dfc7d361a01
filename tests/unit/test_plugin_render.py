"""`kubectl rlhf` output for a job in each phase: what a user reads in the terminal and in JSON.

The jobs are realistic snapshots (`tests/plugin_jobs.py`); the README's `watch` section is
rendered from the running one, and a test below keeps it in sync with the renderer.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from plugin_jobs import (
    NOW,
    OOM,
    failed_job,
    failed_rayjobs,
    operator_reason,
    pending_job,
    provisioning_job,
    provisioning_pods,
    running_job,
    succeeded_job,
    suspended_job,
    watch_snapshots,
)
from rlhf_operator.plugin.cli import main
from rlhf_operator.plugin.fmt import bar, duration, sparkline
from rlhf_operator.plugin.hints import job_hints
from rlhf_operator.plugin.render import render_list, render_status
from rlhf_operator.plugin.summary import job_row, job_summary

README = Path(__file__).resolve().parents[2] / "README.md"


def status_text(job: dict, pods: tuple = (), rayjobs: tuple = ()) -> str:
    return render_status(job_summary(job, NOW, job_hints(job, pods, rayjobs, now=NOW), rayjobs))


def reasons(job: dict, pods: tuple = (), rayjobs: tuple = ()) -> list[str]:
    return [h["reason"] for h in job_hints(job, pods, rayjobs, now=NOW)]


def row_of(text: str, first_cell: str) -> str:
    return next(line for line in text.splitlines() if line.split()[:1] == [first_cell])


# ---------------------------------------------------------------------------- each phase


def test_pending_job_lists_every_enabled_stage_as_pending_and_no_hints() -> None:
    text = status_text(pending_job())
    assert "Phase:" in text and "Pending" in text
    for stage in ("sft", "reward", "ppo", "evaluation"):
        assert row_of(text, stage).split()[1] == "Pending"
    assert "Hints:" not in text


def test_provisioning_job_without_gpus_says_why_and_what_to_change() -> None:
    job, pods = provisioning_job(), provisioning_pods()
    text = status_text(job, pods)
    assert "Provisioning" in text
    assert "imdb-ppo-ray (created for this job)" in text
    assert reasons(job, pods) == ["InsufficientGPU"]  # the pods explain the slow cluster
    hint_text = " ".join(text.split("Hints:")[1].split())
    assert "imdb-ppo-ray-gpu-workers-x7k2p" in hint_text
    assert "Insufficient nvidia.com/gpu" in hint_text
    assert "Each worker asks for 1 nvidia.com/gpu (spec.cluster.workers.gpusPerWorker)" in hint_text


def test_running_ppo_shows_timeline_attempts_progress_metrics_and_curves() -> None:
    text = status_text(running_job())
    assert "Running - stage ppo (3/4)" in text
    sft, reward, ppo = row_of(text, "sft"), row_of(text, "reward"), row_of(text, "ppo")
    assert sft.split()[1:4] == ["Succeeded", "1", "42m10s"]
    assert reward.split()[1:6] == ["Succeeded", "2", "(1", "failed)", "25m00s"]
    assert "resumed from step 200" in reward
    assert ppo.split()[1:3] == ["Running", "1"]
    assert f"{bar(45)}  45%" in ppo and "step 45/100" in ppo and "eta 1h20m" in ppo
    assert row_of(text, "evaluation").split()[1:3] == ["Pending", "-"]
    assert "Latest metrics (ppo):" in text
    assert "reward_mean 0.731" in text and "kl 0.042" in text
    curves = text.split("Curves (ppo, steps 0-45,")[1]
    reward_line = next(line for line in curves.splitlines() if "reward_mean" in line)
    spark = reward_line.split()[1]
    assert spark[0] in "▁▂▃" and spark[-1] in "▆▇█"  # reward rose over the run
    assert reward_line.endswith("-> 0.731")
    assert "Hints:" not in text


def test_succeeded_job_shows_evaluation_and_full_bars() -> None:
    text = status_text(succeeded_job())
    assert "Succeeded" in text.splitlines()[1]
    for stage in ("sft", "reward", "ppo", "evaluation"):
        line = row_of(text, stage)
        assert line.split()[1] == "Succeeded" and "100%" in line
    assert "win rate 68.8% (PPO policy over SFT)" in text
    assert "mean reward 0.214 (SFT) -> 0.731 (PPO)" in text
    assert "judge" not in text.split("Evaluation:")[1].split("\n")[1]
    assert "Ran:" in text and "1h59m" in text


def test_the_independent_judge_shows_beside_the_reward_models_win_rate() -> None:
    job = succeeded_job()
    job["status"]["evaluation"] |= {"judge": "sentiment classifier", "judgeWinRate": 0.312}
    text = status_text(job)
    assert "win rate 68.8% (PPO policy over SFT); by the independent judge (sentiment " in text
    assert "classifier) 31.2%" in text
    assert row_of(text, "ppo").split()[3] == "39m20s"


def test_failed_job_shows_reason_attempts_and_same_error_hint() -> None:
    job, rayjobs = failed_job(), failed_rayjobs()
    text = status_text(job, rayjobs=rayjobs)
    assert "Message:" in text
    header = text.split("STAGE")[0]
    assert "Message:   Stage ppo failed after 3 attempt(s): RayJob imdb-ppo-ppo-3" in header
    assert header.rstrip().endswith("…")  # the first line; the log tail is under the stage
    assert row_of(text, "ppo").split()[1:5] == ["Failed", "3", "(3", "failed)"]
    assert f"last error: {OOM.format('2.50')}" in text
    assert reasons(job, rayjobs=rayjobs) == ["SameErrorRepeated", "OutOfMemory"]
    hints = " ".join(text.split("Hints:")[1].split())
    assert "Stage ppo failed 3 times with the same error" in hints
    assert "kubectl rlhf logs imdb-ppo --stage ppo" in hints
    assert "spec.stages.ppo.miniBatchSize" in hints


def test_a_retry_in_progress_is_one_failure_not_a_repeated_one() -> None:
    job, rayjobs = running_job(percent=3.0), failed_rayjobs()[:1]
    ppo = job["status"]["stages"]["ppo"]
    ppo.update(attempts=2, failures=1, rayJob="imdb-ppo-ppo-2", message=operator_reason(rayjobs[0]))
    text = status_text(job, rayjobs=tuple(rayjobs))
    assert row_of(text, "ppo").split()[1:5] == ["Running", "2", "(1", "failed)"]
    assert f"last error: {OOM.format('2.00')}" in text
    assert reasons(job, rayjobs=tuple(rayjobs)) == ["OutOfMemory"]


def test_without_its_rayjobs_the_status_reason_still_shows() -> None:
    text = status_text(failed_job())  # e.g. `status -f saved.yaml`: no RayJobs to read
    assert f"last error: {OOM.format('2.50')}\n" in text
    assert "SameErrorRepeated" not in text  # one reason known: nothing to compare


def test_different_errors_are_not_called_the_same() -> None:
    rayjobs = failed_rayjobs()
    rayjobs[0]["status"]["message"] = "Traceback ...\nValueError: prompt column 'text' missing"
    rayjobs[1]["status"]["message"] = "Traceback ...\nConnectionError: s3 endpoint unreachable"
    job = failed_job()
    job["status"]["stages"]["ppo"]["message"] = "KeyError: 'reward_mean'"
    assert "SameErrorRepeated" not in reasons(job, rayjobs=rayjobs)


def test_suspended_job_says_how_to_resume() -> None:
    text = status_text(suspended_job())
    assert "Suspended" in text.splitlines()[1] and "Running for" not in text
    assert row_of(text, "ppo").split()[1:4] == ["Pending", "1", "-"]  # interrupted: no clock
    hints = " ".join(text.split("Hints:")[1].split())
    assert "spec.runPolicy.suspend: true" in hints
    assert "kubectl patch rlhfjob imdb-ppo --type merge -p " in hints
    assert '{"spec":{"runPolicy":{"suspend":false}}}' in hints


# ---------------------------------------------------------------------------- other hints


def test_invalid_spec_is_an_error_naming_the_field() -> None:
    job = pending_job()
    job["status"] = {
        "phase": "Failed",
        "message": "spec.stages.ppo.prompts is required when PPO is enabled",
        "conditions": [
            {
                "type": "Valid",
                "status": "False",
                "reason": "InvalidSpec",
                "message": "spec.stages.ppo.prompts is required when PPO is enabled; set it or "
                "set spec.stages.ppo.enabled: false.",
            }
        ],
    }
    hints = job_hints(job, now=NOW)
    assert hints[0]["reason"] == "InvalidSpec" and hints[0]["severity"] == "error"
    assert "spec.stages.ppo.prompts" in hints[0]["message"]


def test_deadline_exceeded_and_stalled_progress_and_missing_status() -> None:
    job = running_job()
    job["spec"]["runPolicy"] = {"activeDeadlineSeconds": 3600}
    assert "DeadlineExceeded" in reasons(job)

    stalled = running_job()
    del stalled["status"]["stages"]["ppo"]["progress"]
    assert "NoProgress" in reasons(stalled)

    unseen = pending_job()
    del unseen["status"]
    unseen["metadata"]["creationTimestamp"] = "2025-03-01T13:50:00Z"
    assert reasons(unseen) == ["NoStatus"]


# ---------------------------------------------------------------------------- list, json, cli


def test_list_table_has_the_printer_columns() -> None:
    jobs = [pending_job(), running_job(), failed_job()]
    for i, job in enumerate(jobs):
        job["metadata"]["name"] = f"job-{i}"
    text = render_list([job_row(j, NOW) for j in jobs], all_namespaces=True)
    lines = text.splitlines()
    assert lines[0].split() == [
        "NAMESPACE", "NAME", "PHASE", "STAGE", "PROGRESS", "REWARD", "CLUSTER", "AGE",
    ]  # fmt: skip
    assert lines[2].split() == [
        "ml", "job-1", "Running", "ppo", "ppo", "3/4", "45%", "0.731", "imdb-ppo-ray", "2h00m",
    ]  # fmt: skip
    assert render_list([]) == "No RLHFJobs found."


def test_status_json_and_offline_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "job.yaml"
    saved.write_text(yaml.safe_dump(failed_job()))
    assert main(["status", "-f", str(saved), "-o", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["phase"] == "Failed"
    ppo = next(s for s in data["stages"] if s["name"] == "ppo")
    assert ppo["state"] == "Failed" and ppo["attempts"] == 3
    assert "OutOfMemory" in [h["reason"] for h in data["hints"]]

    assert main(["status", "-f", str(saved)]) == 0
    assert "last error: torch.OutOfMemoryError" in capsys.readouterr().out


def test_status_without_job_or_file_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status"]) == 1
    assert "status needs a JOB name" in capsys.readouterr().err


def test_text_helpers() -> None:
    durations = [duration(s) for s in (None, 5, 65, 3700, 90000)]
    assert durations == ["-", "5s", "1m05s", "1h01m", "1d01h"]
    assert bar(50, width=10) == "█████░░░░░" and bar(None, width=4) == "░░░░"
    assert sparkline([1, 2, 3]) == "▁▅█" and sparkline([2, 2]) == "▄▄"
    assert len(sparkline(list(range(100)), width=40)) == 40


# ---------------------------------------------------------------------------- README


def readme_blocks() -> dict[str, str]:
    """The README `watch` section's two screenshots, rendered by the real code."""
    rows = [job_row(job, now) for job, now in watch_snapshots()]
    # kubectl -w prints the header once, then a row per change; empty columns stay blank.
    return {
        "get-w": "$ kubectl get rlhfjobs -w\n" + render_list(rows, missing=""),
        "status": "$ kubectl rlhf status imdb-ppo\n" + status_text(running_job()),
    }


def test_readme_watch_section_is_rendered_by_the_plugin() -> None:
    text = README.read_text()
    blocks = readme_blocks()
    if os.environ.get("UPDATE_README"):
        for key, block in blocks.items():
            text = re.sub(
                rf"(<!-- render:{key} -->\n```text\n).*?(```\n<!-- /render:{key} -->)",
                lambda m, block=block: m.group(1) + block + "\n" + m.group(2),
                text,
                flags=re.S,
            )
        README.write_text(text)
    for key, block in blocks.items():
        expected = f"<!-- render:{key} -->\n```text\n{block}\n```\n<!-- /render:{key} -->"
        assert expected in text, (
            f"README's `{key}` screenshot differs from the renderer's output; run "
            "UPDATE_README=1 pytest tests/unit/test_plugin_render.py -k readme"
        )
