"""The `rlhf` command (and `python -m rlhf_trainer`).

    rlhf validate job.yaml [--local|--cluster]
        check a manifest offline (schema, CEL rules, the operator's checks; local paths)
    rlhf run job.yaml [--output DIR] [--resume] [--verbose]
        the whole job locally: one local Ray, every enabled stage, progress bars, summary.json
    rlhf stage <sft|reward|ppo|evaluation> --job '<RLHFJob JSON>'|job.yaml
               [--attempt N] [--resume-from URI]
        one stage: what a stage RayJob runs (docs/CONTRACTS.md §1); attaches to the running Ray
    rlhf plan job.yaml [--gpu-memory 80GiB] [--model-config config.json]
        every stage's memory per GPU and per host from the model's config (no weights, no GPU);
        exit 3 when a stage does not fit, with the setting that would make it fit
    rlhf --version

Exit codes: 0 success, 1 the stage failed, 2 bad input (the message, naming the spec field, is
the last line on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from rlhf_operator.api import STAGE_ORDER
from rlhf_operator.manifest import validate_file, version

from rlhf_trainer.jobspec import UserError

EXIT_FAILED = 1
EXIT_USER_ERROR = 2


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="rlhf", description="RLHF trainer (Ray Train + DeepSpeed).")
    root.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = root.add_subparsers(dest="command", required=True)

    check = commands.add_parser("validate", help="check a manifest offline (no Ray, no cluster)")
    check.add_argument("manifest", help="RLHFJob manifest (YAML or JSON file)")
    where = check.add_mutually_exclusive_group()
    for target, when in (("local", "local"), ("cluster", "s3:// or pvc://")):
        where.add_argument(
            f"--{target}",
            dest="target",
            action="store_const",
            const=target,
            help=f"check it for a {target} run (default for {when} storage)",
        )

    run = commands.add_parser("run", help="run a whole RLHFJob locally")
    run.add_argument("manifest", help="RLHFJob manifest (YAML or JSON file)")
    run.add_argument("--output", help="output directory (overrides spec.storage.uri)")
    run.add_argument(
        "--resume", action="store_true", help="resume each stage from its last checkpoint"
    )
    run.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    plan = commands.add_parser("plan", help="memory per GPU and host of every stage")
    plan.add_argument("manifest", help="RLHFJob manifest (YAML or JSON file)")
    plan.add_argument(
        "--gpu-memory",
        help="memory of one GPU, e.g. 80GiB (default: from the workers' nvidia.com/gpu.product "
        "node selector)",
    )
    plan.add_argument(
        "--model-config", help="config.json (or its directory) of spec.model.base, if offline"
    )

    stage = commands.add_parser("stage", help="run one stage (what a stage RayJob runs)")
    stage.add_argument("stage", choices=STAGE_ORDER)
    stage.add_argument("--job", required=True, help="RLHFJob as JSON, or a .json/.yaml path")
    stage.add_argument("--attempt", type=int, default=1, help="1-based attempt number")
    stage.add_argument("--resume-from", help="checkpoint directory URI to resume from")
    return root


def _stage(args: argparse.Namespace) -> None:
    from rlhf_trainer.jobspec import load_job, with_absolute_paths
    from rlhf_trainer.launcher import run_stage
    from rlhf_trainer.summary import stage_line

    job = with_absolute_paths(load_job(args.job))
    result = run_stage(
        job, args.stage, attempt=args.attempt, resume_from=args.resume_from, attach=True
    )
    print(stage_line(result), flush=True)
    print(
        json.dumps(
            {
                "stage": args.stage,
                "metrics": result.metrics,
                "resumedFromStep": result.resumed_from_step,
            }
        )
    )


def _run(args: argparse.Namespace) -> None:
    from rlhf_trainer.local import run_local

    run_local(
        args.manifest,
        args.output,
        resume=args.resume,
        verbose=args.verbose,
        progress_bars=not args.no_progress,
    )


EXIT_DOES_NOT_FIT = 3


def _plan(args: argparse.Namespace) -> int:
    from rlhf_trainer.jobspec import load_job
    from rlhf_trainer.plan import report

    try:
        code, text = report(load_job(args.manifest), args.gpu_memory, args.model_config)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(text)
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "validate":  # before anything imports torch or ray
        code, report = validate_file(args.manifest, args.target or "auto")
        print(report, file=sys.stderr if code else sys.stdout)
        return code
    if args.command == "plan":
        return _plan(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from rlhf_trainer.launcher import StageFailed

    try:
        _run(args) if args.command == "run" else _stage(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
