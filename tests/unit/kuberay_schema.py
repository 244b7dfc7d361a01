"""The real KubeRay CRD schemas (../shared/kuberay-crds/, or $KUBERAY_CRDS_DIR) as JSON Schema
validators, and `needs_kuberay_crds`: the one skip for tests that need them, saying where to get
them.

A CRD's openAPIV3Schema is structural OpenAPI, close to JSON Schema. The conversion: int-or-string
and nullable become type unions; and every object with declared properties refuses unknown ones
(`additionalProperties: false`) unless it preserves unknown fields — the API server would prune
an unknown field silently, so a misspelt field is a bug we want to see here.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# ../shared beside a checkout (/work/main), or shared/ inside it; a worktree one level deeper
# finds neither and says so.
SEARCHED = [REPO.parent / "shared" / "kuberay-crds", REPO / "shared" / "kuberay-crds"]
CRDS = Path(
    os.environ.get("KUBERAY_CRDS_DIR")
    or next((path for path in SEARCHED if path.is_dir()), SEARCHED[0])
)
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")
KUBERAY_RELEASE = "v1.7.0"  # the CRDs the builders are checked against (README: prerequisites)
WHERE_TO_GET = (
    f"copy {' and '.join(CRD_FILES)} of KubeRay {KUBERAY_RELEASE} from "
    f"https://github.com/ray-project/kuberay/tree/{KUBERAY_RELEASE}/ray-operator/config/crd/bases "
    "(also in the kuberay-operator Helm chart's crds/) into that directory, or point "
    "KUBERAY_CRDS_DIR at a directory holding them"
)


def missing_crds() -> list[str]:
    """The upstream CRD files that are not there."""
    return [name for name in CRD_FILES if not (CRDS / name).is_file()]


needs_kuberay_crds = pytest.mark.skipif(
    bool(missing_crds()),
    reason=f"upstream KubeRay CRDs not found at {CRDS} ({', '.join(missing_crds())}): "
    + WHERE_TO_GET,
)


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [
                *([out["type"]] if isinstance(out["type"], str) else out["type"]),
                "null",
            ]
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@functools.cache  # the CRDs are 20k+ lines of YAML: parse each once
def validator(crd_file: str, version: str = "v1") -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=loader)
    (schema,) = [
        v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version
    ]
    return jsonschema.Draft7Validator(_convert(schema))


def errors(crd_file: str, manifest: dict[str, Any]) -> list[str]:
    """Every schema violation of `manifest`, as `path: message`."""
    return [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in validator(crd_file).iter_errors(manifest)
    ]


def _defaulted(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores it (structural
    defaulting: a property with a `default` that the object lacks gets it)."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        out = {
            k: _defaulted(props.get(k) or schema.get("additionalProperties") or {}, v)
            for k, v in value.items()
        }
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = sub["default"]
        return out
    if isinstance(value, list):
        return [_defaulted(schema.get("items") or {}, item) for item in value]
    return value


def stored(crd_file: str, manifest: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """`manifest` as the API server would store it: with the CRD schema's defaults applied."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / crd_file).read_text(), Loader=loader)
    (schema,) = [
        v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version
    ]
    return _defaulted(schema, manifest)
