"""A stage's artifacts (docs/CONTRACTS.md §3) on a local path, a pvc:// mount or an object store.

    <artifact>/model/          save_pretrained of the stage's model + tokenizer
    <artifact>/checkpoints/    Ray Train checkpoints, one `step_<n>` directory each
    <artifact>/metrics.json    final metrics {"name": float}
    <artifact>/history.jsonl   one line of metrics per logged step (curves, summary.json)
    <artifact>/run.json        how the run went: steps, resumed-from step, timings, spec digest;
                               written last, so it marks a finished stage
    <artifact>/tensorboard/    TensorBoard event files

Local paths and pvc:// mounts are read and written in place; for s3:// (and other object stores)
files are staged in the job's scratch directory (scratch.py: removed when the stage ends) and
copied with pyarrow's filesystems, the same layer Ray Train uses for its checkpoints.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from rlhf_operator.api.storage import artifact_uri, local_path

from rlhf_trainer.jobspec import is_remote
from rlhf_trainer.scratch import scratch_dir

MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.jsonl"
RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "step_"
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def _pyarrow_fs(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


class Artifact:
    """The artifact directory of one stage of one job."""

    def __init__(self, storage_uri: str, job_name: str, stage: str) -> None:
        self.uri = artifact_uri(storage_uri, job_name, stage)
        self.remote = is_remote(self.uri)
        self._staging: Path | None = None

    @property
    def local_dir(self) -> Path:
        """Where to write: the artifact itself, or a staging directory for a remote one."""
        if not self.remote:
            return Path(local_path(self.uri))
        if self._staging is None:
            self._staging = scratch_dir("artifact")
        return self._staging

    def path(self, *parts: str) -> Path:
        return self.local_dir.joinpath(*parts)

    def uri_of(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def publish(self, *parts: str) -> None:
        """Copy a staged file or directory to the object store (a no-op for local artifacts)."""
        if not self.remote:
            return
        from pyarrow import fs

        source = self.path(*parts)
        filesystem, target = _pyarrow_fs(self.uri_of(*parts))
        if source.is_dir():
            fs.copy_files(str(source), target, destination_filesystem=filesystem)
        else:
            filesystem.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with filesystem.open_output_stream(target) as out:
                out.write(source.read_bytes())

    def write_json(self, name: str, payload: Any) -> None:
        target = self.path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        self.publish(name)


def read_text(uri: str) -> str | None:
    """A text file's content, or None when it does not exist."""
    if not is_remote(uri):
        path = Path(local_path(uri))
        return path.read_text(encoding="utf-8") if path.is_file() else None
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def read_json(uri: str) -> Any | None:
    text = read_text(uri)
    return None if text is None else json.loads(text)


def read_jsonl(uri: str) -> list[dict[str, Any]]:
    text = read_text(uri) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def exists(uri: str) -> bool:
    if not is_remote(uri):
        return Path(local_path(uri)).exists()
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    return filesystem.get_file_info(path).type != fs.FileType.NotFound


def delete_tree(uri: str) -> None:
    """Remove a directory and everything in it (absent is fine)."""
    if not is_remote(uri):
        shutil.rmtree(local_path(uri), ignore_errors=True)
        return
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    if filesystem.get_file_info(path).type == fs.FileType.Directory:
        filesystem.delete_dir(path)


def delete_file(uri: str) -> None:
    """Remove one file (absent is fine)."""
    if not is_remote(uri):
        Path(local_path(uri)).unlink(missing_ok=True)
        return
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    if filesystem.get_file_info(path).type == fs.FileType.File:
        filesystem.delete_file(path)


def subdirectories(uri: str) -> list[str]:
    """Names of the directories directly under `uri` ([] when it does not exist)."""
    if not is_remote(uri):
        root = Path(local_path(uri))
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    infos = filesystem.get_file_info(fs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == fs.FileType.Directory)


@functools.cache
def fetch_dir(uri: str) -> Path:
    """A local directory with the content of `uri` (the directory itself when it is local).
    Remote directories are copied once per stage (a tokenizer and two models often share one)
    into the job's scratch directory, removed when the stage ends.
    """
    if not is_remote(uri):
        return Path(local_path(uri))
    from pyarrow import fs

    filesystem, path = _pyarrow_fs(uri)
    target = scratch_dir("fetch")
    fs.copy_files(path, str(target), source_filesystem=filesystem)
    return target


def latest_checkpoint(checkpoints_uri: str) -> tuple[str, int] | None:
    """The newest complete checkpoint under `checkpoints_uri`: (its URI, its step), or None.

    A directory without the trainer state (a save cut short by a crash) is skipped.
    """
    for name in reversed(subdirectories(checkpoints_uri)):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        uri = f"{checkpoints_uri.rstrip('/')}/{name}"
        state = read_json(f"{uri}/{TRAINER_STATE_FILE}")
        if state is not None:
            return uri, int(state["step"])
    return None
