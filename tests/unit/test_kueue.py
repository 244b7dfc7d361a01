"""Kueue: spec.cluster.queueName / priorityClassName on the RayCluster we build, the job's
Queued phase while Kueue holds its cluster suspended, and the warm pool keeping queues apart.

Kueue's contract for a RayCluster (kueue.sigs.k8s.io/docs/tasks/run/rayclusters): the
LocalQueue is the `kueue.x-k8s.io/queue-name` label in metadata.labels; Kueue's webhook
suspends the cluster (spec.suspend) at creation and un-suspends it once admitted; the
workload's priority is the pods' PriorityClass (priorityClassName). The cluster we build is
checked against KubeRay's real CRD schema (spec.suspend and priorityClassName included) and
the label against Kubernetes' label syntax, which Kueue's webhook enforces on the value.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kube_sim import sample_job
from kuberay_schema import CRDS, errors
from rlhf_operator import builders, names, warmpool
from rlhf_operator.api import RLHFJob, RLHFJobStatus
from rlhf_operator.reconcile import ClusterObservation, Observed, reconcile
from rlhf_operator.reconcile.kuberay import observe_cluster
from rlhf_operator.validation import validate
from test_reconcile import NOW, UID, kinds, ready_cluster, reasons, step

OWNER = builders.owner_reference({"name": "demo", "uid": UID})
QUEUED = {"cluster": {"queueName": "team-a", "priorityClassName": "rlhf-high"}}
# Kubernetes label values: <= 63 chars, alphanumerics, '-', '_', '.'; start and end alphanumeric
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def job(**spec: Any) -> RLHFJob:
    manifest = sample_job("demo", **spec)
    manifest["metadata"]["uid"] = UID
    return RLHFJob.from_manifest(manifest)


def test_queue_name_labels_the_raycluster_and_priority_reaches_every_pod() -> None:
    cluster = builders.build_raycluster(job(**QUEUED), "demo-ray", OWNER)
    label = cluster["metadata"]["labels"][names.LABEL_KUEUE_QUEUE]
    assert label == "team-a" and LABEL_VALUE.match(label) and len(label) <= 63
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert head["priorityClassName"] == workers["template"]["spec"]["priorityClassName"]
    assert head["priorityClassName"] == "rlhf-high"
    # We never suspend it ourselves: Kueue's webhook does, and without Kueue a suspended
    # cluster would wait forever.
    assert "suspend" not in cluster["spec"]
    rayjob = builders.build_stage_rayjob(job(**QUEUED), "sft", 1, "demo-ray", OWNER)
    # Only the cluster is queued: a RayJob on an existing cluster (clusterSelector) is not a
    # Kueue workload, and labelling it would make Kueue try to manage it.
    assert names.LABEL_KUEUE_QUEUE not in rayjob["metadata"]["labels"]


@pytest.mark.skipif(not CRDS.is_dir(), reason=f"KubeRay CRDs not found at {CRDS}")
def test_the_queued_raycluster_validates_against_the_kuberay_crd() -> None:
    cluster = builders.build_raycluster(job(**QUEUED), "demo-ray", OWNER)
    assert errors("ray.io_rayclusters.yaml", cluster) == []
    suspended = {**cluster, "spec": {**cluster["spec"], "suspend": True}}  # as Kueue sets it
    assert errors("ray.io_rayclusters.yaml", suspended) == []


def test_without_a_queue_nothing_kueue_is_set() -> None:
    cluster = builders.build_raycluster(job(), "demo-ray", OWNER)
    assert names.LABEL_KUEUE_QUEUE not in cluster["metadata"]["labels"]
    assert "priorityClassName" not in cluster["spec"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize(
    ("cluster", "field"),
    [
        ({"queueName": "Team_A"}, "spec.cluster.queueName"),
        ({"queueName": "q" * 64}, "spec.cluster.queueName"),
        ({"priorityClassName": "High Priority"}, "spec.cluster.priorityClassName"),
    ],
)
def test_bad_queue_or_priority_names_are_refused_naming_the_field(
    cluster: dict, field: str
) -> None:
    found, problems = validate(sample_job("demo", cluster=cluster))
    assert found is None
    assert any(field in p for p in problems), problems


def test_the_pool_signature_includes_the_queue() -> None:
    a = warmpool.pool_signature(job(cluster={"queueName": "team-a"}))
    b = warmpool.pool_signature(job(cluster={"queueName": "team-b"}))
    none = warmpool.pool_signature(job())
    assert len({a, b, none}) == 3


def test_a_suspended_cluster_is_observed_as_such() -> None:
    body = builders.build_raycluster(job(**QUEUED), "demo-ray", OWNER)
    body["spec"]["suspend"] = True
    seen = observe_cluster(body)
    assert seen.suspended and seen.queue == "team-a"
    body["spec"]["suspend"] = False
    assert not observe_cluster(body).suspended


def suspended_cluster() -> ClusterObservation:
    return ClusterObservation(
        name="demo-ray",
        owner_uids=(UID,),
        job_label="demo",
        suspended=True,
        queue="team-a",
        auth_mode=builders.AUTH_MODE_TOKEN,
    )


def test_the_job_is_queued_while_kueue_holds_its_cluster_then_runs_once_admitted() -> None:
    j = job(**QUEUED)
    status = step(j, RLHFJobStatus(), pinned_spec="{}").status
    queued = step(j, status, Observed(cluster=suspended_cluster()))
    s = queued.status
    assert s.phase == "Queued" and s.progress == "queue team-a"
    assert "LocalQueue team-a" in s.message and "Kueue" in s.message
    assert reasons(queued) == [names.JOB_QUEUED] and queued.actions == []
    ready = next(c for c in s.conditions if c.type == names.COND_CLUSTER_READY)
    assert (ready.status, ready.reason) == ("False", "Queued")

    # Hours in the queue are not a provisioning failure (the deadline counts from admission).
    later = NOW.replace(hour=NOW.hour + 3)
    still = step(j, s, Observed(cluster=suspended_cluster()), now=later)
    assert still.status.phase == "Queued" and still.events == []

    admitted = ClusterObservation(
        "demo-ray", owner_uids=(UID,), job_label="demo", auth_mode=builders.AUTH_MODE_TOKEN
    )
    provisioning = step(j, still.status, Observed(cluster=admitted), now=later)
    assert provisioning.status.phase == "Provisioning"
    assert reasons(provisioning) == [names.JOB_ADMITTED]
    assert provisioning.status.cluster.waiting_since is not None  # the deadline starts now

    running = step(j, provisioning.status, Observed(cluster=ready_cluster()), now=later)
    assert running.status.phase == "Running"
    assert kinds(running) == ["CreateNetworkPolicy", "CreateProgress", "CreateRayJob"]


def test_someone_elses_suspended_cluster_does_not_queue_the_job() -> None:
    j = job(**QUEUED)
    status = step(j, RLHFJobStatus(), pinned_spec="{}").status
    foreign = ClusterObservation("demo-ray", owner_uids=("other",), suspended=True)
    assert reconcile(j, status, Observed(cluster=foreign), NOW, generation=1).status.phase != (
        "Queued"
    )
