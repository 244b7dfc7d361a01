"""Progress reporting from a training stage to its RLHFJob, a local progress file and TensorBoard.

    reporter = ProgressReporter.from_env("ppo", total_steps=200, sinks=[TensorBoardSink(...)])
    for step in ...:
        reporter.update(step, {"reward_mean": 0.4, "kl": 0.02})   # cheap; throttled per sink
    reporter.finish({"reward_mean": 0.7})                          # always delivered

Reporting is best effort and never fails training: a sink that raises is disabled after one
warning (e.g. a ServiceAccount without `patch` on `rlhfjobprogresses/status`), and nothing a
sink logs carries credentials. Only the rank-0 worker reports (`RANK`, set by Ray Train's
TorchTrainer).

Throttling: every sink gets at most one report per `interval_s` (30 s: the API server is shared
by the whole cluster) unless it sets an interval of its own in `min_interval_s` (the local
progress file drives progress bars every second; TensorBoard wants every step). The final report
from `finish` reaches every sink regardless.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

# Set by the operator's builders in every Ray pod (docs/CONTRACTS.md §2).
JOB_NAME_ENV = "RLHF_JOB_NAME"
JOB_NAMESPACE_ENV = "RLHF_JOB_NAMESPACE"
# A progress file to write (`rlhf run` passes its file through the loop config instead).
PROGRESS_FILE_ENV = "RLHF_PROGRESS_FILE"
# Set by Ray Train's TorchTrainer in every worker (torch.distributed convention).
RANK_ENV = "RANK"

DEFAULT_INTERVAL_S = 30.0
FILE_SINK_INTERVAL_S = 1.0

_SECRET_PATTERN = re.compile(
    r"(?i)((?:token|authorization|password|secret)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+)?"
    r"|bearer\s+)[^\s\"',}]+"
)


@dataclass(frozen=True)
class ProgressReport:
    """What a sink receives: where the stage is, and its metrics."""

    stage: str
    step: int
    total_steps: int
    percent: float
    eta_seconds: float | None
    elapsed_seconds: float
    metrics: dict[str, float]
    """Metrics passed with this very update (TensorBoard logs them at `step`)."""
    latest_metrics: dict[str, float]
    """Latest value of every metric reported so far in this stage (status, progress file)."""
    final: bool = False


@runtime_checkable
class ProgressSink(Protocol):
    """Anything with `report`; `min_interval_s`, `close` and `describe_failure` are optional."""

    def report(self, report: ProgressReport) -> None: ...


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics JSON can carry (NaN/inf are not JSON and the API server rejects them)."""
    return {name: value for name, value in metrics.items() if math.isfinite(value)}


def redact(text: str) -> str:
    """`text` with anything that looks like a token, password or bearer credential masked."""
    return _SECRET_PATTERN.sub(r"\1<redacted>", text)


def _sink_name(sink: object) -> str:
    return type(sink).__name__


def _describe_failure(sink: object, exc: BaseException) -> str:
    describe = getattr(sink, "describe_failure", None)
    if callable(describe):
        with contextlib.suppress(Exception):
            return str(describe(exc))
    return (
        f"progress reporting to {_sink_name(sink)} disabled: "
        f"{type(exc).__name__}: {redact(str(exc))[:300]}"
    )


@dataclass
class _Slot:
    sink: Any
    interval_s: float
    last_delivery: float | None = None
    delivered_step: int | None = None
    disabled: bool = False

    def due(self, now: float) -> bool:
        return self.last_delivery is None or now - self.last_delivery >= self.interval_s


@dataclass
class ProgressReporter:
    """Turns `update(step, metrics)` calls into throttled reports to its sinks. Never raises."""

    stage: str
    total_steps: int
    sinks: Sequence[Any] = ()
    interval_s: float = DEFAULT_INTERVAL_S
    clock: Callable[[], float] = time.monotonic
    start_step: int = 0
    """Step the stage (re)started from: a resumed run's rate counts only steps done since."""
    _slots: list[_Slot] = field(init=False, default_factory=list)
    _started: float = field(init=False, default=0.0)
    _step: int = field(init=False, default=0)
    _latest: dict[str, float] = field(init=False, default_factory=dict)
    _finished: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._started = self.clock()
        self._step = self.start_step
        for sink in self.sinks:
            own = getattr(sink, "min_interval_s", None)
            interval = self.interval_s if own is None else float(own)
            self._slots.append(_Slot(sink, interval))

    @classmethod
    def from_env(
        cls,
        stage: str,
        total_steps: int,
        sinks: Iterable[Any] | None = None,
        *,
        rank: int | None = None,
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> ProgressReporter:
        """A reporter with the sinks the environment calls for, plus `sinks`.

        - `RLHF_JOB_NAME` + `RLHF_JOB_NAMESPACE` (set in every Ray pod): the job's
          RLHFJobProgress, which the operator mirrors into the RLHFJob's status.
        - `RLHF_PROGRESS_FILE` (set by `rlhf run`): a JSON progress file.
        On a worker whose rank is not 0 the reporter has no sinks at all (one voice per stage).
        `options` go to the constructor (`interval_s`, `clock`, `start_step`).
        """
        env = os.environ if env is None else env
        if rank is None:
            rank = int(env.get(RANK_ENV, "0") or 0)
        if rank != 0:
            return cls(stage, total_steps, (), **options)
        chosen: list[Any] = []
        name, namespace = env.get(JOB_NAME_ENV), env.get(JOB_NAMESPACE_ENV)
        if name and namespace:
            from rlhf_trainer.status_sink import KubernetesStatusSink

            chosen.append(KubernetesStatusSink(name, namespace, stage))
        if env.get(PROGRESS_FILE_ENV):
            chosen.append(FileSink(env[PROGRESS_FILE_ENV]))
        chosen.extend(sinks or ())
        return cls(stage, total_steps, chosen, **options)

    @property
    def active_sinks(self) -> list[Any]:
        """Sinks still receiving reports (a failed sink is dropped)."""
        return [slot.sink for slot in self._slots if not slot.disabled]

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Record progress at `step` (steps done so far); deliver to the sinks that are due."""
        if self._finished:
            return
        try:
            now = self.clock()
            current = _to_floats(metrics or {})
            self._step = int(step)
            self._latest.update(current)
            report = self._report(now, current, final=False)
            for slot in self._slots:
                if not slot.disabled and slot.due(now):
                    self._deliver(slot, report, now)
        except Exception as exc:  # reporting must never take training down
            logger.warning("progress update at step %s ignored: %s", step, redact(repr(exc)))

    def finish(self, metrics: Mapping[str, Any] | None = None, step: int | None = None) -> None:
        """Deliver the final report (100%, the stage's final metrics) to every sink; close them.

        `step` defaults to the larger of the last updated step and `total_steps`.
        """
        if self._finished:
            return
        self._finished = True
        try:
            now = self.clock()
            current = _to_floats(metrics or {})
            self._step = max(self._step, self.total_steps) if step is None else int(step)
            self._latest.update(current)
            report = self._report(now, current, final=True)
            for slot in self._slots:
                if not slot.disabled:
                    self._deliver(slot, report, now)
        except Exception as exc:
            logger.warning("final progress report failed: %s", redact(repr(exc)))
        finally:
            self._close()

    def close(self) -> None:
        """Stop without a final report (a failed stage): deliver what is pending, close sinks."""
        if self._finished:
            return
        self._finished = True
        try:
            now = self.clock()
            report = self._report(now, {}, final=False)
            for slot in self._slots:
                if not slot.disabled and slot.delivered_step != self._step:
                    self._deliver(slot, report, now)
        except Exception as exc:
            logger.warning("last progress report failed: %s", redact(repr(exc)))
        finally:
            self._close()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _report(self, now: float, current: dict[str, float], final: bool) -> ProgressReport:
        total = max(self.total_steps, 0)
        step = self._step
        if final:
            percent, eta = 100.0, 0.0
        else:
            percent = min(100.0, 100.0 * step / total) if total else 0.0
            eta = estimate_eta(step, total, self.start_step, now - self._started)
        return ProgressReport(
            stage=self.stage,
            step=step,
            total_steps=total,
            percent=percent,
            eta_seconds=eta,
            elapsed_seconds=max(0.0, now - self._started),
            metrics=current,
            latest_metrics=dict(self._latest),
            final=final,
        )

    def _deliver(self, slot: _Slot, report: ProgressReport, now: float) -> None:
        try:
            slot.sink.report(report)
        except Exception as exc:
            slot.disabled = True
            logger.warning("%s", _describe_failure(slot.sink, exc))
            self._close_sink(slot.sink)
            return
        slot.last_delivery = now
        slot.delivered_step = report.step

    def _close(self) -> None:
        for slot in self._slots:
            if not slot.disabled:
                self._close_sink(slot.sink)

    @staticmethod
    def _close_sink(sink: Any) -> None:
        close = getattr(sink, "close", None)
        if callable(close):
            try:
                close()
            except Exception as exc:
                logger.debug("closing %s failed: %s", _sink_name(sink), redact(repr(exc)))


def estimate_eta(step: int, total_steps: int, start_step: int, elapsed_s: float) -> float | None:
    """Seconds left at the average rate since the (re)start; None until a step is done."""
    done = step - start_step
    if done <= 0 or elapsed_s <= 0:
        return None
    remaining = max(total_steps - step, 0)
    return remaining * elapsed_s / done


def _to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metric values as plain floats (tensors and numpy scalars included); others dropped."""
    result: dict[str, float] = {}
    for name, value in metrics.items():
        try:
            result[str(name)] = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            logger.debug("metric %s=%r is not a number; not reported", name, value)
    return result


class FileSink:
    """Writes each report as JSON to `path`, atomically (the local runner polls it for bars).

    A reader never sees a half-written file: the JSON goes to a temporary file in the same
    directory which then replaces `path` (`os.replace` is atomic on POSIX and Windows).
    """

    def __init__(self, path: str | os.PathLike[str], min_interval_s: float = FILE_SINK_INTERVAL_S):
        self.path = Path(path)
        self.min_interval_s = min_interval_s

    def report(self, report: ProgressReport) -> None:
        payload = {
            "stage": report.stage,
            "step": report.step,
            "totalSteps": report.total_steps,
            "percent": report.percent,
            "etaSeconds": report.eta_seconds,
            "elapsedSeconds": report.elapsed_seconds,
            "metrics": finite_metrics(report.latest_metrics),
            "final": report.final,
            "updatedAt": time.time(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(payload, handle, allow_nan=False)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def read_progress(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The last report a `FileSink` wrote to `path`, or None when there is none (yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
