"""`rlhf validate` and `kubectl rlhf validate`: offline, the operator's messages, exit 0 / 2."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rlhf_operator.plugin.cli import main as kubectl_rlhf
from rlhf_operator.validation import validate
from rlhf_trainer.cli import main as rlhf

ROOT = Path(__file__).parents[2]
CLUSTER_EXAMPLES = ["imdb-sentiment", "hh-rlhf-gptj", "nutanix-a100"]
CLIS = {"rlhf": rlhf, "kubectl rlhf": kubectl_rlhf}


def test_cluster_examples_validate_offline_without_torch_or_ray() -> None:
    """In a fresh interpreter with no reachable cluster: both CLIs accept the three examples,
    and neither imports a heavy package to do it."""
    script = f"""
import sys
from rlhf_trainer.cli import main as rlhf
from rlhf_operator.plugin.cli import main as kubectl_rlhf
for name in {CLUSTER_EXAMPLES!r}:
    path = "examples/" + name + ".yaml"
    assert rlhf(["validate", path]) == 0, path
    assert kubectl_rlhf(["validate", path]) == 0, path
heavy = sorted({{"torch", "ray", "deepspeed", "transformers", "datasets"}} & set(sys.modules))
assert not heavy, heavy
"""
    env = {
        **os.environ,
        "KUBECONFIG": "/nonexistent/kubeconfig",  # no cluster: validate must not need one
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": f"{ROOT / 'operator'}{os.pathsep}{ROOT / 'trainer_image'}",
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("valid RLHFJob") == 2 * len(CLUSTER_EXAMPLES), done.stdout


def _write(tmp_path: Path, manifest: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(manifest))
    return str(path)


def _example(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("cli", CLIS)
def test_a_misspelt_field_exits_2_with_the_operators_message(cli, tmp_path, capsys) -> None:
    manifest = _example("imdb-sentiment")
    manifest["spec"]["stage"] = manifest["spec"].pop("stages")
    manifest["spec"]["parallelism"]["zeroStage"] = 7
    assert CLIS[cli](["validate", _write(tmp_path, manifest)]) == 2
    err = capsys.readouterr().err
    assert "spec.stage: unknown field; did you mean spec.stages?" in err
    # the same lines the operator writes into the job's Valid=False condition
    _, operator_problems = validate(manifest)
    assert len(operator_problems) >= 2
    for problem in operator_problems:
        assert f"  {problem}\n" in err + "\n"


@pytest.mark.parametrize("cli", CLIS)
def test_semantic_checks_run_too(cli, tmp_path, capsys) -> None:
    manifest = _example("hh-rlhf-gptj")
    manifest["spec"]["cluster"]["head"] = {"resources": {"limits": {"nvidia.com/gpu": 1}}}
    assert CLIS[cli](["validate", _write(tmp_path, manifest)]) == 2
    assert "spec.cluster.head.resources: the Ray head runs no training" in capsys.readouterr().err


def test_a_local_manifest_is_checked_for_rlhf_run_and_refused_for_a_cluster(
    tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "model").mkdir()
    manifest = _example("tiny-local")
    manifest["spec"]["model"]["base"] = "model"
    stages = manifest["spec"]["stages"]
    for dataset in (stages["sft"]["dataset"], stages["reward"]["dataset"], stages["ppo"]["prompts"],
                    stages["evaluation"]["prompts"]):  # fmt: skip
        (tmp_path / Path(dataset["uri"]).name).write_text('{"prompt": "x"}\n')
        dataset["uri"] = Path(dataset["uri"]).name
    (tmp_path / "judge.json").write_text('{"good": 1}')
    stages["evaluation"]["judge"]["lexicon"] = "judge.json"
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, manifest)
    assert rlhf(["validate", path]) == 0  # local storage: checked for `rlhf run`
    assert "rlhf run" in capsys.readouterr().out
    assert kubectl_rlhf(["validate", path]) == 2  # a cluster cannot reach out/tiny-local
    assert "spec.storage.uri: 'out/tiny-local' is a local path" in capsys.readouterr().err
    assert rlhf(["validate", "--cluster", path]) == 2


def test_a_missing_tiny_example_says_where_it_looked_and_how_to_make_it(
    tmp_path, capsys, monkeypatch
) -> None:
    (tmp_path / "examples").mkdir()
    monkeypatch.chdir(tmp_path)  # a fresh clone: examples/ exists, examples/tiny not yet
    assert rlhf(["validate", str(ROOT / "examples" / "tiny-local.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        f"spec.model.base: examples/tiny/model does not exist (a relative path is resolved "
        f"against the current directory, {tmp_path}); make the tiny example first: "
        "python examples/make_tiny.py"
    ) in err
    assert "spec.stages.sft.dataset.uri: examples/tiny/sft.jsonl does not exist" in err


def test_rlhf_run_says_the_same_before_starting_anything(tmp_path, capsys, monkeypatch) -> None:
    (tmp_path / "examples").mkdir()
    monkeypatch.chdir(tmp_path)
    assert rlhf(["run", str(ROOT / "examples" / "tiny-local.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error: spec.model.base: examples/tiny/model does not exist" in err
    assert "python examples/make_tiny.py" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_path_elsewhere_says_fix_it(tmp_path, capsys, monkeypatch) -> None:
    manifest = _example("tiny-local")
    manifest["spec"]["model"]["base"] = "./models/base"
    monkeypatch.chdir(tmp_path)
    assert rlhf(["validate", _write(tmp_path, manifest)]) == 2
    err = capsys.readouterr().err
    assert "spec.model.base: ./models/base does not exist (a relative path is resolved " in err
    assert "fix the path, or run from the directory it is relative to" in err


@pytest.mark.parametrize("cli", CLIS)
def test_yaml_errors_name_the_file_and_line(cli, tmp_path, capsys) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: rlhf.dev/v1alpha1\nkind: RLHFJob\nspec:\n  model: [unclosed\n")
    assert CLIS[cli](["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:5:1: not valid YAML" in err


@pytest.mark.parametrize("cli", CLIS)
def test_a_missing_or_non_mapping_file_is_a_clear_error(cli, tmp_path, capsys) -> None:
    assert CLIS[cli](["validate", str(tmp_path / "nope.yaml")]) == 2
    assert f"{tmp_path / 'nope.yaml'}: cannot read it" in capsys.readouterr().err
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert CLIS[cli](["validate", str(listed)]) == 2
    assert "expected one RLHFJob mapping, got list" in capsys.readouterr().err


@pytest.mark.parametrize("cli", CLIS)
def test_version_comes_from_the_package_metadata(cli, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        CLIS[cli](["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"{cli} {importlib.metadata.version('rlhf-operator')}\n"
