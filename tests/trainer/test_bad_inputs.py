"""Bad input gets a message naming the spec field and what to change, before any Ray worker
starts, and leaves nothing half-written behind. No training here: these run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rlhf_trainer import cli
from rlhf_trainer.jobspec import UserError, parse_job, with_absolute_paths
from rlhf_trainer.launcher import preflight
from tiny_jobs import tiny_manifest, write_manifest


def job(tiny_dir: Path, tmp_path: Path, edit=None):
    manifest = tiny_manifest(tiny_dir, tmp_path / "out")
    if edit:
        edit(manifest["spec"])
    return with_absolute_paths(parse_job(manifest))


def rlhf(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()[-1]


def test_missing_column_names_the_field_and_the_columns(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["stages"]["sft"]["dataset"]["responseField"] = "completion"

    with pytest.raises(UserError) as error:
        preflight(job(tiny_dir, tmp_path, edit), "sft")
    message = str(error.value)
    assert message.startswith("spec.stages.sft.dataset.responseField: column 'completion'")
    assert "columns: prompt, response" in message


def test_missing_preference_column(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["stages"]["reward"]["dataset"]["chosenField"] = "preferred"

    with pytest.raises(UserError, match=r"^spec\.stages\.reward\.dataset\.chosenField: .*"):
        preflight(job(tiny_dir, tmp_path, edit), "reward", check_upstream=False)


def test_empty_dataset(tiny_dir, tmp_path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    def edit(spec):
        spec["stages"]["sft"]["dataset"]["uri"] = str(empty)

    with pytest.raises(UserError, match=r"^spec\.stages\.sft\.dataset\.uri: .*(empty|no rows)"):
        preflight(job(tiny_dir, tmp_path, edit), "sft")


def test_dataset_path_that_does_not_exist(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["stages"]["ppo"]["prompts"]["uri"] = str(tmp_path / "nope.jsonl")

    with pytest.raises(UserError, match=r"^spec\.stages\.ppo\.prompts\.uri: .*does not exist"):
        preflight(job(tiny_dir, tmp_path, edit), "ppo", check_upstream=False)


def test_model_path_that_does_not_exist(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["model"]["base"] = str(tmp_path / "no-model")

    with pytest.raises(UserError, match=r"^spec\.model\.base: model path .* does not exist"):
        preflight(job(tiny_dir, tmp_path, edit), "sft")


def test_pretrained_reward_model_path_that_does_not_exist(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["stages"]["reward"]["model"] = "./missing-reward-model"

    with pytest.raises(UserError, match=r"^spec\.stages\.reward\.model: model path"):
        preflight(job(tiny_dir, tmp_path, edit), "ppo", check_upstream=False)


def test_batch_larger_than_the_data_names_batch_size(tiny_dir, tmp_path) -> None:
    def edit(spec):
        spec["stages"]["ppo"]["rolloutBatchSize"] = 4096

    with pytest.raises(UserError, match=r"^spec\.stages\.ppo\.rolloutBatchSize \(4096\)"):
        preflight(job(tiny_dir, tmp_path, edit), "ppo", check_upstream=False)


def test_rlhf_run_rejects_a_bad_dataset_before_any_stage(tiny_dir, tmp_path, capsys) -> None:
    manifest = tiny_manifest(tiny_dir, tmp_path / "out")
    manifest["spec"]["stages"]["ppo"]["prompts"]["promptField"] = "query"
    path = write_manifest(tmp_path / "job.yaml", manifest)

    code, last_line = rlhf(["run", str(path), "--no-progress"], capsys)

    assert code == cli.EXIT_USER_ERROR
    assert last_line.startswith("error: spec.stages.ppo.prompts.promptField: column 'query'")
    assert not (tmp_path / "out").exists()  # no stage started, nothing half-written


def test_rlhf_run_names_an_invalid_spec_field(tiny_dir, tmp_path, capsys) -> None:
    manifest = tiny_manifest(tiny_dir, tmp_path / "out")
    manifest["spec"]["stages"]["ppo"]["clipRange"] = 5
    path = write_manifest(tmp_path / "job.yaml", manifest)

    code, last_line = rlhf(["run", str(path)], capsys)

    assert code == cli.EXIT_USER_ERROR
    assert last_line.startswith("spec.stages.ppo.clipRange: Input should be less than or equal")


def test_rlhf_run_needs_local_storage(tiny_dir, tmp_path, capsys) -> None:
    manifest = tiny_manifest(tiny_dir, tmp_path / "out")
    manifest["spec"]["storage"]["uri"] = "s3://bucket/rlhf"
    path = write_manifest(tmp_path / "job.yaml", manifest)

    code, last_line = rlhf(["run", str(path)], capsys)

    assert code == cli.EXIT_USER_ERROR
    assert "spec.storage.uri: s3://bucket/rlhf is not a local directory" in last_line
    assert "--output" in last_line


def test_stage_command_rejects_malformed_job_json(capsys) -> None:
    code, last_line = rlhf(["stage", "sft", "--job", json.dumps({"spec": {}})], capsys)

    assert code == cli.EXIT_USER_ERROR
    assert "spec.model: Field required" in last_line or "spec.storage" in last_line
