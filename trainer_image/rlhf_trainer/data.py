"""Datasets of a stage: Hugging Face ids, local (or pvc://) JSON/JSONL/CSV/Parquet files and
directories, and the same formats at any fsspec URL (s3://, gs://, https://, ...), through
`datasets`.

Object stores are read with fsspec (s3fs for s3://) into the job's scratch directory: credentials
come from the environment, as every Ray pod gets spec.storage.secretRef's keys
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...), and an S3-compatible endpoint from
spec.storage.endpoint (the pods also get it as AWS_ENDPOINT_URL).

Every error a user can cause names the spec field to change: a missing column (with the columns
that are there), an empty split, a path that does not exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_operator.api.storage import LOCAL_SCHEMES, local_path, looks_local

from rlhf_trainer.jobspec import UserError, has_scheme

if TYPE_CHECKING:
    import datasets
    from rlhf_operator.api.spec import DatasetSpec, StorageSpec

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Split:
    """The rows a stage trains on and the rows it holds out (None when nothing is held out)."""

    train: datasets.Dataset
    held_out: datasets.Dataset | None


def is_url(uri: str) -> bool:
    """An fsspec URL (s3://, gs://, https://, hf://, ...): neither a local/pvc path nor an id."""
    return has_scheme(uri) and uri.split("://", 1)[0] not in LOCAL_SCHEMES


def storage_options(uri: str, storage: StorageSpec | None) -> dict:
    """fsspec options for `uri`: spec.storage.endpoint for s3:// (else AWS_ENDPOINT_URL, which
    the operator sets on the pods from it). Credentials are left to the environment."""
    if not uri.startswith("s3://"):
        return {}
    endpoint = (storage.endpoint if storage else None) or os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if endpoint else {}


def _blank(path: Path, probe: int = 65536) -> bool:
    """A file with nothing but whitespace (read only when it is small)."""
    size = path.stat().st_size
    return size == 0 or (size <= probe and not path.read_bytes().strip())


def _load_url(uri: str, field: str, split: str, storage: StorageSpec | None) -> datasets.Dataset:
    """A file, or a directory of files of one format, at an fsspec URL."""
    import datasets
    import fsspec

    from rlhf_trainer.scratch import scratch_dir

    options = storage_options(uri, storage)
    suffix = Path(uri.split("?", 1)[0]).suffix
    if suffix in LOCAL_FORMATS:
        files = uri
        builder = LOCAL_FORMATS[suffix]
    else:  # a directory ("prefix"): every file of the first known format found under it
        filesystem, path = fsspec.core.url_to_fs(uri, **options)
        if not filesystem.exists(path):
            raise UserError(f"{field}.uri: {uri} does not exist; fix the URL.")
        found = sorted(filesystem.find(path))
        by_format = {f: [p for p in found if Path(p).suffix == f] for f in LOCAL_FORMATS}
        suffix = next((f for f, paths in by_format.items() if paths), None)
        if suffix is None:
            raise UserError(
                f"{field}.uri: {uri} holds no JSON, JSONL, CSV or Parquet file; point it at one "
                "or at a directory of them."
            )
        protocol = uri.split("://", 1)[0]
        files = [f"{protocol}://{p}" for p in by_format[suffix]]
        builder = LOCAL_FORMATS[suffix]
    # One file (or directory) is one split, whatever the spec calls it. The download and its
    # Arrow cache go to the job's scratch directory (removed when the stage ends).
    return datasets.load_dataset(
        builder,
        data_files={"train": files},
        split="train",
        storage_options=options,
        cache_dir=str(scratch_dir("datasets")),
    )


def _load(
    spec: DatasetSpec, field: str, split: str, storage: StorageSpec | None = None
) -> datasets.Dataset:
    import datasets

    uri = spec.uri
    try:
        if is_url(uri):
            return _load_url(uri, field, split, storage)
        if not looks_local(uri):
            return datasets.load_dataset(uri, split=split)
        path = Path(os.path.expanduser(local_path(uri)))
        if not path.exists():
            raise UserError(f"{field}.uri: {uri} does not exist; fix the path.")
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        if _blank(path):  # `datasets` fails on it with an empty message
            raise UserError(f"{field}.uri: {uri} is empty; point it at data.")
        builder = LOCAL_FORMATS.get(path.suffix)
        if builder is None:
            raise UserError(
                f"{field}.uri: {uri} is not JSON, JSONL, CSV or Parquet "
                f"(known suffixes: {', '.join(LOCAL_FORMATS)})."
            )
        # One file is one split, whatever the spec calls it.
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train")
    except UserError:
        raise
    except Exception as exc:
        hint = (
            " (check the URL, spec.storage.endpoint and the credentials of spec.storage.secretRef)"
            if is_url(uri)
            else ""
        )
        raise UserError(
            f"{field}: could not load split {split!r} of {uri}{hint}: {type(exc).__name__}: {exc}"
        ) from exc


def require_columns(
    table: datasets.Dataset, columns: Mapping[str, str | None], field: str, uri: str
) -> None:
    """Each spec field (`promptField`, ...) must name a column of the dataset."""
    present = list(table.column_names)
    for spec_field, column in columns.items():
        if column is not None and column not in present:
            raise UserError(
                f"{field}.{spec_field}: column {column!r} is not in {uri} "
                f"(columns: {', '.join(present) or 'none'}); set {field}.{spec_field} "
                "to one of them."
            )


def require_rows(table: datasets.Dataset, field: str, uri: str, split: str, needed: int = 1):
    if len(table) < needed:
        what = "is empty" if len(table) == 0 else f"has {len(table)} rows, fewer than {needed}"
        raise UserError(f"{field}.uri: split {split!r} of {uri} {what}; point it at data.")


def load_split(
    spec: DatasetSpec,
    field: str,
    columns: Mapping[str, str | None],
    seed: int,
    storage: StorageSpec | None = None,
) -> Split:
    """The train rows and held-out rows of a dataset, checked against the spec's field names.

    Held out: `testSplit` when set, else a seeded `evalFraction` of `split` (none when 0).
    `storage`: the job's spec.storage (its endpoint serves s3:// datasets too).
    """
    train = _load(spec, field, spec.split, storage)
    require_columns(train, columns, field, spec.uri)
    require_rows(train, field, spec.uri, spec.split)
    if spec.test_split:
        held_out = _load(spec, field, spec.test_split, storage)
        require_columns(held_out, columns, field, spec.uri)
        require_rows(held_out, field, spec.uri, spec.test_split)
        return Split(train, held_out)
    if spec.eval_fraction <= 0:
        return Split(train, None)
    require_rows(train, field, spec.uri, spec.split, needed=2)
    parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
    return Split(parts["train"], parts["test"])


def load_eval_rows(
    spec: DatasetSpec,
    field: str,
    columns: Mapping[str, str | None],
    storage: StorageSpec | None = None,
) -> datasets.Dataset:
    """Rows for evaluation only: `testSplit` when set, else all of `split`."""
    split = spec.test_split or spec.split
    table = _load(spec, field, split, storage)
    require_columns(table, columns, field, spec.uri)
    require_rows(table, field, spec.uri, split)
    return table


def sample_rows(table: datasets.Dataset, count: int, seed: int) -> datasets.Dataset:
    """`count` rows drawn by a seeded shuffle (not the first rows: a split sorted by label, as
    IMDB's test split is, would give one class only). Deterministic for a seed."""
    count = min(count, len(table))
    return table.shuffle(seed=seed).select(range(count)).flatten_indices()
