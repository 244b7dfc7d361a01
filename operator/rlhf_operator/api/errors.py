"""Turn pydantic's errors into messages a user can act on: the camelCase field path and the fix."""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


def _path(loc: tuple[int | str, ...], root: str) -> str:
    parts = [root] if root else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists, dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list, dict, tuple):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the field at `loc` (its parent), or None when it cannot be told."""
    current: type[BaseModel] | None = model
    for item in loc[:-1]:
        if current is None:
            return None
        if isinstance(item, int):
            continue  # a list index: the element type was taken with the list field
        field = next(
            (f for name, f in current.model_fields.items() if item in (name, f.alias)), None
        )
        if field is None:
            return None
        candidates = _models_in(field.annotation)
        current = candidates[0] if len(candidates) == 1 else None
    return current


def nearest_field(model: type[BaseModel], loc: tuple[int | str, ...]) -> str | None:
    """The valid field name closest to the unknown one at `loc` (difflib), or None."""
    parent = _model_at(model, loc)
    if parent is None or not loc or not isinstance(loc[-1], str):
        return None
    names = [f.alias or name for name, f in parent.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return close[0] if close else None


def format_validation_error(
    error: ValidationError, root: str = "spec", model: type[BaseModel] | None = None
) -> str:
    """One line per problem: `spec.stages.ppo.clipRange: Input should be less than or equal to 1`.

    Cross-field rule messages already name their fields, so they are passed through as they are.
    With `model` (the model validated, whose fields `loc` walks), an unknown field is answered
    with the nearest valid name: `spec.stage: unknown field; did you mean spec.stages?`.
    """
    lines = []
    for err in error.errors():
        # pydantic wraps model-validator failures as "Value error, <message>"
        msg = err["msg"].removeprefix("Value error, ")
        loc = tuple(err["loc"])
        if err["type"] == "value_error" and msg.startswith("spec."):
            lines.append(msg)
        elif err["type"] == "extra_forbidden":
            near = nearest_field(model, loc) if model is not None else None
            fix = (
                f"did you mean {_path((*loc[:-1], near), root)}?"
                if near
                else "remove it or check its spelling."
            )
            lines.append(f"{_path(loc, root)}: unknown field; {fix}")
        else:
            lines.append(f"{_path(loc, root)}: {msg}.")
    return "\n".join(lines)
