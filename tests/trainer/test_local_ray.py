"""The local Ray that `rlhf run` (and a stage command without a cluster) starts."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow


def test_local_workers_run_at_normal_priority(ray_session) -> None:
    """Ray's default (nice 15) starves training on a shared machine (launcher.py has figures)."""
    import ray

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == 0
