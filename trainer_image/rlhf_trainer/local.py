"""`rlhf run job.yaml`: the whole RLHFJob on this machine, with the stage code a cluster runs.

One local Ray instance serves every stage; each stage is the same TorchTrainer + DeepSpeed run a
stage RayJob starts. Progress bars follow each stage's progress file; at the end the output
directory holds every stage's artifact, summary.json, timings.json and training_curves.png.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from rlhf_operator.api.storage import local_path
from rlhf_operator.manifest import local_path_problems

from rlhf_trainer.artifacts import CHECKPOINTS_DIR, Artifact
from rlhf_trainer.jit_ops import compile_notice
from rlhf_trainer.jobspec import (
    UserError,
    is_local_storage,
    load_job,
    with_absolute_paths,
    with_storage,
)
from rlhf_trainer.launcher import StageResult, ensure_ray, finished_result, preflight, run_stage
from rlhf_trainer.progress import read_progress
from rlhf_trainer.summary import build_summary, overhead_line, stage_line, timings_report

SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
PLOT_FILE = "training_curves.png"
PROGRESS_DIR = ".progress"
POLL_SECONDS = 0.5
BAR_METRICS = ("loss", "eval_loss", "accuracy", "reward_mean", "kl", "win_rate")


@dataclass
class LocalRun:
    summary: dict[str, Any]
    results: dict[str, StageResult]
    output: Path


class ProgressBar:
    """A tqdm bar for one stage, fed by polling the stage's progress file from a thread."""

    def __init__(self, stage: str, path: Path, enabled: bool) -> None:
        self.stage, self.path, self.enabled = stage, path, enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: Any = None
        self._seen: float | None = None

    def __enter__(self) -> ProgressBar:
        self.path.unlink(missing_ok=True)
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc=f"{self.stage} (starting workers)", unit="step", leave=True)
            self._thread = threading.Thread(target=self._follow, daemon=True)
            self._thread.start()
        return self

    def _refresh(self) -> None:
        report = read_progress(self.path)
        if not report or self._bar is None or report.get("updatedAt") == self._seen:
            return
        self._seen = report.get("updatedAt")
        if self._bar.total != report["totalSteps"]:
            self._bar.reset(total=report["totalSteps"])
            self._bar.set_description(self.stage)
        self._bar.n = report["step"]
        shown = {k: f"{v:.3g}" for k, v in report["metrics"].items() if k in BAR_METRICS}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()

    def _follow(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._refresh()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._refresh()
            self._bar.close()


def prepare(manifest: str, output: str | None) -> tuple[Any, Path]:
    """The validated job with local, absolute paths, and the output directory."""
    job = load_job(manifest)
    if output:
        job = with_storage(job, output)
    if not is_local_storage(job.spec.storage.uri):
        raise UserError(
            f"spec.storage.uri: {job.spec.storage.uri} is not a local directory; `rlhf run` "
            "writes locally: pass --output DIR (or set a local path)."
        )
    missing = local_path_problems(job)  # before Ray starts, and before a path reads as an HF id
    if missing:
        raise UserError("\n".join(missing))
    job = with_absolute_paths(job)
    return job, Path(local_path(job.spec.storage.uri))


def finished_stages(job: Any, stages: list[str]) -> dict[str, StageResult]:
    """The leading stages an earlier run of this spec finished, in order, with their results.

    Only a prefix counts: once a stage has to run, every later one runs too (it reads what the
    earlier one is about to make).
    """
    done: dict[str, StageResult] = {}
    for stage in stages:
        result = finished_result(job, stage)
        if result is None:
            break
        done[stage] = result
    return done


def resume_line(done: list[str], todo: list[str], output_dir: Path) -> str:
    """What `--resume` found: the finished stages, and what it runs next (or nothing)."""
    line = f"resume: {', '.join(done)} already complete in {output_dir}"
    if not todo:
        return (
            f"{line}: every stage is complete, nothing to run (run without --resume to train again)"
        )
    return f"{line} (not run again); resuming {todo[0]} from its checkpoints"


def run_local(
    manifest: str,
    output: str | None = None,
    *,
    resume: bool = False,
    verbose: bool = False,
    progress_bars: bool = True,
    out: TextIO = sys.stdout,
) -> LocalRun:
    """Run every enabled stage of the manifest locally; write and return the summary."""
    started = time.perf_counter()
    job, output_dir = prepare(manifest, output)
    stages = job.spec.enabled_stages()
    for stage in stages:  # every input checked before any worker starts
        preflight(job, stage, check_upstream=False)
    import ray  # after the checks: a bad manifest fails fast
    from rlhf_operator.api.spec import ranks

    parallelism = job.spec.parallelism
    print(
        f"rlhf run: job {job.metadata.name}: {' → '.join(stages)} on "
        f"{ranks(job.spec)} workers, DeepSpeed ZeRO-{parallelism.zero_stage}, "
        f"{parallelism.precision}; output {output_dir}",
        file=out,
        flush=True,
    )
    results = finished_stages(job, stages) if resume else {}
    todo = [stage for stage in stages if stage not in results]
    if results:
        print(resume_line(list(results), todo, output_dir), file=out, flush=True)
        for result in results.values():
            print(stage_line(result), file=out, flush=True)
    owns_ray = not ray.is_initialized()
    ray_seconds = ensure_ray(attach=False, verbose=verbose) if todo else 0.0
    if todo:
        print(f"ray: local instance ready in {ray_seconds:.1f}s", file=out, flush=True)
        notice = compile_notice(job.spec.cluster.workers.gpus_per_worker)
        if notice:
            print(notice, file=out, flush=True)
    try:
        for stage in todo:
            checkpoints = Artifact(job.spec.storage.uri, job.metadata.name, stage).uri_of(
                CHECKPOINTS_DIR
            )
            progress_file = output_dir / PROGRESS_DIR / f"{stage}.json"
            # Only the first stage to run resumes: a later stage's checkpoints (if any) were
            # trained on an earlier upstream model than the one this run is about to make.
            resume_this = resume and stage == todo[0]
            with ProgressBar(stage, progress_file, progress_bars):
                results[stage] = run_stage(
                    job,
                    stage,
                    resume_from=checkpoints if resume_this else None,
                    progress_file=str(progress_file),
                    verbose=verbose,
                )
            print(stage_line(results[stage]), file=out, flush=True)
    finally:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
    judge = job.spec.stages.evaluation.judge
    summary = build_summary(
        job.metadata.name,
        time.perf_counter() - started,
        results,
        judge.display_name() if judge is not None and "evaluation" in results else None,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", "utf-8")
    timings = timings_report(ray_seconds, results)
    (output_dir / TIMINGS_FILE).write_text(json.dumps(timings, indent=2) + "\n", "utf-8")
    from rlhf_trainer.plots import plot_curves

    plot = plot_curves({s: r.history for s, r in results.items()}, output_dir / PLOT_FILE)
    if todo:
        print(overhead_line(ray_seconds, results), file=out)
    print(f"summary: {json.dumps(summary)}", file=out)
    written = [output_dir / SUMMARY_FILE, output_dir / TIMINGS_FILE, plot]
    if "evaluation" in results:
        written.append(Path(local_path(results["evaluation"].artifact)) / "examples.md")
    print("wrote " + ", ".join(str(p) for p in written if p), file=out)
    print(
        f"models: {output_dir / job.metadata.name}/<stage>/model; "
        f"wall time {summary['wall_seconds']:.1f}s",
        file=out,
        flush=True,
    )
    return LocalRun(summary, results, output_dir)
