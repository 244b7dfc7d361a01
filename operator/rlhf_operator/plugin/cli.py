"""`kubectl rlhf`: list, status, describe and logs of RLHFJobs, and validate a manifest offline
(a kubectl plugin).

Installed as the console script `kubectl-rlhf`; kubectl runs any `kubectl-<name>` on PATH as
`kubectl <name>`. kubectl passes no flags to plugins, so `-n`, `--context` and `--kubeconfig`
are parsed here, before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException

from rlhf_operator import names
from rlhf_operator.manifest import validate_file, version
from rlhf_operator.plugin.hints import job_hints
from rlhf_operator.plugin.kube import SUBMITTER_CONTAINER, Kube, PluginError, api_error, connect
from rlhf_operator.plugin.render import render_describe, render_list, render_status
from rlhf_operator.plugin.summary import job_row, job_summary


def build_parser() -> argparse.ArgumentParser:
    """The command line (global flags are accepted before or after the subcommand)."""

    def common(parser: argparse.ArgumentParser, default: Any) -> None:
        parser.add_argument("-n", "--namespace", default=default,
                            help="namespace (default: the kubeconfig context's)")  # fmt: skip
        parser.add_argument("--context", default=default, help="kubeconfig context to use")
        parser.add_argument("--kubeconfig", default=default, help="path to a kubeconfig file")

    root = argparse.ArgumentParser(
        prog="kubectl rlhf", description="Watch RLHFJobs: progress, metrics, hints and logs."
    )
    common(root, None)
    root.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, description=help_text)
        common(parser, argparse.SUPPRESS)  # SUPPRESS: never overwrite a flag given earlier
        return parser

    ls = command("list", "jobs with phase, stage, progress, reward, cluster and age")
    ls.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    _output(ls)

    st = command("status", "stage timeline, progress, latest metrics, curves and hints")
    st.add_argument("job", nargs="?", help="RLHFJob name")
    st.add_argument("-f", "--filename", help="render a saved manifest (kubectl get -o yaml)")
    _output(st)

    ds = command("describe", "status, plus conditions and the job's events")
    ds.add_argument("job", help="RLHFJob name")
    _output(ds)

    va = command("validate", "check a manifest offline, as the operator would (no cluster needed)")
    va.add_argument("filename", help="RLHFJob manifest (YAML or JSON file)")
    va.add_argument("--local", action="store_true",
                    help="check it for `rlhf run` instead (local storage and paths)")  # fmt: skip

    lg = command("logs", "the Ray driver log of a stage (through KubeRay's submitter pod)")
    lg.add_argument("job", help="RLHFJob name")
    lg.add_argument("--stage", help="stage (default: the current one)")
    lg.add_argument("--attempt", type=int, help="attempt number (default: the latest)")
    lg.add_argument("-f", "--follow", action="store_true", help="stream new lines")
    lg.add_argument("--tail", type=int, help="only the last N lines")
    return root


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `kubectl-rlhf`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ApiException as exc:  # the API server's message, not a traceback
        print(f"error: {exc.status} {api_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C ends `logs -f`
        return 130


# ---------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    kube, namespace = _connect(args)
    now = datetime.now(UTC)
    jobs = kube.list_jobs(None if args.all_namespaces else namespace)
    rows = [job_row(job, now) for job in jobs]
    if args.output == "json":
        _print_json({"items": rows})
    else:
        print(render_list(rows, all_namespaces=args.all_namespaces))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    if args.filename:
        job = yaml.safe_load(Path(args.filename).read_text())
        summary = job_summary(job, now, job_hints(job, now=now))
    else:
        if not args.job:
            raise PluginError("status needs a JOB name (or -f FILE)")
        kube, namespace = _connect(args)
        summary = _live_summary(kube, namespace, args.job, now)
    _print_json(summary) if args.output == "json" else print(render_status(summary))
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    kube, namespace = _connect(args)
    now = datetime.now(UTC)
    summary = _live_summary(kube, namespace, args.job, now)
    events = _optional(lambda: kube.job_events(namespace, args.job), "events")
    if args.output == "json":
        _print_json({**summary, "events": events})
    else:
        print(render_describe(summary, events))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    kube, namespace = _connect(args)
    job = kube.get_job(namespace, args.job)
    status = job.get("status") or {}
    stage = args.stage or status.get("stage")
    if not stage:
        raise PluginError(f"{args.job} has not started a stage yet (phase {status.get('phase')})")
    stage_status = (status.get("stages") or {}).get(stage) or {}
    rayjob = (
        names.rayjob_name(args.job, stage, args.attempt)
        if args.attempt
        else stage_status.get("rayJob")
    )
    if not rayjob:
        raise PluginError(f"stage {stage} of {args.job} has no RayJob yet")
    pods = kube.submitter_pods(namespace, rayjob)
    if not pods:
        raise PluginError(
            f"no submitter pod for RayJob {rayjob}: KubeRay starts it once the Ray cluster is "
            "ready, and removes it with the RayJob "
            f"(kubectl describe rayjob {rayjob} -n {namespace})"
        )
    pod = pods[0]
    containers = [c["name"] for c in (pod.get("spec") or {}).get("containers") or []]
    container = SUBMITTER_CONTAINER if SUBMITTER_CONTAINER in containers else None
    out = sys.stdout.buffer
    for chunk in kube.stream_logs(
        namespace, pod["metadata"]["name"], container, args.follow, args.tail
    ):
        out.write(chunk)
        out.flush()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Offline: a cluster manifest by default (it is about to be applied); exit 2 on a problem."""
    code, report = validate_file(args.filename, "local" if args.local else "cluster")
    print(report, file=sys.stderr if code else sys.stdout)
    return code


COMMANDS = {
    "validate": cmd_validate,
    "list": cmd_list,
    "status": cmd_status,
    "describe": cmd_describe,
    "logs": cmd_logs,
}


# ---------------------------------------------------------------------------- helpers


def _connect(args: argparse.Namespace) -> tuple[Kube, str]:
    kube, namespace = connect(args.context, args.kubeconfig)
    return kube, args.namespace or namespace


def _live_summary(kube: Kube, namespace: str, name: str, now: datetime) -> dict[str, Any]:
    """The job plus what the hints need (its cluster's pods, its stage RayJobs)."""
    job = kube.get_job(namespace, name)
    cluster = ((job.get("status") or {}).get("cluster") or {}).get("name")
    pods = _optional(lambda: kube.cluster_pods(namespace, cluster), "pods") if cluster else []
    rayjobs = _optional(lambda: kube.stage_rayjobs(namespace, name), "rayjobs")
    return job_summary(job, now, job_hints(job, pods, rayjobs, now=now), rayjobs)


def _optional(read: Callable[[], list[dict[str, Any]]], what: str) -> list[dict[str, Any]]:
    """A read that only feeds hints: without permission, skip it and say so on stderr."""
    try:
        return read()
    except ApiException as exc:
        print(f"note: cannot read {what} ({exc.status} {exc.reason}); hints from them are "
              "skipped", file=sys.stderr)  # fmt: skip
        return []


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False, default=str))
