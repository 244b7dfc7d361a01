"""Fixtures for the trainer tests: the tiny example's data and model (made once per session, no
download). The ONE local Ray every training test shares is `ray_session`, in tests/conftest.py
(starting Ray costs seconds on 2 cores; every stage reuses it, as `rlhf run` does)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_jobs import load_make_tiny, tiny_manifest, write_manifest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/make_tiny.py's output, made in a temporary directory."""
    out = tmp_path_factory.mktemp("tiny")
    load_make_tiny().main(["--out", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_run(ray_session, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The tiny job through `rlhf run`'s code once per session (test-sized steps); its output
    feeds the pipeline assertions, the resume tests and the stage-command test."""
    from rlhf_trainer.local import run_local

    work = tmp_path_factory.mktemp("pipeline")
    manifest = write_manifest(work / "job.yaml", tiny_manifest(tiny_dir, work / "unused"))
    return run_local(str(manifest), str(work / "out"), progress_bars=False)
