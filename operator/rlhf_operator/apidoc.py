"""The README's RLHFJob field reference, generated from the CRD schema (itself from pydantic).

python -m rlhf_operator.apidoc           rewrite the table inside README's `api` section
python -m rlhf_operator.apidoc --check   fail when it is out of date (tests/unit/test_crd.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rlhf_operator.crd import build_crd

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN, END = "<!-- apidoc:begin -->", "<!-- apidoc:end -->"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "object")
    if kind == "array":
        return f"list of {_type(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _bounds(node: dict[str, Any]) -> str:
    """OpenAPI v3.0 bounds (`exclusiveMinimum: true` qualifies `minimum`)."""
    parts = []
    if "minimum" in node:
        parts.append(f"{'>' if node.get('exclusiveMinimum') is True else '>='} {node['minimum']}")
    if "maximum" in node:
        parts.append(f"{'<' if node.get('exclusiveMaximum') is True else '<='} {node['maximum']}")
    if "maxLength" in node:
        parts.append(f"<= {node['maxLength']} chars")
    return ", ".join(parts)


def rows(node: dict[str, Any], path: str = "spec") -> list[tuple[str, str, str, str]]:
    """(field, type, default, description) for every field under `node`, depth first."""
    out = []
    for name, prop in (node.get("properties") or {}).items():
        field = f"{path}.{name}"
        default = json.dumps(prop["default"]) if "default" in prop else ""
        if default in ("{}", "[]"):
            default = ""
        description = prop.get("description", "").replace("\n", " ").replace("|", "\\|")
        description = description.replace("<", "&lt;")
        bounds = _bounds(prop)
        kind = _type(prop) + (f" ({bounds})" if bounds else "")
        out.append((f"`{field}`", kind, f"`{default}`" if default else "", description))
        out += rows(prop, field)
        if isinstance(prop.get("items"), dict):
            out += rows(prop["items"], f"{field}[]")
    return out


def table() -> str:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    lines += [
        f"| {f} | {t} | {d} | {desc} |" for f, t, d, desc in rows(schema["properties"]["spec"])
    ]
    return "\n".join(lines)


def render(readme: str) -> str:
    """`readme` with the table between the markers replaced by the current one."""
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README is out of date")
    args = parser.parse_args(argv)
    current = README.read_text()
    if BEGIN not in current or END not in current:
        print(f"{README} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{README}: the API table is out of date: run `python -m rlhf_operator.apidoc`")
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
