"""Datasets, models and artifacts in an object store, against a real S3-compatible server (moto in
server mode, authentication on) reached through the trainer's real clients: s3fs (datasets,
through `datasets`/fsspec) and pyarrow (artifacts, fetched models). Credentials come from the
environment, as the storage Secret's keys reach every Ray pod; the endpoint from
spec.storage.endpoint or AWS_ENDPOINT_URL (which the operator sets on the pods from it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import s3_server
from rlhf_operator.api.spec import PromptDataset, StorageSpec
from rlhf_trainer import scratch
from rlhf_trainer.artifacts import Artifact, read_json
from rlhf_trainer.data import load_eval_rows, load_split
from rlhf_trainer.jobspec import UserError

FIELD = "spec.stages.ppo.prompts"
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


@pytest.fixture(scope="module")
def s3(tiny_dir: Path):
    server = s3_server.start(("datasets", "artifacts"))
    server.upload("datasets", "tiny/prompts.jsonl", tiny_dir / "prompts.jsonl")
    for shard in range(2):  # a "directory" of Parquet files
        import datasets

        rows = datasets.Dataset.from_list([{"prompt": f"shard {shard} row {i}"} for i in range(5)])
        path = tiny_dir.parent / f"shard-{shard}.parquet"
        rows.to_parquet(str(path))
        server.upload("datasets", f"parquet/part-{shard}.parquet", path)
    yield server
    s3_server.stop(server)


@pytest.fixture(autouse=True)
def pod_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """No AWS settings of the developer's leak in; fresh clients per test (s3fs caches them by
    their arguments, not by the credentials in the environment); scratch under tmp_path."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(scratch.ROOT_ENV, str(tmp_path / "scratch"))
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    yield


def prompts(uri: str) -> PromptDataset:
    return PromptDataset(uri=uri, eval_fraction=0.1)


def local_prompts(tiny_dir: Path) -> list[str]:
    lines = (tiny_dir / "prompts.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines]


def test_prompts_load_from_s3_with_the_storage_endpoint_and_the_secrets_credentials(
    s3, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in s3.env(endpoint=False).items():  # the Secret's keys; no endpoint env
        monkeypatch.setenv(name, value)
    storage = StorageSpec(uri="s3://artifacts/runs", endpoint=s3.endpoint)
    with scratch.job_scratch("tiny", "ppo") as directory:
        split = load_split(
            prompts("s3://datasets/tiny/prompts.jsonl"),
            FIELD,
            {"promptField": "prompt"},
            0,
            storage,
        )
        assert any(directory.iterdir())  # the download and its Arrow cache are staged here
    rows = sorted([*split.train["prompt"], *split.held_out["prompt"]])
    assert rows == sorted(local_prompts(tiny_dir))
    assert not directory.exists()  # removed when the stage ended


def test_a_prefix_of_parquet_files_loads_with_the_pods_endpoint_variable(
    s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3.env(endpoint=True).items():  # AWS_ENDPOINT_URL, as on a Ray pod
        monkeypatch.setenv(name, value)
    rows = load_eval_rows(
        prompts("s3://datasets/parquet/"),
        "spec.stages.evaluation.prompts",
        {"promptField": "prompt"},
    )
    assert sorted(rows["prompt"]) == sorted(
        f"shard {s} row {i}" for s in range(2) for i in range(5)
    )


def test_credentials_the_server_refuses_name_the_field_and_the_secret(
    s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
    storage = StorageSpec(uri="s3://artifacts/runs", endpoint=s3.endpoint)
    with pytest.raises(UserError) as refused:
        load_split(
            prompts("s3://datasets/tiny/prompts.jsonl"),
            FIELD,
            {"promptField": "prompt"},
            0,
            storage,
        )
    message = str(refused.value)
    assert message.startswith(f"{FIELD}: could not load split 'train' of s3://datasets/tiny/")
    assert "spec.storage.secretRef" in message and "spec.storage.endpoint" in message


def test_a_missing_prefix_names_the_field(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=rf"^{FIELD}.uri: s3://datasets/nothing/ does not exist"):
        load_split(prompts("s3://datasets/nothing/"), FIELD, {"promptField": "prompt"}, 0)


def test_artifacts_and_fetched_models_live_in_the_job_scratch_and_are_removed(
    s3, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A warm cluster runs job after job: what a stage stages locally goes when it ends."""
    from rlhf_trainer.models import load_tokenizer, locate

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    for path in (tiny_dir / "model").iterdir():
        s3.upload("artifacts", f"base/model/{path.name}", path)
    with scratch.job_scratch("tiny", "evaluation") as directory:
        artifact = Artifact("s3://artifacts/runs", "tiny", "evaluation")
        artifact.write_json("metrics.json", {"win_rate": 0.9})
        assert directory in artifact.local_dir.parents  # staged in the job's scratch
        assert read_json(artifact.uri_of("metrics.json")) == {"win_rate": 0.9}  # published
        fetched = Path(locate("s3://artifacts/base/model", "spec.model.base"))
        assert directory in fetched.parents
        tokenizer = load_tokenizer("s3://artifacts/base/model", "spec.model.base")
        assert tokenizer.eos_token == "<eos>"
    assert not directory.exists()
    assert list((tmp_path / "scratch" / scratch.JOBS_DIR).iterdir()) == []
    # the next stage fetches afresh (the cache pointed into the removed directory)
    with scratch.job_scratch("tiny", "ppo") as second:
        assert second in Path(locate("s3://artifacts/base/model", "spec.model.base")).parents


def test_the_scratch_directory_goes_when_the_stage_fails(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), scratch.job_scratch("tiny", "sft") as directory:
        (scratch.scratch_dir("fetch") / "weights.bin").write_bytes(b"x" * 1024)
        raise RuntimeError("worker died")
    assert not directory.exists()
