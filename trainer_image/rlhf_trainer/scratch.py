"""A per-job scratch directory for everything a stage stages on local disk, removed when the
stage ends.

A warm Ray cluster runs stage after stage of job after job: files a stage copies next to itself
(an s3:// model fetched for `from_pretrained`, a remote dataset and its Arrow cache, a staged
artifact before it is published) would pile up on the pods' disks. Each stage process (the
driver and every Ray Train worker) therefore works in

    $RLHF_SCRATCH_ROOT (default: the system temp dir) / rlhf-jobs / <job>-<stage>-<random>/

and removes it when the stage ends, whether it succeeded or failed. Hugging Face hub downloads
stay in the hub cache (keyed by revision, shared on purpose: the next job of a warm cluster
often wants the same base model).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

ROOT_ENV = "RLHF_SCRATCH_ROOT"
JOBS_DIR = "rlhf-jobs"

_current: Path | None = None
_fallback: Path | None = None


def root() -> Path:
    """Where every job's scratch directory is made."""
    return Path(os.environ.get(ROOT_ENV) or tempfile.gettempdir()) / JOBS_DIR


@contextlib.contextmanager
def job_scratch(job_name: str, stage: str) -> Iterator[Path]:
    """The scratch directory of one stage of one job, for the duration of the block (nested
    blocks reuse the outer one). Removed on exit, also when the stage failed."""
    global _current
    if _current is not None:
        yield _current
        return
    root().mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix=f"{job_name}-{stage}-", dir=root()))
    _current = directory
    try:
        yield directory
    finally:
        _current = None
        _forget_fetched()
        shutil.rmtree(directory, ignore_errors=True)


def current() -> Path | None:
    """The active stage's scratch directory, or None outside a stage."""
    return _current


def scratch_dir(kind: str) -> Path:
    """A new directory for `kind` (fetch, artifact, datasets) under the stage's scratch; outside
    a stage (a unit test, a one-off script) under a process-wide one removed at exit."""
    base = _current or _process_scratch()
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=base))


def _process_scratch() -> Path:
    global _fallback
    if _fallback is None:
        root().mkdir(parents=True, exist_ok=True)
        _fallback = Path(tempfile.mkdtemp(prefix=f"process-{os.getpid()}-", dir=root()))
        atexit.register(shutil.rmtree, _fallback, True)
    return _fallback


def _forget_fetched() -> None:
    """Remote directories fetched during the stage lived in its scratch: drop the cache."""
    from rlhf_trainer.artifacts import fetch_dir

    fetch_dir.cache_clear()


def run_stage_loop(config: Mapping[str, Any]) -> None:
    """The Ray Train loop of every stage: the stage module's `train_loop` inside the job's
    scratch directory (what launcher.py hands to the TorchTrainer)."""
    from rlhf_trainer.stages import STAGE_MODULES
    from rlhf_trainer.worker import CONFIG_JOB, CONFIG_STAGE

    stage = config[CONFIG_STAGE]
    job_name = config[CONFIG_JOB]["metadata"]["name"]
    module = importlib.import_module(STAGE_MODULES[stage])
    with job_scratch(job_name, stage):
        module.train_loop(config)
