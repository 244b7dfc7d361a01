"""Driver side of a stage: Ray, the TorchTrainer, checkpoints to resume from, the result.

    result = run_stage(job, "sft")            # a StageResult: metrics, history, timings

is what `python -m rlhf_trainer stage` and `rlhf run` call for every stage, and what a benchmark
can time. Ray is started (or attached to) once per process and reused by every later stage.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from rlhf_operator.api import RLHFJob
from rlhf_operator.api.storage import local_path

from rlhf_trainer.artifacts import (
    CHECKPOINTS_DIR,
    HISTORY_FILE,
    METRICS_FILE,
    RUN_FILE,
    Artifact,
    delete_file,
    delete_tree,
    latest_checkpoint,
    read_json,
    read_jsonl,
)
from rlhf_trainer.jit_ops import use_environment_extensions_dir
from rlhf_trainer.jobspec import UserError, is_remote, spec_digest
from rlhf_trainer.scratch import job_scratch, run_stage_loop
from rlhf_trainer.stages import STAGE_MODULES
from rlhf_trainer.worker import (
    CONFIG_ATTEMPT,
    CONFIG_JOB,
    CONFIG_PROGRESS_FILE,
    CONFIG_RESUME_FROM,
    CONFIG_STAGE,
    CONFIG_SUBMITTED_AT,
)

logger = logging.getLogger("rlhf_trainer")

# Worker failures inside one attempt are retried by Ray Train from the attempt's last
# checkpoint; the operator's spec.runPolicy.backoffLimit retries whole attempts on top.
WORKER_FAILURE_RETRIES = 2
CHECKPOINTS_TO_KEEP = 2
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2  # the stages pass only small configs through Ray
# Ray starts worker processes at nice 15 so that its own daemons win the CPU. On a laptop or a
# shared machine that hands the CPU to every other process first: with two busy processes beside
# it, the tiny job's SFT + reward + PPO took 11.6-11.8 min at nice 15 and 1.6-2.1 min at nice 0.
# A local Ray's workers ARE the job, so they run at normal priority (RAY_worker_niceness, if set,
# still wins; a cluster's pods are not touched).
LOCAL_WORKER_NICENESS = "0"


class StageFailed(RuntimeError):
    """A stage's workers failed for a reason that is not the user's input."""


@dataclass
class StageResult:
    """What a stage did: its final metrics, per-step history and where time went."""

    stage: str
    artifact: str
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    total_steps: int = 0
    steps_run: int = 0
    resumed_from_step: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    skipped: str | None = None
    """Why the stage did not run (a pretrained reward model was given; an earlier run of the
    same spec finished it: then metrics and history are that run's), else None."""


def stage_module(stage: str):
    if stage not in STAGE_MODULES:
        raise UserError(f"unknown stage {stage!r}; use one of {', '.join(STAGE_MODULES)}.")
    return importlib.import_module(STAGE_MODULES[stage])


def preflight(job: RLHFJob, stage: str, check_upstream: bool = True) -> None:
    """Check a stage's inputs (datasets, fields, model paths) before any worker starts."""
    stage_module(stage).preflight(job, check_upstream)


# ---------------------------------------------------------------------- Ray


def ensure_ray(
    *, attach: bool, num_cpus: int | None = None, verbose: bool = False, dashboard: bool = False
) -> float:
    """Connect to Ray once per process; seconds it took (0 when already connected).

    `attach`: join the running cluster (RAY_ADDRESS, or one started with `ray start`), as a
    stage RayJob does, falling back to a local instance; otherwise always start a local one
    (`rlhf run`: one local Ray for every stage). `dashboard`: also serve the dashboard and
    its job submission API on 127.0.0.1:8265 (what KubeRay's submitter talks to). A local Ray
    gets this Python environment's own torch extension cache (TORCH_EXTENSIONS_DIR, unless set:
    rlhf_trainer.jit_ops says why).
    """
    import ray

    if ray.is_initialized():
        return 0.0
    if not attach:
        use_environment_extensions_dir()  # before Ray starts: its workers inherit it
    started = time.perf_counter()
    if attach:
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=True)
            return time.perf_counter() - started
        except ConnectionError:
            logger.info("no running Ray cluster found; starting a local one")
            use_environment_extensions_dir()
    os.environ.setdefault("RAY_worker_niceness", LOCAL_WORKER_NICENESS)  # read by the raylet
    ray.init(
        address="local",
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=dashboard,
        log_to_driver=verbose,
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        # The stages' own warnings (resumed from step N) reach the driver through the result.
        logging_level=logging.WARNING,
    )
    return time.perf_counter() - started


@dataclass(frozen=True)
class WorkerLayout:
    """Ray Train's workers of a stage: one DeepSpeed rank per GPU.

    A pod (a RayCluster worker replica) with `gpusPerWorker` GPUs runs that many Ray Train
    workers with one GPU each, as `torchrun --nproc-per-node` would: Ray Train sorts the workers
    by node, so each pod holds consecutive ranks with local ranks 0..gpus-1 and CUDA device =
    local rank; NCCL connects the pods over the pod network and the GPUs of a pod over /dev/shm
    (an in-memory emptyDir, builders.py). CPU-only pods run one worker each.
    """

    num_workers: int
    use_gpu: bool
    resources_per_worker: dict[str, float]

    def scaling_config(self):
        from ray.train import ScalingConfig

        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=dict(self.resources_per_worker),
            # Fill each pod's GPUs before the next pod: ranks of a pod share NVLink / shm.
            placement_strategy="PACK",
        )


def _cpu_quantity(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def worker_layout(job: RLHFJob, cluster_cpus: float) -> WorkerLayout:
    """The workers of `job` on a Ray cluster with `cluster_cpus` CPUs: replicas x gpusPerWorker
    one-GPU workers (replicas on CPU), each with its share of the pod's CPU request, capped by
    what the cluster can give each worker (a local Ray on a laptop)."""
    from rlhf_operator.api.spec import ranks

    workers = job.spec.cluster.workers
    per_pod = max(workers.gpus_per_worker, 1)
    count = ranks(job.spec)
    requested = _cpu_quantity(str(workers.resources.requests.get("cpu", "1"))) / per_pod
    available = float(int(cluster_cpus / count)) if cluster_cpus else requested
    resources = {"CPU": max(1.0, min(requested, available))}
    if workers.gpus_per_worker > 0:
        resources["GPU"] = 1.0
    return WorkerLayout(count, workers.gpus_per_worker > 0, resources)


# ---------------------------------------------------------------------- stages


def _root_cause(exc: BaseException) -> BaseException:
    """The worker's own exception inside Ray Train's wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
            continue
        cause = getattr(exc, "cause", None) or exc.__cause__
        if isinstance(cause, BaseException):
            exc = cause
            continue
        break
    return exc


def _resume_checkpoint(artifact: Artifact, resume_from: str | None) -> str | None:
    """The URI of the checkpoint to resume from, or None for a fresh start.

    No `resume_from`: a fresh attempt; stale checkpoints of an earlier run are removed, so Ray
    Train's own restore (it resumes a run directory that holds a snapshot) cannot pick them up.
    `resume_from` = the stage's own checkpoints: Ray Train restores its snapshot itself, and the
    latest checkpoint is the fallback. Elsewhere: the latest checkpoint found there.
    """
    own = artifact.uri_of(CHECKPOINTS_DIR)
    if resume_from is None or resume_from.rstrip("/") != own:
        delete_tree(own)
    if resume_from is None:
        return None
    found = latest_checkpoint(resume_from)
    if found is None:
        logger.warning("no checkpoint under %s: starting fresh", resume_from)
        return None
    uri, step = found
    logger.warning("resuming from the checkpoint at step %d (%s)", step, uri)
    return ray_storage_path(uri)


def ray_storage_path(uri: str) -> str:
    """What Ray Train (pyarrow) can open: object-store URIs as they are, pvc:// and file://
    as the local (mounted) path."""
    return uri if is_remote(uri) else local_path(uri)


def run_stage(
    job: RLHFJob,
    stage: str,
    *,
    attempt: int = 1,
    resume_from: str | None = None,
    progress_file: str | None = None,
    attach: bool = False,
    verbose: bool = False,
) -> StageResult:
    """Run one stage of `job` as a Ray Train TorchTrainer over the spec's workers (the driver's
    and every worker's staged files in the job's scratch directory, removed at the end)."""
    with job_scratch(job.metadata.name, stage):
        return _run_stage(job, stage, attempt, resume_from, progress_file, attach, verbose)


def _run_stage(
    job: RLHFJob,
    stage: str,
    attempt: int,
    resume_from: str | None,
    progress_file: str | None,
    attach: bool,
    verbose: bool,
) -> StageResult:
    started = time.perf_counter()
    artifact = Artifact(job.spec.storage.uri, job.metadata.name, stage)
    if stage == "reward" and job.spec.stages.reward.model:
        return _pretrained_reward(job, artifact)
    module = stage_module(stage)
    module.preflight(job, True)
    ray_seconds = ensure_ray(attach=attach, verbose=verbose)
    delete_file(artifact.uri_of(RUN_FILE))  # the stage is not finished until it writes a new one

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    layout = worker_layout(job, ray.cluster_resources().get("CPU", 1.0))
    if progress_file:
        os.makedirs(os.path.dirname(progress_file) or ".", exist_ok=True)
    loop_config: dict[str, Any] = {
        CONFIG_JOB: job.model_dump(mode="json", by_alias=True, exclude={"status"}),
        CONFIG_STAGE: stage,
        CONFIG_ATTEMPT: attempt,
        CONFIG_PROGRESS_FILE: progress_file,
        CONFIG_RESUME_FROM: _resume_checkpoint(artifact, resume_from),
        CONFIG_SUBMITTED_AT: time.time(),
    }
    trainer = TorchTrainer(
        run_stage_loop,  # the stage module's train_loop in the job's scratch directory
        train_loop_config=loop_config,
        scaling_config=layout.scaling_config(),
        run_config=RunConfig(
            name=CHECKPOINTS_DIR,
            storage_path=ray_storage_path(artifact.uri),
            failure_config=FailureConfig(max_failures=WORKER_FAILURE_RETRIES),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
        ),
    )
    fit_started = time.perf_counter()
    try:
        trainer.fit()
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise StageFailed(f"{stage} failed: {type(cause).__name__}: {cause}") from exc
    fit_ended = time.time()
    fit_seconds = time.perf_counter() - fit_started
    return _result(stage, artifact, started, ray_seconds, fit_seconds, fit_ended)


ALREADY_COMPLETE = "already complete, not run again"


def _pretrained_reward(job: RLHFJob, artifact: Artifact) -> StageResult:
    model = job.spec.stages.reward.model
    return StageResult("reward", artifact.uri, skipped=f"pretrained reward model {model}")


def finished_result(job: RLHFJob, stage: str) -> StageResult | None:
    """The result of `stage` when a run of this very spec finished it (its run.json, written
    last, records the spec's digest), read back from its artifact; else None."""
    artifact = Artifact(job.spec.storage.uri, job.metadata.name, stage)
    if stage == "reward" and job.spec.stages.reward.model:
        return _pretrained_reward(job, artifact)  # nothing to train, ever
    run = read_json(artifact.uri_of(RUN_FILE))
    if not run or run.get("spec_digest") != spec_digest(job):
        return None
    timings = {f"{name}_s": value for name, value in run.get("timings", {}).items()}
    timings["worker_group_start_s"] = run.get("worker_group_start", 0.0)
    return StageResult(
        stage=stage,
        artifact=artifact.uri,
        metrics=read_json(artifact.uri_of(METRICS_FILE)) or {},
        history=read_jsonl(artifact.uri_of(HISTORY_FILE)),
        # what the stage took when it ran (its workers' start and loop; teardown is not known)
        seconds=timings["worker_group_start_s"] + timings.get("loop_s", 0.0),
        total_steps=int(run.get("total_steps", 0)),
        steps_run=int(run.get("steps_run", 0)),
        resumed_from_step=run.get("resumed_from_step"),
        timings=timings,
        skipped=ALREADY_COMPLETE,
    )


def _result(
    stage: str,
    artifact: Artifact,
    started: float,
    ray_seconds: float,
    fit_seconds: float,
    fit_ended: float,
) -> StageResult:
    run = read_json(artifact.uri_of(RUN_FILE)) or {}
    timings = {f"{name}_s": value for name, value in run.get("timings", {}).items()}
    timings.update(
        ray_start_s=ray_seconds,
        fit_s=fit_seconds,
        worker_group_start_s=run.get("worker_group_start", 0.0),
        teardown_s=max(0.0, fit_ended - run.get("finished_at", fit_ended)),
    )
    return StageResult(
        stage=stage,
        artifact=artifact.uri,
        metrics=read_json(artifact.uri_of(METRICS_FILE)) or {},
        history=read_jsonl(artifact.uri_of(HISTORY_FILE)),
        seconds=time.perf_counter() - started,
        total_steps=int(run.get("total_steps", 0)),
        steps_run=int(run.get("steps_run", 0)),
        resumed_from_step=run.get("resumed_from_step"),
        timings=timings,
    )
