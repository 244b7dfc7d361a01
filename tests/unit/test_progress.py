"""Progress reporting: throttling, ETA, the progress file, TensorBoard, failing sinks."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from rlhf_trainer.progress import (
    FileSink,
    ProgressReport,
    ProgressReporter,
    estimate_eta,
    read_progress,
    redact,
)
from rlhf_trainer.status_sink import KubernetesStatusSink
from rlhf_trainer.tensorboard import TensorBoardSink, tensorboard_dir


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self, min_interval_s: float | None = None) -> None:
        self.reports: list[ProgressReport] = []
        self.closed = False
        if min_interval_s is not None:
            self.min_interval_s = min_interval_s

    def report(self, report: ProgressReport) -> None:
        self.reports.append(report)

    def close(self) -> None:
        self.closed = True


class Exploding:
    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    def report(self, report: ProgressReport) -> None:
        self.calls += 1
        raise self.error


def make(sinks, total=100, **kwargs) -> tuple[ProgressReporter, FakeClock]:
    clock = FakeClock()
    return ProgressReporter("sft", total, sinks, clock=clock, **kwargs), clock


def test_at_most_one_report_per_interval_and_finish_always_delivered() -> None:
    sink = Recorder()
    reporter, clock = make([sink])
    for now, step in [(0, 1), (10, 2), (29.9, 3), (30, 4), (45, 5), (59, 6), (61, 7)]:
        clock.now = now
        reporter.update(step, {"loss": 1.0 / step})
    clock.now = 62
    reporter.finish({"eval_loss": 0.5})
    assert [r.step for r in sink.reports] == [1, 4, 7, 100]
    final = sink.reports[-1]
    assert final.final and final.percent == 100.0 and final.eta_seconds == 0.0
    assert final.latest_metrics == {"loss": 1 / 7, "eval_loss": 0.5}
    assert final.metrics == {"eval_loss": 0.5}
    assert sink.closed
    reporter.update(101, {"loss": 0.0})  # after finish: ignored
    assert len(sink.reports) == 4


def test_interval_is_configurable() -> None:
    sink = Recorder()
    reporter, clock = make([sink], interval_s=5)
    for now in range(12):
        clock.now = now
        reporter.update(now + 1)
    assert [r.step for r in sink.reports] == [1, 6, 11]


def test_a_sink_may_set_its_own_interval() -> None:
    status, bars = Recorder(), Recorder(min_interval_s=1.0)
    reporter, clock = make([status, bars])
    for now in range(5):
        clock.now = now
        reporter.update(now + 1)
    assert [r.step for r in status.reports] == [1]
    assert [r.step for r in bars.reports] == [1, 2, 3, 4, 5]


def test_percent_and_eta_from_the_step_rate() -> None:
    sink = Recorder()
    reporter, clock = make([sink], total=100)
    clock.now = 20.0
    reporter.update(10)  # 10 steps in 20 s: 0.5 step/s, 90 steps left -> 180 s
    assert sink.reports[-1].percent == 10.0
    assert sink.reports[-1].eta_seconds == pytest.approx(180.0)


def test_eta_after_a_resume_counts_only_steps_done_since() -> None:
    sink = Recorder()
    reporter, clock = make([sink], total=100, start_step=50)
    clock.now = 20.0
    reporter.update(60)  # 10 steps in 20 s since the resume; 40 left -> 80 s
    assert sink.reports[-1].eta_seconds == pytest.approx(80.0)
    assert sink.reports[-1].percent == 60.0


def test_eta_unknown_before_the_first_step() -> None:
    assert estimate_eta(step=0, total_steps=10, start_step=0, elapsed_s=5.0) is None
    assert estimate_eta(step=5, total_steps=10, start_step=0, elapsed_s=0.0) is None
    assert estimate_eta(step=12, total_steps=10, start_step=0, elapsed_s=6.0) == 0.0


def test_failing_sink_warns_once_is_disabled_and_training_goes_on(caplog) -> None:
    broken, healthy = Exploding(RuntimeError("boom")), Recorder(min_interval_s=0)
    reporter, clock = make([broken, healthy])
    with caplog.at_level(logging.WARNING, logger="rlhf_trainer.progress"):
        for step in range(1, 6):
            clock.now = step * 40.0
            reporter.update(step, {"loss": 1.0})
        reporter.finish({"loss": 0.1})
    assert broken.calls == 1
    assert [r.step for r in healthy.reports] == [1, 2, 3, 4, 5, 100]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["progress reporting to Exploding disabled: RuntimeError: boom"]
    assert reporter.active_sinks == [healthy]


def test_metric_values_become_plain_floats() -> None:
    torch = pytest.importorskip("torch")
    sink = Recorder()
    reporter, _ = make([sink])
    reporter.update(1, {"loss": torch.tensor(0.25), "lr": 3e-4, "note": "text"})
    assert sink.reports[0].metrics == {"loss": 0.25, "lr": 3e-4}


def test_close_without_finish_delivers_the_pending_report() -> None:
    sink = Recorder()
    reporter, clock = make([sink])
    reporter.update(1)
    clock.now = 5
    reporter.update(2, {"loss": 0.3})  # throttled
    reporter.close()  # e.g. the stage failed: the last known step still reaches the sinks
    assert [(r.step, r.final) for r in sink.reports] == [(1, False), (2, False)]
    assert sink.closed


class TestFileSink:
    def test_writes_progress_json_atomically(self, tmp_path: Path) -> None:
        path = tmp_path / "progress" / "sft.json"
        reporter, clock = make([FileSink(path)], total=4)
        clock.now = 2.0
        reporter.update(1, {"loss": 2.0, "grad_norm": math.nan})
        data = read_progress(path)
        assert data is not None
        assert (data["stage"], data["step"], data["totalSteps"], data["percent"]) == (
            "sft",
            1,
            4,
            25.0,
        )
        assert data["etaSeconds"] == pytest.approx(6.0)
        assert data["metrics"] == {"loss": 2.0}  # NaN is not JSON: left out
        assert data["final"] is False
        reporter.finish({"eval_loss": 1.5})
        data = json.loads(path.read_text())
        assert data["final"] and data["percent"] == 100.0
        assert data["metrics"] == {"loss": 2.0, "eval_loss": 1.5}
        assert [p.name for p in path.parent.iterdir()] == ["sft.json"]  # no temp files left

    def test_missing_file_reads_as_none(self, tmp_path: Path) -> None:
        assert read_progress(tmp_path / "absent.json") is None


class TestStatusPatch:
    def test_patch_body_carries_progress_metrics_and_history_only(self) -> None:
        sink = KubernetesStatusSink("job", "ns", "ppo")
        report = ProgressReport(
            stage="ppo",
            step=9,
            total_steps=20,
            percent=45.0,
            eta_seconds=33.0,
            elapsed_seconds=27.0,
            metrics={"reward_mean": 0.7314},
            latest_metrics={"reward_mean": 0.7314, "kl": 0.02, "value_loss": math.inf},
        )
        sink.status_patch(report)
        body = sink.status_patch(report)
        status = body["status"]
        assert set(body) == {"status"} and set(status) == {"stages"}  # the operator's columns
        stage = status["stages"]["ppo"]
        assert stage["progress"] == {
            "percent": 45.0,
            "step": 9,
            "totalSteps": 20,
            "etaSeconds": 33.0,
        }
        assert stage["metrics"] == {"reward_mean": 0.7314, "kl": 0.02}
        assert len(stage["history"]) == 2  # the whole curve every time (merge patch)
        assert stage["history"][-1] == {"step": 9, "metrics": {"reward_mean": 0.7314, "kl": 0.02}}
        json.dumps(body, allow_nan=False)  # what the API server will parse

    def test_no_eta_is_left_out(self) -> None:
        sink = KubernetesStatusSink("job", "ns", "sft")
        report = ProgressReport("sft", 1, 2, 50.0, None, 1.0, {}, {"loss": 1.0})
        body = sink.status_patch(report)["status"]
        assert "etaSeconds" not in body["stages"]["sft"]["progress"]

    def test_forbidden_names_the_missing_permission(self) -> None:
        from kubernetes.client.exceptions import ApiException

        sink = KubernetesStatusSink("job", "team-a", "ppo")
        message = sink.describe_failure(ApiException(status=403, reason="Forbidden"))
        assert "lacks patch on rlhfjobprogresses/status" in message
        assert "team-a" in message


def test_redact_masks_credentials() -> None:
    text = redact("Authorization: Bearer abc.def.ghi token=s3cr3t password: 'hunter2'")
    for secret in ("abc.def.ghi", "s3cr3t", "hunter2"):
        assert secret not in text


class TestFromEnv:
    def test_picks_sinks_from_the_environment(self, tmp_path: Path) -> None:
        extra = Recorder()
        env = {
            "RLHF_JOB_NAME": "job",
            "RLHF_JOB_NAMESPACE": "ns",
            "RLHF_PROGRESS_FILE": str(tmp_path / "p.json"),
        }
        reporter = ProgressReporter.from_env("sft", 10, sinks=[extra], env=env)
        kinds = [type(s).__name__ for s in reporter.active_sinks]
        assert kinds == ["KubernetesStatusSink", "FileSink", "Recorder"]

    def test_only_rank_zero_reports(self) -> None:
        env = {"RLHF_JOB_NAME": "job", "RLHF_JOB_NAMESPACE": "ns", "RANK": "1"}
        reporter = ProgressReporter.from_env("sft", 10, sinks=[Recorder()], env=env)
        assert reporter.active_sinks == []
        reporter.update(1, {"loss": 1.0})
        reporter.finish({})

    def test_no_environment_means_only_the_given_sinks(self) -> None:
        sink = Recorder()
        reporter = ProgressReporter.from_env("sft", 10, sinks=[sink], env={})
        assert reporter.active_sinks == [sink]


class TestTensorBoard:
    def test_every_update_becomes_a_scalar_at_its_step(self, tmp_path: Path) -> None:
        event_accumulator = pytest.importorskip(
            "tensorboard.backend.event_processing.event_accumulator"
        )
        log_dir = tensorboard_dir(tmp_path / "artifact")
        reporter, clock = make([TensorBoardSink(log_dir)], total=3)
        for step, loss in [(1, 2.0), (2, 1.5), (3, 1.25)]:
            clock.now = step
            reporter.update(step, {"loss": loss, "learning_rate": 1e-3})
        reporter.finish({"eval_loss": 1.0})
        events = event_accumulator.EventAccumulator(str(log_dir))
        events.Reload()
        assert {"sft/loss", "sft/learning_rate", "sft/eval_loss"} <= set(events.Tags()["scalars"])
        assert [(e.step, e.value) for e in events.Scalars("sft/loss")] == [
            (1, 2.0),
            (2, 1.5),
            (3, 1.25),
        ]
        assert [(e.step, e.value) for e in events.Scalars("sft/eval_loss")] == [(3, 1.0)]
