"""`engine: vllm` where vLLM is missing or broken: a message naming the field and the install
command, before any worker starts; nothing falls back to `hf`. No training: seconds."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from rlhf_trainer import cli
from rlhf_trainer.jobspec import UserError
from rlhf_trainer.rollout.vllm import require_vllm
from tiny_jobs import tiny_manifest, write_manifest

without_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="vLLM is installed in this environment"
)


def manifest(tiny_dir: Path, tmp_path: Path, **rollouts: dict) -> Path:
    job = tiny_manifest(tiny_dir, tmp_path / "out")
    for stage, rollout in rollouts.items():
        job["spec"]["stages"][stage]["rollout"] = rollout
    return write_manifest(tmp_path / "job.yaml", job)


@without_vllm
def test_rlhf_run_names_the_ppo_field_and_the_install(tiny_dir, tmp_path, capsys) -> None:
    path = manifest(tiny_dir, tmp_path, ppo={"engine": "vllm"})
    code = cli.main(["run", str(path), "--no-progress"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0
    assert last.startswith(
        "error: spec.stages.ppo.rollout.engine: vllm is set, but vLLM is not installed"
    )
    assert "pip install '.[vllm]'" in last and "make vllm-env" in last
    assert not (tmp_path / "out").exists()  # refused before anything ran


@without_vllm
def test_evaluation_names_its_own_field_when_it_chose_vllm(tiny_dir, tmp_path, capsys) -> None:
    path = manifest(tiny_dir, tmp_path, evaluation={"engine": "vllm"})
    assert cli.main(["run", str(path), "--no-progress"]) != 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: spec.stages.evaluation.rollout.engine: vllm is set")


def test_a_broken_vllm_install_is_named_not_skipped(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(UserError) as error:
        require_vllm("spec.stages.ppo.rollout.engine")
    message = str(error.value)
    assert message.startswith("spec.stages.ppo.rollout.engine: vllm is set, but vLLM cannot be")
    assert "pip install '.[vllm]'" in message
    assert "or set spec.stages.ppo.rollout.engine: hf" in message
