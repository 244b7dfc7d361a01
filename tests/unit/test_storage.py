"""`looks_local` (rlhf_operator.api.storage): the one answer to "a local path, or a Hugging Face
id / object-store URI?" that `rlhf validate`, `rlhf run` and the trainer's data and model
loading all use. The answers are pinned here, the missing-path cases included: a path that does
not exist yet must read as a path (reported missing), never as a hub id to download."""

from __future__ import annotations

from pathlib import Path

import pytest
from rlhf_operator.api.storage import looks_local
from rlhf_operator.manifest import local_path_problems
from rlhf_trainer.jobspec import parse_job, with_absolute_paths


@pytest.mark.parametrize(
    ("uri", "local"),
    [
        # URIs: mounts and files are local; object stores and anything else are not
        ("pvc://claim/data/sft.jsonl", True),
        ("file:///data/sft.jsonl", True),
        ("s3://bucket/models/gpt2", False),
        ("gs://bucket/data", False),
        ("https://example.com/data.json", False),
        # paths, whether they exist or not
        ("/data/models/gpt2", True),
        ("./model", True),
        ("../shared/model", True),
        ("~/models/gpt2", True),
        ("sft.jsonl", True),
        ("data/prefs.parquet", True),
        ("examples/tiny/model", True),  # more than one "/": no hub id looks like this
        # hub ids (nothing by that name here)
        ("gpt2", False),
        ("imdb", False),
        ("lvwerra/gpt2-imdb", False),
        ("Anthropic/hh-rlhf", False),
    ],
)
def test_local_or_hub(uri: str, local: bool, tmp_path: Path) -> None:
    assert looks_local(uri, tmp_path) is local


def test_what_exists_here_is_local(tmp_path: Path) -> None:
    (tmp_path / "gpt2").mkdir()  # a local copy shadows the hub id, as from_pretrained does
    (tmp_path / "data").mkdir()
    assert looks_local("gpt2", tmp_path)
    assert looks_local("data/sft", tmp_path)  # under an existing directory, though missing
    assert not looks_local("org/name", tmp_path)


def test_cwd_defaults_to_the_current_directory(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "mymodel").mkdir()
    monkeypatch.chdir(tmp_path)
    assert looks_local("mymodel")
    assert not looks_local("othermodel")


def _job(tmp_path: Path, base: str, sft: str):
    return parse_job(
        {
            "metadata": {"name": "j"},
            "spec": {
                "model": {"base": base},
                "storage": {"uri": str(tmp_path / "out")},
                "stages": {
                    "sft": {"dataset": {"uri": sft}},
                    "reward": {"enabled": False},
                    "ppo": {"enabled": False},
                    "evaluation": {"enabled": False},
                },
            },
        }
    )


def test_validate_and_the_trainer_agree_on_a_missing_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    job = _job(tmp_path, "checkpoints/run1/model", "data/sft")
    # the offline check reports both as missing (not as hub ids)...
    problems = local_path_problems(job, tmp_path)
    assert [p.split(":")[0] for p in problems] == ["spec.model.base", "spec.stages.sft.dataset.uri"]
    # ...and the trainer treats them as the same local paths (made absolute for the workers)
    absolute = with_absolute_paths(job, tmp_path)
    assert absolute.spec.model.base == str(tmp_path / "checkpoints/run1/model")
    assert absolute.spec.stages.sft.dataset.uri == str(tmp_path / "data/sft")


def test_hub_ids_and_claims_are_not_checked_here(tmp_path: Path) -> None:
    job = _job(tmp_path, "lvwerra/gpt2-imdb", "pvc://datasets/sft.jsonl")
    assert local_path_problems(job, tmp_path) == []
    absolute = with_absolute_paths(job, tmp_path)
    assert absolute.spec.model.base == "lvwerra/gpt2-imdb"
    assert absolute.spec.stages.sft.dataset.uri == "pvc://datasets/sft.jsonl"
