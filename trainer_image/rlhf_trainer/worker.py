"""What every stage's Ray Train worker does around its loop: context, timings, progress,
checkpoints (Ray Train + DeepSpeed) and the stage's result files.

A checkpoint is one Ray Train checkpoint directory `checkpoints/step_<n>/` holding, per engine,
DeepSpeed's `save_checkpoint` output (model, optimizer and scheduler state, each rank its own
ZeRO shards: Ray Train merges the workers' directories) and `trainer_state.json` (step, which
fixes the data position, the metric history and stage extras such as the KL coefficient).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_operator.api import RLHFJob

from rlhf_trainer.artifacts import (
    HISTORY_FILE,
    METRICS_FILE,
    RUN_FILE,
    TRAINER_STATE_FILE,
    Artifact,
    checkpoint_dir_name,
)
from rlhf_trainer.engine import (
    EnginePlan,
    load_state,
    plan_engine,
    save_pretrained,
    save_state,
    select_accelerator,
)
from rlhf_trainer.jobspec import spec_digest
from rlhf_trainer.progress import FileSink, ProgressReporter, finite_metrics
from rlhf_trainer.tensorboard import TENSORBOARD_DIR, TensorBoardSink

logger = logging.getLogger("rlhf_trainer")

# Keys of the loop config the driver hands to every worker (launcher.py builds it).
CONFIG_JOB = "job"
CONFIG_STAGE = "stage"
CONFIG_ATTEMPT = "attempt"
CONFIG_PROGRESS_FILE = "progress_file"
CONFIG_SUBMITTED_AT = "submitted_at"
CONFIG_RESUME_FROM = "resume_from"


@dataclass
class StageWorker:
    """One worker's view of the stage it runs."""

    job: RLHFJob
    stage: str
    rank: int
    world_size: int
    use_gpu: bool
    config: Mapping[str, Any]
    started_at: float
    artifact: Artifact
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    """CPU seconds of this thread per block: what a block costs even on a shared, busy CPU."""
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from_step: int | None = None
    reporter: ProgressReporter | None = None

    @classmethod
    def start(cls, config: Mapping[str, Any]) -> StageWorker:
        started_at = time.time()
        job = RLHFJob.model_validate(config[CONFIG_JOB])
        use_gpu = job.spec.cluster.workers.gpus_per_worker > 0
        select_accelerator(use_gpu)
        import ray.train
        import torch

        context = ray.train.get_context()
        torch.manual_seed(job.spec.seed)
        stage = config[CONFIG_STAGE]
        worker = cls(
            job=job,
            stage=stage,
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            use_gpu=use_gpu,
            config=config,
            started_at=started_at,
            artifact=Artifact(job.spec.storage.uri, job.metadata.name, stage),
        )
        return worker

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self):
        import ray.train.torch

        return ray.train.torch.get_device()

    @contextlib.contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Add the block's wall time to `timings[name]`, its CPU time to `cpu_timings[name]`."""
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - started
            cpu = time.thread_time() - cpu_started
            self.cpu_timings[name] = self.cpu_timings.get(name, 0.0) + cpu

    def sampling_seed(self, step: int) -> None:
        """Seed torch's RNG from (job seed, rank, step): ranks sample different rollouts, and a
        resumed stage samples what the interrupted one would have."""
        import torch

        torch.manual_seed((self.job.spec.seed * 1_000_003 + self.rank) * 1_000_003 + step)

    # ------------------------------------------------------------------ progress

    def start_progress(self, total_steps: int) -> ProgressReporter:
        sinks: list[Any] = []
        if self.is_main:
            sinks.append(TensorBoardSink.for_artifact(self.artifact.local_dir))
            if self.config.get(CONFIG_PROGRESS_FILE):
                sinks.append(FileSink(self.config[CONFIG_PROGRESS_FILE]))
        self.reporter = ProgressReporter.from_env(
            self.stage,
            total_steps,
            sinks,
            rank=self.rank,
            start_step=self.resumed_from_step or 0,
        )
        return self.reporter

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record a step's metrics (history, progress sinks)."""
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.history.append(row)
        if self.reporter is not None:
            self.reporter.update(step, metrics)

    # ------------------------------------------------------------------ checkpoints

    def restore(self, engines: Mapping[str, Any]) -> dict[str, Any] | None:
        """Load the checkpoint to resume from; None on a fresh start.

        Ray Train's own checkpoint comes first (the latest of this run, after a worker failure
        or when a run directory is restored); else the one the driver found under
        `--resume-from` (Ray Train 2.x's replacement for `resume_from_checkpoint`).
        """
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.config.get(CONFIG_RESUME_FROM):
            checkpoint = ray.train.Checkpoint(self.config[CONFIG_RESUME_FROM])
        if checkpoint is None:
            return None
        with self.timed("restore"), checkpoint.as_directory() as directory:
            root = Path(directory)
            state = json.loads((root / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
            for name, engine in engines.items():
                load_state(engine, root / name)
        self.resumed_from_step = int(state["step"])
        self.history = [row for row in state.get("history", []) if row["step"] <= state["step"]]
        if self.is_main:
            logger.warning("%s: resumed from checkpoint at step %d", self.stage, state["step"])
        return state

    def save_checkpoint(
        self,
        step: int,
        engines: Mapping[str, Any],
        metrics: Mapping[str, float],
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """A resumable checkpoint at `step` (steps done), persisted by Ray Train. Collective."""
        import ray.train

        with self.timed("checkpoint"):
            directory = Path(tempfile.mkdtemp(prefix=f"rlhf-{self.stage}-ckpt-"))
            try:
                for name, engine in engines.items():
                    save_state(engine, directory / name)
                if self.is_main:
                    state = {"step": step, "history": self.history, **(extra or {})}
                    (directory / TRAINER_STATE_FILE).write_text(json.dumps(state), "utf-8")
                ray.train.report(
                    finite_metrics({"step": float(step), **metrics}),
                    checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                    checkpoint_dir_name=checkpoint_dir_name(step),
                )
            finally:
                shutil.rmtree(directory, ignore_errors=True)

    # ------------------------------------------------------------------ models

    def engine(
        self, hidden_size: int | None, load: Callable[[Any], Any], **trained: Any
    ) -> tuple[EnginePlan, Any, Any]:
        """Plan, load (`load(dtype)`, in the spec's precision) and wrap one model: (its plan,
        the model, its DeepSpeed engine). `trained`: `engine.plan_engine`'s settings of a
        trained model (learning_rate, micro_batch, ...); without a learning rate it is frozen.
        Call it model by model: each engine is made before the next model is loaded."""
        with self.timed("model_load"):
            plan = plan_engine(
                self.job.spec.parallelism,
                use_gpu=self.use_gpu,
                world_size=self.world_size,
                hidden_size=hidden_size,
                **trained,
            )
            model = plan.build(lambda: load(plan.dtype))
        with self.timed("deepspeed_init"):
            return plan, model, plan.initialize(model)

    # ------------------------------------------------------------------ results

    def save_model(self, engine: Any, tokenizer: Any, hf_model: Any = None) -> None:
        """The stage's trained model (+ tokenizer) as its `model` artifact, published once
        written. `hf_model`: the transformers model inside the engine, if not its module itself.
        Collective under ZeRO-3."""
        with self.timed("save"):
            save_pretrained(
                engine,
                engine.module if hf_model is None else hf_model,
                tokenizer,
                self.artifact.path("model"),
                self.rank,
                self.job.spec.parallelism.zero_stage,
            )
            if self.is_main:
                self.artifact.publish("model")

    def finish(self, metrics: Mapping[str, float], *, steps_run: int, total_steps: int) -> None:
        """Write metrics.json, history.jsonl and run.json (rank 0); final progress report.

        run.json is written last: its presence marks the stage as finished (`rlhf run --resume`).
        """
        final = finite_metrics({k: float(v) for k, v in metrics.items()})
        if self.reporter is not None:
            self.reporter.finish(final, step=total_steps)
        if not self.is_main:
            return
        self.artifact.write_json(METRICS_FILE, final)
        history_path = self.artifact.path(HISTORY_FILE)
        history_path.write_text(
            "".join(json.dumps(finite_metrics(row)) + "\n" for row in self.history), "utf-8"
        )
        self.artifact.publish(HISTORY_FILE)
        if self.artifact.path(TENSORBOARD_DIR).exists():
            self.artifact.publish(TENSORBOARD_DIR)
        finished_at = time.time()
        self.timings["loop"] = finished_at - self.started_at
        run = {
            "stage": self.stage,
            "attempt": self.config.get(CONFIG_ATTEMPT, 1),
            "world_size": self.world_size,
            "total_steps": total_steps,
            "steps_run": steps_run,
            "resumed_from_step": self.resumed_from_step,
            "spec_digest": spec_digest(self.job),
            "started_at": self.started_at,
            "finished_at": finished_at,
            "worker_group_start": self.started_at - self.config.get(CONFIG_SUBMITTED_AT, 0.0),
            "timings": self.timings,
            "cpu_timings": self.cpu_timings,
        }
        self.artifact.write_json(RUN_FILE, run)


# ---------------------------------------------------------------------- collectives


def all_mean(values: list[float]) -> list[float]:
    """Element-wise mean over the workers (one gloo/NCCL all-reduce for the whole list)."""
    return [v / _world_size() for v in all_sum(values)]


def all_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def gather_objects(obj: Any) -> list[Any]:
    """Every worker's `obj`, in rank order (on every worker)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1
