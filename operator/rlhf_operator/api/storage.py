"""Where a job's artifacts live: one function, shared by the operator (status, mounts) and the
trainer (reads and writes), so both always agree on the layout.

    <storage.uri>/<job name>/<stage>/          a stage's artifact (model/, checkpoints/, reports)

`pvc://claim/sub/path` is mounted into every Ray pod at `PVC_MOUNT_ROOT/<claim>`.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

PVC_SCHEME = "pvc"
PVC_MOUNT_ROOT = "/mnt/rlhf"
# Where a pod finds its claims, for the trainer only (the operator always mounts at
# PVC_MOUNT_ROOT): a test Ray on one machine points it at a directory standing in for the mounts.
PVC_MOUNT_ROOT_ENV = "RLHF_PVC_MOUNT_ROOT"
REMOTE_SCHEMES = frozenset({"s3", "gs", "gcs", "abfs", "az"})
LOCAL_SCHEMES = frozenset({"file", PVC_SCHEME})
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


def artifact_uri(storage_uri: str, job_name: str, stage: str) -> str:
    """The URI a stage of a job writes to (and the next stage reads from)."""
    return f"{storage_uri.rstrip('/')}/{job_name}/{stage}"


def pvc_claim(storage_uri: str) -> str | None:
    """The PersistentVolumeClaim named by a `pvc://claim/...` URI, else None."""
    parsed = urlparse(storage_uri)
    return parsed.netloc or None if parsed.scheme == PVC_SCHEME else None


def local_path(uri: str) -> str:
    """The filesystem path behind a URI inside a Ray pod or on a laptop.

    `pvc://claim/sub` -> `/mnt/rlhf/claim/sub`; `file:///x` -> `/x`; plain paths unchanged.
    Remote object-store URIs (s3://...) have no local path: callers use pyarrow/fsspec for them.
    """
    parsed = urlparse(uri)
    if parsed.scheme == PVC_SCHEME:
        root = os.environ.get(PVC_MOUNT_ROOT_ENV) or PVC_MOUNT_ROOT
        return f"{root.rstrip('/')}/{parsed.netloc}{parsed.path}".rstrip("/")
    if parsed.scheme == "file":
        return parsed.path
    if parsed.scheme in REMOTE_SCHEMES:
        raise ValueError(f"{uri} is remote object storage; it has no local path")
    return uri


def is_cluster_reachable(storage_uri: str) -> bool:
    """True when every pod of a cluster can reach the URI (shared volume or object store)."""
    scheme = urlparse(storage_uri).scheme
    return scheme == PVC_SCHEME or scheme in REMOTE_SCHEMES


def looks_local(uri: str, cwd: str | os.PathLike[str] | None = None) -> bool:
    """A path on this machine or a pod's mount, rather than a Hugging Face id (`gpt2`, `imdb`,
    `org/name`) or an object-store URI: how the operator's offline checks (`rlhf validate`,
    `rlhf run`) and the trainer (datasets, models) both read a manifest's `uri`s.

    `file://` and `pvc://` URIs are local, other schemes are not. A plain string is local when
    it is absolute, starts with `.` or `~`, ends in a data-file suffix, has more than one `/`
    (a hub id has at most one), or exists relative to `cwd` (itself, or its first directory:
    `data/sft` when `data/` is there). The test does not need the path to exist, so a missing
    local path is reported as missing instead of being looked up on the hub.
    """
    if "://" in uri:
        return urlparse(uri).scheme in LOCAL_SCHEMES
    here = Path(cwd or os.getcwd())
    parts = Path(uri).parts
    return (
        os.path.isabs(uri)
        or uri.startswith((".", "~"))
        or uri.endswith(DATA_SUFFIXES)
        or uri.count("/") >= 2
        or (here / uri).exists()
        or (bool(parts) and (here / parts[0]).is_dir())
    )
