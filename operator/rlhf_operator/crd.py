"""Generate the RLHFJob CustomResourceDefinition from the pydantic models (`make crds`).

pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema. The conversion is
small and specific (inline `$ref`, `anyOf [T, null]` -> `nullable`, int-or-string, factory
defaults so the API server fills the same defaults pydantic does), so it is written here rather than
pulled in from a general-purpose library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema

from rlhf_operator.api import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION
from rlhf_operator.api.progress import (
    PROGRESS_KIND,
    PROGRESS_PLURAL,
    PROGRESS_SINGULAR,
    ProgressSpec,
    ProgressStatus,
)
from rlhf_operator.api.spec import RLHFJobSpec
from rlhf_operator.api.status import RLHFJobStatus

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / f"{GROUP}_{PLURAL}.yaml"
# The Helm chart templates its CRD from this copy (helm reads files inside the chart only);
# written by the same command, so `make crds` keeps both and `--check` fails on either drifting.
CHART_CRD_FILE = CRD_FILE.parents[1] / "charts" / "rlhf-operator" / "files" / "crds" / CRD_FILE.name
CRD_FILES = (CRD_FILE, CHART_CRD_FILE)
PROGRESS_CRD_FILE = CRD_FILE.parent / f"{GROUP}_{PROGRESS_PLURAL}.yaml"
CHART_PROGRESS_CRD_FILE = CHART_CRD_FILE.parent / PROGRESS_CRD_FILE.name
PROGRESS_CRD_FILES = (PROGRESS_CRD_FILE, CHART_PROGRESS_CRD_FILE)

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Reward", "type": "string", "jsonPath": ".status.reward"},
    {"name": "Cluster", "type": "string", "jsonPath": ".status.cluster.name"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    # `kubectl get rlhf -o wide`: why a job waits (Queued: which LocalQueue; its cluster's pods;
    # a name conflict) or failed
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]

RESOURCE_DESCRIPTION = (
    "A whole RLHF pipeline (SFT, reward model, PPO, evaluation) on one Ray cluster."
)

_DROP = {"title", "additionalProperties", "$defs"}
_EXCLUSIVE_BOUNDS = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Rewrite one pydantic JSON-schema node into its structural OpenAPI v3 form."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        types = {v.get("type") for v in variants}
        if types == {"integer", "string"}:
            out = {"x-kubernetes-int-or-string": True}
        elif len(variants) == 1:
            out = _structural(variants[0], defs)
        else:
            raise ValueError(f"cannot express anyOf {node['anyOf']} structurally")
        out = {**out, **_structural(rest, defs)}
        if len(variants) < len(node["anyOf"]):
            out["nullable"] = True
        if out.get("default", 0) is None:
            del out["default"]
        return out

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        elif key in _EXCLUSIVE_BOUNDS:
            # JSON Schema's numeric `exclusiveMinimum: x` is OpenAPI v3.0's `minimum: x` plus
            # `exclusiveMinimum: true`; the API server rejects a number there.
            out[_EXCLUSIVE_BOUNDS[key]] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("default", 0) is None:
        del out["default"]
    if (
        out.get("type") == "object"
        and "properties" not in out
        and "additionalProperties" not in out
    ):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


class _FactoryDefaults(GenerateJsonSchema):
    """Also emit defaults made by `default_factory`, so the API server fills what pydantic fills.

    A nested model whose factory is its own plain constructor becomes `default: {}` (its fields
    carry their own defaults); anything else is emitted in full (e.g. the worker resources).
    """

    def default_schema(self, schema: Any) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            value = factory()
            if isinstance(value, BaseModel):
                plain = value == type(value)()
                value = (
                    {} if plain else value.model_dump(mode="json", by_alias=True, exclude_none=True)
                )
            schema = {k: v for k, v in schema.items() if k != "default_factory"} | {
                "default": value
            }
        return super().default_schema(schema)


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of one pydantic model (by alias, as on the wire)."""
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_FactoryDefaults
    )
    return _structural(raw, raw.get("$defs", {}))


def build_crd() -> dict[str, Any]:
    """The full CustomResourceDefinition manifest."""
    spec_schema = openapi_schema(RLHFJobSpec)
    status_schema = openapi_schema(RLHFJobStatus)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "rlhf"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": RESOURCE_DESCRIPTION,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }


def build_progress_crd() -> dict[str, Any]:
    """The RLHFJobProgress CRD: the trainer's report (api/progress.py says why it exists)."""
    spec_schema = openapi_schema(ProgressSpec)
    spec_schema["x-kubernetes-validations"] = [
        {"rule": "self == oldSelf", "message": "spec.job is immutable."}
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PROGRESS_PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": PROGRESS_KIND,
                "listKind": f"{PROGRESS_KIND}List",
                "plural": PROGRESS_PLURAL,
                "singular": PROGRESS_SINGULAR,
                "categories": ["rlhf"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "Progress a job's trainer reports; the operator "
                            "mirrors it into the RLHFJob's status.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": openapi_schema(ProgressStatus),
                            },
                        }
                    },
                }
            ],
        },
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Repeated defaults are written out in full: `&id001` anchors confuse readers and tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


HEADER = "# Generated by `make crds` from rlhf_operator.api — do not edit by hand.\n"


def render_crd() -> str:
    return HEADER + yaml.dump(build_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=100)


def render_progress_crd() -> str:
    return HEADER + yaml.dump(
        build_progress_crd(), Dumper=_NoAliasDumper, sort_keys=False, width=100
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if crds/ is out of date")
    args = parser.parse_args(argv)
    outputs = {
        **dict.fromkeys(CRD_FILES, render_crd()),
        **dict.fromkeys(PROGRESS_CRD_FILES, render_progress_crd()),
    }
    if args.check:
        stale = [f for f, text in outputs.items() if not f.exists() or f.read_text() != text]
        for path in stale:
            print(f"{path} is out of date: run `make crds`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
