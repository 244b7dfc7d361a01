"""Every manifest in examples/ is one people will copy: it must be accepted as it is.

Each RLHFJob is checked the three ways the project checks a job: the generated CRD's OpenAPI
schema (what `kubectl apply` meets; jsonschema in OpenAPI 3.0 / draft-4 semantics), the pydantic
model with its cross-field RULES (what `rlhf run` and the operator meet), and the operator's
semantic validation (storage reachable by the pods, child names, quantities, scheduling). The
cluster examples must also give RayCluster/RayJob manifests the real KubeRay CRDs accept.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from kuberay_schema import CRDS as KUBERAY_CRDS
from kuberay_schema import needs_kuberay_crds
from rlhf_operator.api import KIND, RULES, RLHFJob
from rlhf_operator.builders import build_raycluster, build_stage_rayjob
from rlhf_operator.crd import CRD_FILE
from rlhf_operator.names import cluster_name
from rlhf_operator.validation import validate

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
LOCAL_EXAMPLES = {"tiny-local.yaml"}  # for `rlhf run`: a local storage directory is fine
REQUIRED = {"imdb-sentiment.yaml", "hh-rlhf-gptj.yaml", "nutanix-a100.yaml"}


def _openapi_to_jsonschema(node: Any) -> Any:
    """A structural CRD schema as draft-4 JSON Schema, judged as `kubectl apply` judges it.

    OpenAPI 3.0 `nullable: true` becomes `type: [T, "null"]`; an unknown field is an error, as
    with kubectl's default server-side `--validate=strict` (the API server would otherwise prune
    it silently). Draft 4 knows the rest (boolean exclusiveMinimum); x-kubernetes-* is ignored.
    """
    if isinstance(node, list):
        return [_openapi_to_jsonschema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _openapi_to_jsonschema(value) for key, value in node.items()}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


def _schema_validator(crd: dict[str, Any]) -> jsonschema.Draft4Validator:
    (version,) = crd["spec"]["versions"]
    schema = _openapi_to_jsonschema(version["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


RLHFJOB_SCHEMA = _schema_validator(yaml.safe_load(CRD_FILE.read_text()))


def jobs_in(path: Path) -> list[dict[str, Any]]:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    jobs = [doc for doc in docs if doc.get("kind") == KIND]
    assert jobs, f"{path.name} holds no {KIND}"
    assert len(jobs) == len(docs), f"{path.name}: only RLHFJobs belong in examples/"
    return jobs


def test_the_documented_examples_exist() -> None:
    assert {path.name for path in EXAMPLES} >= REQUIRED


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_matches_the_crd_schema(path: Path) -> None:
    for job in jobs_in(path):
        errors = sorted(RLHFJOB_SCHEMA.iter_errors(job), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{path.name}: {'.'.join(map(str, e.path))}: {e.message}" for e in errors
        )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_the_model_rules_and_semantic_checks(path: Path) -> None:
    for manifest in jobs_in(path):
        job, problems = validate(manifest, for_cluster=path.name not in LOCAL_EXAMPLES)
        assert not problems, f"{path.name}:\n" + "\n".join(problems)
        assert job is not None
        broken = [rule.message for rule in RULES if not rule.check(job.spec)]
        assert not broken
        # Nothing in the file is lost on the way through the model (no field silently ignored).
        wire = job.model_dump(mode="json", by_alias=True, exclude_unset=True)
        assert _subset(manifest["spec"], wire["spec"]), f"{path.name}: fields were dropped"


def _subset(given: Any, parsed: Any) -> bool:
    if isinstance(given, dict):
        return isinstance(parsed, dict) and all(
            key in parsed and _subset(value, parsed[key]) for key, value in given.items()
        )
    if isinstance(given, list):
        return len(given) == len(parsed) and all(map(_subset, given, parsed))
    return given == parsed


@functools.cache
def _kuberay_validator(plural: str) -> jsonschema.Draft4Validator:
    path = KUBERAY_CRDS / f"ray.io_{plural}.yaml"
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft4Validator(_openapi_to_jsonschema(version["schema"]["openAPIV3Schema"]))


CLUSTER_EXAMPLES = [p for p in EXAMPLES if p.name not in LOCAL_EXAMPLES]


@needs_kuberay_crds
@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_example_children_are_valid_kuberay_objects(path: Path) -> None:
    raycluster, rayjob = _kuberay_validator("rayclusters"), _kuberay_validator("rayjobs")
    for manifest in jobs_in(path):
        manifest = copy.deepcopy(manifest)
        manifest["metadata"] |= {"namespace": "ml", "uid": "0000-example"}
        job = RLHFJob.from_manifest(manifest)
        owner = {"apiVersion": "rlhf.dev/v1alpha1", "kind": KIND, "name": job.metadata.name,
                 "uid": "0000-example", "controller": True}  # fmt: skip
        cluster = cluster_name(job.metadata.name)
        children = [build_raycluster(job, cluster, owner)] + [
            build_stage_rayjob(job, stage, 1, cluster, owner) for stage in job.spec.enabled_stages()
        ]
        for child in children:
            validator = raycluster if child["kind"] == "RayCluster" else rayjob
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in
                      validator.iter_errors(child)]  # fmt: skip
            name = f"{child['kind']} {child['metadata']['name']}"
            assert not errors, f"{path.name} -> {name}: {errors}"


def _kuberay_worker_pod_labels(raycluster: dict[str, Any]) -> dict[str, str]:
    """The labels a worker pod ends up with: its template's plus those KubeRay adds."""
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    return {
        **group["template"]["metadata"].get("labels", {}),
        "ray.io/cluster": raycluster["metadata"]["name"],
        "ray.io/node-type": "worker",
        "ray.io/group": group["groupName"],
        "ray.io/is-ray-node": "yes",
    }


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_example_pod_affinity_selects_the_jobs_own_workers(path: Path) -> None:
    """A podAffinity term in an example must match the pods it is meant to group."""
    for manifest in jobs_in(path):
        job = RLHFJob.from_manifest({**manifest, "metadata": {**manifest["metadata"], "uid": "u"}})
        affinity = job.spec.cluster.workers.affinity or {}
        terms = [
            term.get("podAffinityTerm", term)
            for kind in ("podAffinity", "podAntiAffinity")
            for rule in affinity.get(kind, {}).values()
            for term in rule
        ]
        owner = {"apiVersion": "rlhf.dev/v1alpha1", "kind": KIND, "name": "x", "uid": "u"}
        pod = _kuberay_worker_pod_labels(
            build_raycluster(job, cluster_name(job.metadata.name), owner)
        )
        for term in terms:
            wanted = term["labelSelector"].get("matchLabels", {})
            assert wanted.items() <= pod.items(), f"{path.name}: {wanted} matches no worker"
