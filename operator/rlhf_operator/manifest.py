"""Offline validation of an RLHFJob manifest file: what `rlhf validate` and `kubectl rlhf
validate` run, with no cluster and no network.

It runs the operator's own `validate()` (pydantic + semantic checks), so its messages are the
ones the operator would put in the job's Valid=False condition. The CRD's CEL rules are not
evaluated here: each is a pydantic model validator too (`RULES` in api/spec.py, the predicates
tests/unit/test_crd.py checks agree with the CEL), so pydantic already refuses whatever the API
server's CEL would, with the same message, and the CLI needs no CEL interpreter (cel-python is
only a dev dependency).

A local manifest (storage on this machine, for `rlhf run`) also gets its local paths checked,
since `rlhf run` would read them; a cluster manifest's paths live in the cluster.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_operator.api import RLHFJob
from rlhf_operator.api.storage import is_cluster_reachable, looks_local, pvc_claim
from rlhf_operator.validation import validate

Target = Literal["auto", "local", "cluster"]
DISTRIBUTION = "rlhf-operator"
TINY_EXAMPLE = "examples/tiny"


class ManifestError(Exception):
    """The file cannot be read as one RLHFJob mapping (the message names the file and line)."""


def version() -> str:
    """The installed package's version (package metadata, one source with pyproject.toml)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest mapping of a YAML/JSON file; errors name the file (and line)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read it ({exc.strerror or exc}).") from None
    try:
        manifest = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else str(source)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"{where}: not valid YAML: {problem}.") from None
    if not isinstance(manifest, dict):
        raise ManifestError(
            f"{source}: expected one RLHFJob mapping, got {type(manifest).__name__}."
        )
    return manifest


def target_of(manifest: dict[str, Any]) -> Literal["local", "cluster"]:
    """Where a manifest is meant to run: a cluster when its storage is one the pods can reach."""
    uri = ((manifest.get("spec") or {}).get("storage") or {}).get("uri")
    return "cluster" if isinstance(uri, str) and is_cluster_reachable(uri) else "local"


def missing_path(field: str, uri: str, cwd: str | os.PathLike[str] | None = None) -> str:
    """The message for a local path that does not exist: where it was looked for, and the fix."""
    here = Path(cwd or os.getcwd())
    message = f"{field}: {uri} does not exist"
    if not os.path.isabs(uri) and not uri.startswith(("~", "file://")):
        message += f" (a relative path is resolved against the current directory, {here})"
    if TINY_EXAMPLE in Path(uri).as_posix():
        return message + "; make the tiny example first: python examples/make_tiny.py"
    return message + "; fix the path, or run from the directory it is relative to."


def local_path_problems(job: RLHFJob, cwd: str | os.PathLike[str] | None = None) -> list[str]:
    """Missing local inputs (model, tokenizer, datasets) of the job's enabled stages."""
    here = Path(cwd or os.getcwd())
    spec, stages = job.spec, job.spec.stages
    enabled = set(spec.enabled_stages())
    inputs: list[tuple[str, str | None]] = [
        ("spec.model.base", spec.model.base),
        ("spec.model.tokenizer", spec.model.tokenizer),
    ]
    if "sft" in enabled and stages.sft.dataset:
        inputs.append(("spec.stages.sft.dataset.uri", stages.sft.dataset.uri))
    if "reward" in enabled and stages.reward.dataset:
        inputs.append(("spec.stages.reward.dataset.uri", stages.reward.dataset.uri))
    if stages.reward.model:
        inputs.append(("spec.stages.reward.model", stages.reward.model))
    if "dpo" in enabled and stages.dpo.dataset:
        inputs.append(("spec.stages.dpo.dataset.uri", stages.dpo.dataset.uri))
    if "ppo" in enabled and stages.ppo.prompts:
        inputs.append(("spec.stages.ppo.prompts.uri", stages.ppo.prompts.uri))
    if "evaluation" in enabled and stages.evaluation.prompts:
        inputs.append(("spec.stages.evaluation.prompts.uri", stages.evaluation.prompts.uri))
    if "evaluation" in enabled and stages.evaluation.judge:
        inputs.append(("spec.stages.evaluation.judge.model", stages.evaluation.judge.model))
        inputs.append(("spec.stages.evaluation.judge.lexicon", stages.evaluation.judge.lexicon))
    problems = []
    for field, uri in inputs:
        if not uri or pvc_claim(uri) or not looks_local(uri, here):
            continue  # a hub id, or a claim's mount (in the cluster, not here)
        path = Path(os.path.expanduser(uri.removeprefix("file://")))
        if not (path if path.is_absolute() else here / path).exists():
            problems.append(missing_path(field, uri, here))
    return problems


def check_manifest(
    manifest: dict[str, Any], target: Target = "auto"
) -> tuple[RLHFJob | None, list[str], str]:
    """(the job or None, every problem, the target checked for) of a manifest mapping."""
    chosen = target_of(manifest) if target == "auto" else target
    job, problems = validate(manifest, for_cluster=chosen == "cluster")
    if job is not None and chosen == "local":
        problems = local_path_problems(job)
        job = None if problems else job
    return job, problems, chosen


def validate_file(path: str, target: Target = "auto") -> tuple[int, str]:
    """(exit code, report) of `validate`: 0 and one line when valid, 2 and one line per problem."""
    try:
        job, problems, chosen = check_manifest(read_manifest(path), target)
    except ManifestError as exc:
        return 2, f"error: {exc}"
    if job is None:
        return 2, "\n".join(
            [f"{path}: not a valid RLHFJob for a {chosen} run:", *(f"  {p}" for p in problems)]
        )
    stages = " → ".join(job.spec.enabled_stages())
    how = "kubectl apply -f" if chosen == "cluster" else "rlhf run"
    return 0, f"{path}: valid RLHFJob {job.metadata.name} ({stages}); {how} {path}"
