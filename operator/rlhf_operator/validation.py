"""Semantic checks of an RLHFJob that the CRD schema cannot express.

The schema (and pydantic, which generates it) already rejects wrong types, ranges and the
cross-field `RULES`. What is left needs knowledge of the cluster side: where pods can reach
storage, how long child names may be, what the API server would refuse only later, when the
RayCluster's pods are created (and nobody would see the error). Every message names the field
and says what to change.
"""

from __future__ import annotations

import re
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from pydantic import ValidationError

from rlhf_operator import names
from rlhf_operator.api import RLHFJob, format_validation_error
from rlhf_operator.api.common import ResourceRequirements
from rlhf_operator.api.storage import is_cluster_reachable
from rlhf_operator.builders import GPU_RESOURCE

# Kubernetes' own syntax rules (apimachinery/pkg/util/validation).
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_AFFINITY_KEYS = frozenset({"nodeAffinity", "podAffinity", "podAntiAffinity"})


def validate(
    manifest: dict[str, Any], *, for_cluster: bool = True
) -> tuple[RLHFJob | None, list[str]]:
    """The RLHFJob of `manifest` and every problem found (the job is None when it has any).

    `for_cluster=False` is for `rlhf run`: a local storage path and any job name are fine there.
    """
    body = {k: v for k, v in manifest.items() if k != "status"}  # status is the operator's
    try:
        job = RLHFJob.from_manifest(body)
    except ValidationError as error:
        return None, format_validation_error(error, root="", model=RLHFJob).splitlines()
    problems = semantic_problems(job, for_cluster=for_cluster)
    return (None, problems) if problems else (job, [])


def semantic_problems(job: RLHFJob, *, for_cluster: bool = True) -> list[str]:
    """Problems of a schema-valid job (empty when it can run)."""
    problems: list[str] = []
    if for_cluster:
        problems += names.job_name_problems(job.metadata.name)
        problems += _storage_problems(job)
    problems += _resource_problems(job)
    problems += _scheduling_problems(job)
    return problems


def _storage_problems(job: RLHFJob) -> list[str]:
    storage = job.spec.storage
    problems = []
    if not is_cluster_reachable(storage.uri):
        problems.append(
            f"spec.storage.uri: '{storage.uri}' is a local path, which the Ray pods of a cluster "
            "do not share; use s3://bucket/prefix or pvc://claim/path (local paths work only "
            "with `rlhf run`)."
        )
    if storage.endpoint and not storage.uri.startswith("s3://"):
        problems.append(
            "spec.storage.endpoint is an S3 endpoint but spec.storage.uri is not s3://; "
            "remove the endpoint or use an s3:// URI."
        )
    return problems


def _quantity_problems(field: str, resources: ResourceRequirements) -> list[str]:
    problems = []
    parsed: dict[str, dict[str, Any]] = {"requests": {}, "limits": {}}
    for kind in ("requests", "limits"):
        for name, value in getattr(resources, kind).items():
            try:
                parsed[kind][name] = parse_quantity(value)
            except ValueError:
                problems.append(
                    f"{field}.{kind}.{name}: '{value}' is not a Kubernetes quantity; "
                    "write e.g. '4', '500m', '16Gi'."
                )
    for name, request in parsed["requests"].items():
        limit = parsed["limits"].get(name)
        if limit is not None and request > limit:
            problems.append(
                f"{field}.requests.{name} ({resources.requests[name]}) exceeds "
                f"{field}.limits.{name} ({resources.limits[name]}); raise the limit or lower "
                "the request."
            )
    return problems


def _resource_problems(job: RLHFJob) -> list[str]:
    cluster = job.spec.cluster
    head, workers = cluster.head.resources, cluster.workers.resources
    problems = _quantity_problems("spec.cluster.head.resources", head)
    problems += _quantity_problems("spec.cluster.workers.resources", workers)
    if GPU_RESOURCE in head.requests or GPU_RESOURCE in head.limits:
        problems.append(
            f"spec.cluster.head.resources: the Ray head runs no training and gets no GPU; "
            f"remove '{GPU_RESOURCE}' from it (workers get GPUs from "
            "spec.cluster.workers.gpusPerWorker)."
        )
    gpus = cluster.workers.gpus_per_worker
    for kind in ("requests", "limits"):
        given = getattr(workers, kind).get(GPU_RESOURCE)
        if given is None:
            continue
        try:
            matches = parse_quantity(given) == gpus
        except ValueError:
            continue  # already reported as a bad quantity
        if not matches:
            problems.append(
                f"spec.cluster.workers.resources.{kind}['{GPU_RESOURCE}'] is {given} but "
                f"spec.cluster.workers.gpusPerWorker is {gpus}; set GPUs with gpusPerWorker only "
                "and remove them from resources."
            )
    return problems


def _scheduling_problems(job: RLHFJob) -> list[str]:
    cluster = job.spec.cluster
    workers = cluster.workers
    problems = []
    account = cluster.service_account_name
    if account is not None and (len(account) > 253 or not _DNS1123_SUBDOMAIN.match(account)):
        problems.append(
            f"spec.cluster.serviceAccountName: '{account}' is not a valid ServiceAccount name "
            "(lowercase letters, digits, '-' and '.'); fix the name."
        )
    for key, value in workers.node_selector.items():
        prefix, _, name = key.rpartition("/")
        bad_key = (
            not name
            or len(name) > 63
            or not _LABEL_NAME.match(name)
            or (prefix and not _DNS1123_SUBDOMAIN.match(prefix))
        )
        if bad_key:
            problems.append(
                f"spec.cluster.workers.nodeSelector: '{key}' is not a valid label key; "
                "use [prefix/]name with letters, digits, '-', '_' and '.'."
            )
        if len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(
                f"spec.cluster.workers.nodeSelector.{key}: '{value}' is not a valid label value "
                "(at most 63 letters, digits, '-', '_' or '.'); fix the value."
            )
    for index, toleration in enumerate(workers.tolerations):
        if toleration.operator == "Exists" and toleration.value:
            problems.append(
                f"spec.cluster.workers.tolerations[{index}].value must be empty when operator "
                "is Exists; remove the value or use operator: Equal."
            )
        if toleration.key is None and toleration.operator == "Equal":
            problems.append(
                f"spec.cluster.workers.tolerations[{index}].key is required with operator Equal; "
                "set the taint key, or use operator: Exists to tolerate every taint."
            )
    unknown = sorted(set(workers.affinity or {}) - _AFFINITY_KEYS)
    if unknown:
        problems.append(
            f"spec.cluster.workers.affinity: unknown field(s) {', '.join(unknown)}; an Affinity "
            "has only nodeAffinity, podAffinity and podAntiAffinity."
        )
    return problems
