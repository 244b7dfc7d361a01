"""Pure: `kubectl rlhf` output as terminal text, from the dicts `summary` builds.

Plain text (no colour codes) so it reads the same in a terminal, a pipe and a CI log.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_operator.plugin.fmt import bar, duration, number, sparkline
from rlhf_operator.plugin.summary import curve_stage, curves, failure_line

Obj = Mapping[str, Any]
WIDTH = 100
HINT_MARKS = {"error": "!!", "warning": "! ", "info": "i "}


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A kubectl-style table: upper-case headers, columns padded, three spaces apart."""
    cells = [list(headers), *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def render_list(rows: Sequence[Obj], all_namespaces: bool = False, missing: str = "-") -> str:
    """`kubectl rlhf list`: one line per job (`missing` fills empty cells; kubectl leaves them
    blank)."""
    if not rows:
        return "No RLHFJobs found."
    headers = ["NAME", "PHASE", "STAGE", "PROGRESS", "REWARD", "CLUSTER", "AGE"]
    keys = ["name", "phase", "stage", "progress", "reward", "cluster"]
    body = [[r[k] or missing for k in keys] + [duration(r["ageSeconds"])] for r in rows]
    if all_namespaces:
        headers = ["NAMESPACE", *headers]
        body = [[r["namespace"] or missing, *line] for r, line in zip(rows, body, strict=True)]
    return table(headers, body)


def render_status(summary: Obj) -> str:
    """`kubectl rlhf status JOB`: header, stage timeline, metrics, curves, evaluation, hints."""
    parts = [
        _header(summary),
        _timeline(summary),
        _metrics(summary),
        _curves(summary),
        _evaluation(summary),
        render_hints(summary["hints"]),
    ]
    return "\n\n".join(p for p in parts if p)


def render_hints(hints: Sequence[Obj]) -> str:
    """The hints, most blocking first, wrapped to the terminal width."""
    if not hints:
        return ""
    lines = ["Hints:"]
    for h in hints:
        mark = HINT_MARKS.get(h["severity"], "- ")
        text = f"{mark} {h['reason']}: {h['message']}"
        lines.append(textwrap.fill(text, WIDTH, initial_indent="  ", subsequent_indent="      "))
    return "\n".join(lines)


def render_describe(summary: Obj, events: Sequence[Obj] = ()) -> str:
    """`kubectl rlhf describe JOB`: status, then conditions and the job's recent events."""
    parts = [render_status(summary)]
    if summary["conditions"]:
        rows = [
            [c.get("type", ""), c.get("status", ""), c.get("reason", ""), c.get("message", "")]
            for c in summary["conditions"]
        ]
        parts.append(
            "Conditions:\n" + _indent(table(["TYPE", "STATUS", "REASON", "MESSAGE"], rows))
        )
    if events:
        rows = [
            [
                e.get("type", ""),
                e.get("reason", ""),
                str(e.get("count") or 1),
                (e.get("message") or "").strip(),
            ]
            for e in events
        ]
        parts.append("Events:\n" + _indent(table(["TYPE", "REASON", "COUNT", "MESSAGE"], rows)))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------- sections


def _header(s: Obj) -> str:
    where = f"{s['namespace']}/{s['name']}" if s.get("namespace") else s["name"]
    phase = s["phase"]
    if s.get("stage"):
        position = f" ({s['stageIndex']}/{s['stageCount']})" if s.get("stageIndex") else ""
        phase += f" - stage {s['stage']}{position}"
    rows = [("Job", where), ("Phase", phase), ("Age", duration(s.get("ageSeconds")))]
    label = {"Succeeded": "Ran", "Failed": "Ran", "Running": "Running for"}.get(s["phase"])
    if label and s.get("durationSeconds") is not None:
        rows.append((label, duration(s["durationSeconds"])))
    cluster = s.get("cluster") or {}
    if cluster.get("name"):
        origin = "claimed from a warm pool" if cluster.get("reused") else "created for this job"
        rows.append(("Cluster", f"{cluster['name']} ({origin})"))
        if cluster.get("dashboardURL"):
            rows.append(("Dashboard", cluster["dashboardURL"]))
    if s.get("message"):  # the first line: a failure's driver log tail is in `last error`
        lines = s["message"].strip().splitlines()
        rows.append(("Message", lines[0] + (" …" if len(lines) > 1 else "")))
    width = max(len(k) for k, _ in rows) + 2
    return "\n".join(
        textwrap.fill(v, WIDTH, initial_indent=f"{k + ':':<{width}}", subsequent_indent=" " * width)
        for k, v in rows
    )


def _timeline(s: Obj) -> str:
    rows, notes = [], {}
    for st in s["stages"]:
        progress = st.get("progress") or {}
        percent = progress.get("percent")
        if st["state"] == "Succeeded" and percent is None:
            percent = 100.0
        shown = (
            ""
            if percent is None and st["state"] in ("Pending", "Skipped")
            else (f"{bar(percent)} {percent or 0:>3.0f}%")
        )
        detail = []
        if progress.get("totalSteps"):
            detail.append(f"step {progress.get('step', 0)}/{progress['totalSteps']}")
        if st["state"] == "Running" and progress.get("etaSeconds") is not None:
            detail.append(f"eta {duration(progress['etaSeconds'])}")
        if st.get("resumedFromStep") is not None:
            detail.append(f"resumed from step {st['resumedFromStep']}")
        rows.append(
            [
                st["name"],
                st["state"],
                _attempts(st),
                duration(st["durationSeconds"]),
                f"{shown}  {', '.join(detail)}".rstrip() if shown else ", ".join(detail),
            ]
        )
        last_error = (st.get("errors") or [None])[-1] or failure_line(st.get("message"))
        if last_error and st["state"] in ("Failed", "Running", "Pending"):
            notes[st["name"]] = last_error
    lines = table(["STAGE", "STATE", "ATTEMPTS", "DURATION", "PROGRESS"], rows).splitlines()
    out = [lines[0]]
    for line, st in zip(lines[1:], s["stages"], strict=True):
        out.append(line)
        if st["name"] in notes:
            wrapped = textwrap.fill(f"last error: {notes[st['name']]}", WIDTH - 6)
            out.append(textwrap.indent(wrapped, "      "))
    return "\n".join(out)


def _attempts(st: Obj) -> str:
    """ "2 (1 failed)": attempts started, and how many of them failed (resumes do not fail)."""
    if not st["attempts"]:
        return "-"
    return f"{st['attempts']} ({st['failures']} failed)" if st["failures"] else str(st["attempts"])


def _metrics(s: Obj) -> str:
    shown = [st for st in s["stages"] if st["metrics"]]
    current = [st for st in shown if st["name"] == s.get("stage")] or shown[-1:]
    if not current:
        return ""
    st = current[0]
    items = [f"{k} {number(v)}" for k, v in st["metrics"].items()]
    return f"Latest metrics ({st['name']}):\n" + textwrap.fill(
        "   ".join(items), WIDTH, initial_indent="  ", subsequent_indent="  "
    )


def _curves(s: Obj) -> str:
    st = curve_stage(s)
    if st is None:
        return ""
    series = curves(st)
    steps = sorted(p.get("step", 0) for p in st["history"])
    head = f"Curves ({st['name']}, steps {steps[0]}-{steps[-1]}, {len(steps)} points):"
    width = max(len(k) for k in series)
    lines = [
        f"  {name:<{width}}  {sparkline(values)}  {number(values[0])} -> {number(values[-1])}"
        for name, values in series.items()
        if values
    ]
    return "\n".join([head, *lines])


def _evaluation(s: Obj) -> str:
    ev = s.get("evaluation") or {}
    if not ev:
        return ""
    parts = []
    if ev.get("winRate") is not None:
        parts.append(f"win rate {ev['winRate'] * 100:.1f}% (PPO policy over SFT)")
    if ev.get("judgeWinRate") is not None:
        judge = f" ({ev['judge']})" if ev.get("judge") else ""
        parts.append(f"by the independent judge{judge} {ev['judgeWinRate'] * 100:.1f}%")
    if ev.get("meanRewardBefore") is not None and ev.get("meanRewardAfter") is not None:
        before, after = number(ev["meanRewardBefore"]), number(ev["meanRewardAfter"])
        parts.append(f"mean reward {before} (SFT) -> {after} (PPO)")
    return "Evaluation:\n  " + "; ".join(parts) if parts else ""


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
