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


@pytest.fixture(scope="session")
def one_rank_group():
    """A one-process torch.distributed group (gloo) for DeepSpeed engines in this process, kept
    for the whole session: DeepSpeed caches the world group, so a destroyed and re-created one
    is "not registered" for the next engine."""
    import os
    import socket

    import torch.distributed as dist

    with socket.socket() as probe:  # a free port: two test sessions may share a machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        "DS_ACCELERATOR": "cpu",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
