"""Pure: an RLHFJob (a wire dict, as the API returns it) -> the facts `kubectl rlhf` shows.

The same dicts are printed by `-o json` and drawn by `render`, so the text and the JSON output
never disagree. Nothing here does I/O; `now` is always passed in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rlhf_operator import names
from rlhf_operator.api.spec import OPTIONAL_STAGES, STAGE_ORDER
from rlhf_operator.api.timestamps import parse_time

Obj = Mapping[str, Any]


def seconds_between(start: Any, end: Any, now: datetime) -> float | None:
    """Seconds from `start` to `end` (or to `now` while it is still running)."""
    begin = parse_time(start)
    if begin is None:
        return None
    return max(((parse_time(end) or now) - begin).total_seconds(), 0.0)


def _enabled(stage: Any, name: str) -> bool:
    """As RLHFJobSpec.enabled_stages: an optional stage (dpo) runs only when present."""
    if not isinstance(stage, Mapping):
        return name not in OPTIONAL_STAGES
    return bool(stage.get("enabled", True))


def enabled_stages(job: Obj) -> list[str]:
    """Enabled stages in pipeline order, read leniently (the spec may be invalid)."""
    spec_stages = (job.get("spec") or {}).get("stages") or {}
    status_stages = (job.get("status") or {}).get("stages") or {}
    return [
        name
        for name in STAGE_ORDER
        if _enabled(spec_stages.get(name), name) or name in status_stages
    ]


def job_row(job: Obj, now: datetime) -> dict[str, Any]:
    """One line of `kubectl rlhf list` (the printer columns, plus namespace)."""
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "phase": status.get("phase") or "Pending",
        "stage": status.get("stage"),
        "progress": status.get("progress"),
        "reward": status.get("reward"),
        "cluster": (status.get("cluster") or {}).get("name"),
        "ageSeconds": seconds_between(meta.get("creationTimestamp"), None, now),
    }


def stage_summary(name: str, stage: Obj, now: datetime) -> dict[str, Any]:
    """One stage of the timeline: state, attempts, duration, progress, metrics, curve."""
    return {
        "name": name,
        "state": stage.get("state") or "Pending",
        "attempts": stage.get("attempts") or 0,
        "failures": stage.get("failures") or 0,
        "startTime": stage.get("startTime"),
        "completionTime": stage.get("completionTime"),
        "durationSeconds": _stage_duration(stage, now),
        "progress": stage.get("progress"),
        "metrics": dict(stage.get("metrics") or {}),
        "history": list(stage.get("history") or []),
        "rayJob": stage.get("rayJob"),
        "artifact": stage.get("artifact"),
        "resumedFromStep": stage.get("resumedFromStep"),
        "message": stage.get("message"),
    }


def _stage_duration(stage: Obj, now: datetime) -> float | None:
    """Start to end; a running stage counts to `now`; an interrupted one (suspended) has none."""
    if stage.get("completionTime") or stage.get("state") == "Running":
        return seconds_between(stage.get("startTime"), stage.get("completionTime"), now)
    return None


def job_summary(
    job: Obj, now: datetime, hints: Sequence[Obj] = (), rayjobs: Sequence[Obj] = ()
) -> dict[str, Any]:
    """Everything `kubectl rlhf status JOB` shows, as plain JSON-able data.

    `rayjobs`: the job's stage RayJobs, for each stage's failure lines (`errors`, oldest first).
    """
    meta, status = job.get("metadata") or {}, job.get("status") or {}
    stages = status.get("stages") or {}
    order = enabled_stages(job)
    errors = stage_failures(job, rayjobs)
    current = status.get("stage")
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "phase": status.get("phase") or "Pending",
        "stage": current,
        "stageIndex": order.index(current) + 1 if current in order else None,
        "stageCount": len(order),
        "message": status.get("message"),
        "progress": status.get("progress"),
        "reward": status.get("reward"),
        "ageSeconds": seconds_between(meta.get("creationTimestamp"), None, now),
        "durationSeconds": seconds_between(
            status.get("startTime"), status.get("completionTime"), now
        ),
        "cluster": dict(status.get("cluster") or {}),
        "stages": [
            {**stage_summary(name, stages.get(name) or {}, now), "errors": errors.get(name, [])}
            for name in order
        ],
        "evaluation": status.get("evaluation"),
        "conditions": list(status.get("conditions") or []),
        "hints": list(hints),
    }


def failure_line(message: str | None) -> str | None:
    """The line that says what went wrong: the last non-empty line (the exception, as the
    trainer prints it last on stderr and Ray appends the driver's log tail to its message)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    if last.endswith(")") and last.count(")") > last.count("("):
        last = last[:-1]  # the close of the operator's "RayJob x: Ray job FAILED (...)" wrapper
    return last


def stage_failures(job: Obj, rayjobs: Sequence[Obj]) -> dict[str, list[str]]:
    """Per stage, the failure line of every failed attempt (oldest first)."""
    meta_name = (job.get("metadata") or {}).get("name")
    stages = (job.get("status") or {}).get("stages") or {}
    found: dict[str, dict[str, str]] = {}
    for rj in sorted(
        rayjobs, key=lambda r: parse_time(_created(r)) or datetime.min.replace(tzinfo=UTC)
    ):
        labels = (rj.get("metadata") or {}).get("labels") or {}
        stage = labels.get(names.LABEL_STAGE)
        rstatus = rj.get("status") or {}
        failed = rstatus.get("jobStatus") == "FAILED" or rstatus.get("jobDeploymentStatus") in (
            "Failed",
        )
        line = failure_line(rstatus.get("message"))
        if stage and failed and line and labels.get(names.LABEL_JOB) in (None, meta_name):
            found.setdefault(stage, {})[rj["metadata"]["name"]] = line
    for stage, st in stages.items():  # RayJobs gone (or not readable): the last reason only
        line = failure_line(st.get("message"))
        if line and not found.get(stage):
            found[stage] = {st.get("rayJob") or "": line}
    return {stage: list(lines.values()) for stage, lines in found.items()}


def _created(obj: Obj) -> Any:
    return (obj.get("metadata") or {}).get("creationTimestamp")


def curve_stage(summary: Obj) -> Obj | None:
    """The stage whose curve to draw: the current one if it has history, else the last that has."""
    with_history = [s for s in summary["stages"] if s["history"]]
    current = [s for s in with_history if s["name"] == summary.get("stage")]
    return (current or with_history[-1:] or [None])[0]


def curves(stage: Obj) -> dict[str, list[float]]:
    """Per metric, its values in step order, from a stage's bounded `history`."""
    points = sorted(stage["history"], key=lambda p: p.get("step", 0))
    names: dict[str, None] = {}
    for point in points:
        names.update(dict.fromkeys(point.get("metrics") or {}))
    return {
        name: [float(p["metrics"][name]) for p in points if name in (p.get("metrics") or {})]
        for name in names
    }
