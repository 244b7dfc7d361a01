"""Turn pydantic's errors into messages a user can act on: the camelCase field path and the fix."""

from __future__ import annotations

from pydantic import ValidationError


def _path(loc: tuple[int | str, ...], root: str) -> str:
    parts = [root] if root else []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    return ".".join(parts)


def format_validation_error(error: ValidationError, root: str = "spec") -> str:
    """One line per problem: `spec.stages.ppo.clipRange: Input should be less than or equal to 1`.

    Cross-field rule messages already name their fields, so they are passed through as they are.
    """
    lines = []
    for err in error.errors():
        # pydantic wraps model-validator failures as "Value error, <message>"
        msg = err["msg"].removeprefix("Value error, ")
        loc = tuple(err["loc"])
        if err["type"] == "value_error" and msg.startswith("spec."):
            lines.append(msg)
        elif err["type"] == "extra_forbidden":
            lines.append(f"{_path(loc, root)}: unknown field; remove it or check its spelling.")
        else:
            lines.append(f"{_path(loc, root)}: {msg}.")
    return "\n".join(lines)
