"""Datasets of a stage: Hugging Face ids or local JSON/JSONL/CSV/Parquet, through `datasets`.

Every error a user can cause names the spec field to change: a missing column (with the columns
that are there), an empty split, a path that does not exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_operator.api.storage import local_path, looks_local

from rlhf_trainer.jobspec import UserError, is_remote

if TYPE_CHECKING:
    import datasets
    from rlhf_operator.api.spec import DatasetSpec

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Split:
    """The rows a stage trains on and the rows it holds out (None when nothing is held out)."""

    train: datasets.Dataset
    held_out: datasets.Dataset | None


def _blank(path: Path, probe: int = 65536) -> bool:
    """A file with nothing but whitespace (read only when it is small)."""
    size = path.stat().st_size
    return size == 0 or (size <= probe and not path.read_bytes().strip())


def _load(spec: DatasetSpec, field: str, split: str) -> datasets.Dataset:
    import datasets

    uri = spec.uri
    if is_remote(uri):
        raise UserError(
            f"{field}.uri: {uri} is in an object store; datasets load from a Hugging Face id, "
            "a local or pvc:// path (JSON, JSONL, CSV or Parquet)."
        )
    try:
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
        raise UserError(
            f"{field}: could not load split {split!r} of {uri}: {type(exc).__name__}: {exc}"
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
    spec: DatasetSpec, field: str, columns: Mapping[str, str | None], seed: int
) -> Split:
    """The train rows and held-out rows of a dataset, checked against the spec's field names.

    Held out: `testSplit` when set, else a seeded `evalFraction` of `split` (none when 0).
    """
    train = _load(spec, field, spec.split)
    require_columns(train, columns, field, spec.uri)
    require_rows(train, field, spec.uri, spec.split)
    if spec.test_split:
        held_out = _load(spec, field, spec.test_split)
        require_columns(held_out, columns, field, spec.uri)
        require_rows(held_out, field, spec.uri, spec.test_split)
        return Split(train, held_out)
    if spec.eval_fraction <= 0:
        return Split(train, None)
    require_rows(train, field, spec.uri, spec.split, needed=2)
    parts = train.train_test_split(test_size=spec.eval_fraction, seed=seed)
    return Split(parts["train"], parts["test"])


def load_eval_rows(
    spec: DatasetSpec, field: str, columns: Mapping[str, str | None]
) -> datasets.Dataset:
    """Rows for evaluation only: `testSplit` when set, else all of `split`."""
    split = spec.test_split or spec.split
    table = _load(spec, field, split)
    require_columns(table, columns, field, spec.uri)
    require_rows(table, field, spec.uri, split)
    return table
