"""Reading an RLHFJob in the trainer: the same pydantic models as the operator, the same messages.

Import-light (pydantic, yaml): the CLI validates a manifest before anything heavy is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rlhf_operator.api import RLHFJob, format_validation_error
from rlhf_operator.api.storage import REMOTE_SCHEMES, looks_local


class UserError(Exception):
    """A problem the user can fix (bad manifest, missing column, missing model path).

    The message names the spec field and says what to change; the CLI prints it as the last line
    of stderr and exits non-zero, without a traceback.
    """


def load_job(source: str) -> RLHFJob:
    """An RLHFJob from its JSON text (what the operator passes) or a .json/.yaml file path."""
    text = source
    origin = "--job"
    if not source.lstrip().startswith("{"):
        path = Path(source)
        if not path.is_file():
            raise UserError(f"{source}: no such manifest file; pass a path or the job's JSON.")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        manifest = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as exc:
        raise UserError(f"{origin}: not valid JSON/YAML: {exc}") from exc
    return parse_job(manifest, origin)


def parse_job(manifest: Any, origin: str = "manifest") -> RLHFJob:
    """Validate a manifest dict; errors name the field (`spec.stages.ppo.clipRange: ...`)."""
    if not isinstance(manifest, dict):
        raise UserError(f"{origin}: expected an RLHFJob mapping, got {type(manifest).__name__}.")
    try:
        return RLHFJob.model_validate(manifest)
    except ValidationError as exc:
        problems = format_validation_error(exc, root="", model=RLHFJob)
        raise UserError(f"{origin} is not a valid RLHFJob:\n{problems}") from None


def job_to_json(job: RLHFJob) -> str:
    """The job as the stage command's --job argument (status omitted, docs/CONTRACTS.md §1)."""
    return json.dumps(
        job.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    )


def spec_digest(job: RLHFJob) -> str:
    """What a stage's results depend on, as a short digest: the spec without `storage` (where
    the results are kept; an output directory may move). A stage records it in run.json, so
    `rlhf run --resume` knows a finished stage ran this very spec."""
    wire = job.spec.to_wire()
    wire.pop("storage", None)
    text = json.dumps(wire, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def has_scheme(uri: str) -> bool:
    return "://" in uri


def is_remote(uri: str) -> bool:
    return uri.split("://", 1)[0] in REMOTE_SCHEMES if has_scheme(uri) else False


def _absolute(value: str | None, base: Path, always: bool = False) -> str | None:
    """`value` made absolute when it names a local path (`looks_local`, or `always`)."""
    if value is None or has_scheme(value) or os.path.isabs(value):
        return value
    if always or looks_local(value, base):
        return str((base / os.path.expanduser(value)).resolve())
    return value  # a Hugging Face id (`gpt2`, `imdb`, `org/name`)


def with_absolute_paths(job: RLHFJob, base: str | os.PathLike[str] | None = None) -> RLHFJob:
    """A copy of `job` whose relative local paths are absolute (against `base`, default cwd).

    Ray Train workers run in their own working directory, so a manifest's `examples/tiny/model`
    must become absolute before it travels to them. Strings that do not look like local paths
    (rlhf_operator.api.storage.looks_local) are left alone: they are Hugging Face ids, resolved
    by `from_pretrained`/`load_dataset`.
    """
    root = Path(base or os.getcwd())
    spec = job.spec.model_copy(deep=True)
    spec.model.base = _absolute(spec.model.base, root)
    spec.model.tokenizer = _absolute(spec.model.tokenizer, root)
    if not has_scheme(spec.storage.uri):
        spec.storage.uri = _absolute(spec.storage.uri, root, always=True)
    spec.stages.reward.model = _absolute(spec.stages.reward.model, root)
    judge = spec.stages.evaluation.judge
    if judge is not None:
        judge.model = _absolute(judge.model, root)
        judge.lexicon = _absolute(judge.lexicon, root)
    for dataset in (
        spec.stages.sft.dataset,
        spec.stages.reward.dataset,
        spec.stages.ppo.prompts,
        spec.stages.evaluation.prompts,
    ):
        if dataset is not None:
            dataset.uri = _absolute(dataset.uri, root)
    return job.model_copy(update={"spec": spec})


def with_storage(job: RLHFJob, storage_uri: str) -> RLHFJob:
    """A copy of `job` writing its artifacts under `storage_uri` (`rlhf run --output`)."""
    spec = job.spec.model_copy(deep=True)
    spec.storage.uri = storage_uri
    return job.model_copy(update={"spec": spec})


def is_local_storage(uri: str) -> bool:
    """True for a plain path or file:// URI (what `rlhf run` can write without a cluster)."""
    return not has_scheme(uri) or uri.startswith("file://")
