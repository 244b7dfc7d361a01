"""Warm-pool logic: what must match for reuse, the claim and release patches, which cluster wins."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rlhf_operator import builders, names
from rlhf_operator import warmpool as wp
from rlhf_operator.api import RLHFJob, RLHFJobStatus, StageStatus
from rlhf_operator.names import LABEL_JOB
from rlhf_operator.reconcile import (
    ClusterObservation,
    Observed,
    RayJobObservation,
    kuberay,
    machine,
)
from rlhf_operator.reconcile.cluster import STOP_GRACE

NOW = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def manifest(name: str = "job-a", namespace: str = "team-a", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "rlhf.dev/v1alpha1",
        "kind": "RLHFJob",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}"},
        "spec": {
            "model": {"base": "gpt2"},
            "storage": {"uri": "s3://bucket/runs", "secretRef": {"name": "s3-creds"}},
            "stages": {
                "sft": {"dataset": {"uri": "imdb"}},
                "reward": {"dataset": {"uri": "prefs"}},
                "ppo": {"prompts": {"uri": "prompts"}},
            },
            "cluster": {
                "image": "trainer:1",
                "workers": {"replicas": 2, "gpusPerWorker": 1},
            },
            "warmPool": {"keepAliveSeconds": 600},
        },
    }
    for path, value in spec.items():
        node = body["spec"]
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return body


def job(**kwargs: Any) -> RLHFJob:
    return RLHFJob.from_manifest(manifest(**kwargs))


def built_spec(**kwargs: Any) -> dict[str, Any]:
    """The RayCluster spec job(**kwargs) builds (what an intact pooled cluster holds)."""
    return builders.build_raycluster(job(**kwargs), "any", owner={})["spec"]


SIG = wp.pool_signature(job())
STAMP = {wp.ANNOTATION_GENERATION: "1", wp.ANNOTATION_POOL: ""}


def pooled(
    name: str = "old-ray",
    signature: str = SIG,
    state: str = wp.STATE_AVAILABLE,
    expires: datetime | None = NOW + timedelta(minutes=5),
    ray_state: str = "ready",
    version: str = "7",
    **meta: Any,
) -> dict[str, Any]:
    """A RayCluster manifest as the pool leaves it."""
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%SZ") if expires else None
    return {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "resourceVersion": version,
            "generation": 1,
            "labels": {wp.LABEL_SIGNATURE: signature, wp.LABEL_STATE: state},
            "annotations": {**STAMP, **({wp.ANNOTATION_EXPIRES_AT: stamp} if stamp else {})},
            **meta,
        },
        "spec": built_spec(),
        "status": {"state": ray_state},
    }


def seen(**kwargs: Any) -> wp.PoolCluster:
    return wp.observe(pooled(**kwargs))


class TestSignature:
    def test_stable_and_short_enough_for_a_label(self) -> None:
        sig = wp.pool_signature(job())
        assert sig == wp.pool_signature(job())
        assert len(sig) == wp.SIGNATURE_LENGTH <= 63
        assert all(ch in "0123456789abcdef" for ch in sig)

    def test_what_a_job_does_is_not_part_of_it(self) -> None:
        # Different job, model, data, storage path, hyper-parameters, keep-alive: same cluster.
        other = job(
            name="job-b",
            model={"base": "facebook/opt-125m"},
            storage={"uri": "s3://bucket/elsewhere", "secretRef": {"name": "s3-creds"}},
            **{"stages.ppo.steps": 7, "stages.sft.epochs": 3, "warmPool.keepAliveSeconds": 60},
        )
        assert wp.pool_signature(other) == wp.pool_signature(job())

    @pytest.mark.parametrize(
        "change",
        [
            {"namespace": "team-b"},
            {"cluster.image": "trainer:2"},
            {"cluster.imagePullPolicy": "Always"},
            {"cluster.serviceAccountName": "other-sa"},
            {"cluster.head": {"resources": {"requests": {"cpu": "8"}}}},
            {"cluster.workers.replicas": 4},
            {"cluster.workers.gpusPerWorker": 2},
            {"cluster.workers.resources": {"requests": {"cpu": "16"}}},
            {"cluster.workers.nodeSelector": {"pool": "a100"}},
            {"cluster.workers.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]},
            {"cluster.workers.affinity": {"nodeAffinity": {}}},
            {"storage": {"uri": "s3://bucket/runs", "secretRef": {"name": "other-creds"}}},
            {"storage": {"uri": "s3://bucket/runs"}},
            {
                "storage": {
                    "uri": "s3://b/r",
                    "secretRef": {"name": "s3-creds"},
                    "endpoint": "http://m",
                }
            },
            {"storage": {"uri": "pvc://claim-a/runs"}},
            {"warmPool.pool": "team-x"},
            {"cluster.env": [{"name": "NCCL_DEBUG", "value": "INFO"}]},
            {
                "cluster.env": [
                    {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "h", "key": "t"}}}
                ]
            },
            {"cluster.envFrom": [{"secretRef": {"name": "nccl"}}]},
            {"cluster.imagePullSecrets": [{"name": "regcred"}]},
            {"cluster.head": {"nodeSelector": {"pool": "cpu"}}},
            {"cluster.head": {"tolerations": [{"key": "k", "operator": "Exists"}]}},
        ],
        ids=lambda change: next(iter(change)),
    )
    def test_everything_baked_into_the_cluster_is(self, change: dict[str, Any]) -> None:
        kwargs = dict(change)
        namespace = kwargs.pop("namespace", "team-a")
        assert wp.pool_signature(job(namespace=namespace, **kwargs)) != wp.pool_signature(job())

    def test_jobs_reading_data_from_different_volumes_do_not_share(self) -> None:
        a = job(model={"base": "pvc://models-a/gpt2"})
        assert wp.pool_signature(a) == wp.pool_signature(job(model={"base": "pvc://models-a/opt"}))
        assert wp.pool_signature(a) != wp.pool_signature(job(model={"base": "pvc://models-b/gpt2"}))
        assert wp.pool_signature(a) != wp.pool_signature(job())

    def test_a_shared_cluster_carries_nothing_of_the_job_that_built_it(self) -> None:
        # The guard behind rule 1: same signature -> the very same RayCluster spec, and no trace
        # of the job's name, model, data or storage path in it.
        a = job(
            name="job-a", storage={"uri": "s3://bucket/a-runs", "secretRef": {"name": "s3-creds"}}
        )
        b = job(name="job-b", model={"base": "facebook/opt-125m"})
        assert wp.pool_signature(a) == wp.pool_signature(b)
        spec_a = builders.build_raycluster(a, "c", builders.owner_reference(manifest()["metadata"]))
        spec_b = builders.build_raycluster(b, "c", builders.owner_reference(manifest()["metadata"]))
        assert spec_a["spec"] == spec_b["spec"]
        text = json.dumps(spec_a["spec"])
        for private in ("job-a", "a-runs", "gpt2", "imdb", "prefs"):
            assert private not in text

    def test_two_pvc_claims_differ_but_not_two_paths_on_one_claim(self) -> None:
        a = job(storage={"uri": "pvc://claim-a/x"})
        assert wp.pool_signature(a) == wp.pool_signature(job(storage={"uri": "pvc://claim-a/y"}))
        assert wp.pool_signature(a) != wp.pool_signature(job(storage={"uri": "pvc://claim-b/x"}))


class TestExpiryAndHealth:
    def test_expired_only_after_the_deadline(self) -> None:
        cluster = seen(expires=NOW + timedelta(seconds=30))
        assert not cluster.expired(NOW)
        assert cluster.seconds_to_expiry(NOW) == 30
        assert cluster.expired(NOW + timedelta(seconds=30))
        assert cluster.seconds_to_expiry(NOW + timedelta(hours=1)) == 0

    def test_an_available_cluster_without_a_readable_expiry_is_expired(self) -> None:
        assert seen(expires=None).expired(NOW)
        broken = pooled()
        broken["metadata"]["annotations"][wp.ANNOTATION_EXPIRES_AT] = "tomorrow"
        assert wp.observe(broken).expired(NOW)

    def test_a_claimed_cluster_never_expires(self) -> None:
        assert not seen(state=wp.STATE_CLAIMED, expires=None).expired(NOW)

    def test_expired_clusters_and_next_expiry(self) -> None:
        clusters = [
            seen(name="b", expires=NOW - timedelta(seconds=1)),
            seen(name="a", expires=NOW - timedelta(seconds=5)),
            seen(name="later", expires=NOW + timedelta(seconds=40)),
            seen(name="soon", expires=NOW + timedelta(seconds=10)),
            seen(name="claimed", state=wp.STATE_CLAIMED, expires=None),
            seen(name="going", expires=None, deletionTimestamp="2026-05-01T11:00:00Z"),
        ]
        assert [c.name for c in wp.expired_clusters(clusters, NOW)] == ["a", "b"]
        assert wp.next_expiry(clusters[2:], NOW) == 10
        assert wp.next_expiry([seen(state=wp.STATE_CLAIMED)], NOW) is None

    @pytest.mark.parametrize(
        ("status", "healthy"),
        [
            ({"state": "ready"}, True),
            ({"state": "failed"}, False),
            ({"state": "suspended"}, False),
            ({}, False),
            (
                {"state": "ready", "conditions": [{"type": "HeadPodReady", "status": "False"}]},
                False,
            ),
            (
                {
                    "state": "ready",
                    "conditions": [{"type": "RayClusterReplicaFailure", "status": "True"}],
                },
                False,
            ),
            ({"state": "ready", "conditions": [{"type": "HeadPodReady", "status": "True"}]}, True),
        ],
    )
    def test_health_is_kuberays_ready_state(self, status: dict, healthy: bool) -> None:
        cluster = pooled()
        cluster["status"] = status
        assert wp.is_healthy(cluster) is healthy
        assert wp.observe(cluster).healthy is healthy

    def test_a_cluster_being_deleted_is_not_healthy(self) -> None:
        assert not wp.is_healthy(pooled(deletionTimestamp="2026-05-01T11:00:00Z"))


class TestPoolable:
    def test_a_healthy_cluster_of_a_job_that_is_done_with_it(self) -> None:
        assert wp.is_poolable(healthy=True, failed_by_cluster=False)

    def test_never_a_cluster_that_made_the_job_fail(self) -> None:
        assert not wp.is_poolable(healthy=True, failed_by_cluster=True)

    def test_never_an_unhealthy_cluster(self) -> None:
        assert not wp.is_poolable(healthy=False, failed_by_cluster=False)

    @pytest.mark.parametrize(
        ("reason", "fault"),
        [
            ("SubmissionFailed", True),
            ("JobDeploymentStatusTransitionGracePeriodExceeded", True),
            ("AppFailed", False),
            ("DeadlineExceeded", False),
            (None, False),
        ],
    )
    def test_kuberay_failure_reasons(self, reason: str | None, fault: bool) -> None:
        assert wp.cluster_at_fault(reason) is fault


class TestCandidates:
    def test_only_available_healthy_unexpired_unowned_clusters_of_the_signature(self) -> None:
        good = seen(name="good")
        clusters = [
            good,
            seen(name="other-signature", signature="nope"),
            seen(name="claimed", state=wp.STATE_CLAIMED),
            seen(name="expired", expires=NOW - timedelta(seconds=1)),
            seen(name="not-ready", ray_state="failed"),
            seen(name="owned", ownerReferences=[{"uid": "x"}]),
            seen(name="deleting", deletionTimestamp="2026-05-01T11:00:00Z"),
            wp.observe(
                {"metadata": {"name": "own-cluster-of-a-job"}, "status": {"state": "ready"}}
            ),
        ]
        assert wp.candidates(clusters, SIG, NOW) == [good]
        assert wp.choose_candidate(clusters, SIG, NOW) is good

    def test_none_when_nothing_matches(self) -> None:
        assert wp.choose_candidate([seen(signature="nope")], SIG, NOW) is None

    def test_order_is_soonest_expiry_then_name_whatever_the_input_order(self) -> None:
        late = seen(name="a-late", expires=NOW + timedelta(minutes=9))
        soon_b = seen(name="b-soon", expires=NOW + timedelta(minutes=1))
        soon_a = seen(name="a-soon", expires=NOW + timedelta(minutes=1))
        for order in ([late, soon_b, soon_a], [soon_a, late, soon_b]):
            names = [c.name for c in wp.candidates(order, SIG, NOW)]
            assert names == ["a-soon", "b-soon", "a-late"]


class TestPatches:
    def test_release_moves_ownership_off_the_job_and_labels_the_pool(self) -> None:
        body = manifest()
        patch = wp.release_patch(body["metadata"], SIG, 600, NOW)
        meta = patch["metadata"]
        assert meta["ownerReferences"] is None  # merge-patch null: removed
        assert meta["labels"] == {
            LABEL_JOB: None,
            wp.LABEL_CLAIMED_BY: None,
            wp.LABEL_SIGNATURE: SIG,
            wp.LABEL_STATE: wp.STATE_AVAILABLE,
        }
        released = wp.observe(_merge(_owned_cluster(body), patch))
        assert released.released_by == "team-a/job-a"
        assert released.expires_at == NOW + timedelta(seconds=600)
        assert wp.choose_candidate([released], SIG, NOW) == released
        assert not released.expired(NOW + timedelta(seconds=599))
        assert released.expired(NOW + timedelta(seconds=600))

    def test_claim_carries_the_read_resource_version_and_owns_the_cluster(self) -> None:
        new = manifest(name="job-b")
        patch = wp.claim_patch("42", new["metadata"])
        assert patch["metadata"]["resourceVersion"] == "42"
        claimed = _merge(pooled(version="42"), patch)
        assert claimed["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "rlhf.dev/v1alpha1",
                "kind": "RLHFJob",
                "name": "job-b",
                "uid": "uid-job-b",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert claimed["metadata"]["labels"][LABEL_JOB] == "job-b"
        assert wp.ANNOTATION_EXPIRES_AT not in claimed["metadata"]["annotations"]
        observed = wp.observe(claimed)
        assert observed.state == wp.STATE_CLAIMED
        assert observed.claimed_by_job("uid-job-b")
        assert not observed.claimed_by_job("uid-job-c")
        assert not observed.claimed_by_job(None)
        assert wp.choose_candidate([observed], SIG, NOW) is None

    def test_a_claimed_cluster_released_again_is_claimable_again(self) -> None:
        first = manifest(name="job-b")
        claimed = _merge(pooled(), wp.claim_patch("7", first["metadata"]))
        again = wp.observe(_merge(claimed, wp.release_patch(first["metadata"], SIG, 60, NOW)))
        assert again.claimed_by is None
        assert wp.choose_candidate([again], SIG, NOW) == again

    def test_a_cluster_being_deleted_is_claimed_by_nobody(self) -> None:
        body = manifest()
        claimed = _merge(pooled(), wp.claim_patch("7", body["metadata"]))
        claimed["metadata"]["deletionTimestamp"] = "2026-05-01T11:00:00Z"
        assert not wp.observe(claimed).claimed_by_job("uid-job-a")

    def test_delete_options_pin_the_version(self) -> None:
        assert wp.delete_options(seen(version="9")) == {"preconditions": {"resourceVersion": "9"}}


def _owned_cluster(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "job-a-ray",
            "namespace": "team-a",
            "resourceVersion": "3",
            "generation": 1,
            "ownerReferences": [builders.owner_reference(body["metadata"])],
            "labels": {LABEL_JOB: "job-a", "app.kubernetes.io/managed-by": "rlhf-operator"},
            "annotations": dict(STAMP),
        },
        "spec": built_spec(),
        "status": {"state": "ready"},
    }


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge-patch (what the API server applies), without the version check."""
    result = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merge(result[key], value)
        elif isinstance(value, dict):
            result[key] = _merge({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


# --------------------------------------------------------------------------- the state machine

UID = "uid-job-a"
OTHER_UID = "uid-someone-else"


def cluster_body(
    name: str,
    *,
    owner: str | None = None,
    state: str | None = None,
    signature: str | None = None,
    claimed_by: str | None = None,
    expires: datetime | None = NOW + timedelta(minutes=5),
    ray_state: str = "ready",
    version: str = "11",
) -> dict[str, Any]:
    """A RayCluster as the API holds it: a job's own, or one in (or claimed out of) the pool."""
    labels: dict[str, str] = {wp.LABEL_SIGNATURE: SIG}  # stamped at creation
    if state:
        labels |= {wp.LABEL_STATE: state, wp.LABEL_SIGNATURE: signature or ""}
    if claimed_by:
        labels[wp.LABEL_CLAIMED_BY] = claimed_by
    annotations = {}
    if state == wp.STATE_AVAILABLE and expires is not None:
        annotations[wp.ANNOTATION_EXPIRES_AT] = expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "team-a",
        "resourceVersion": version,
        "generation": 1,
        "labels": labels,
        "annotations": {**STAMP, **annotations},
    }
    if owner:
        meta["ownerReferences"] = [{"kind": "RLHFJob", "name": "x", "uid": owner}]
        meta["labels"][LABEL_JOB] = "job-a" if owner == UID else "other"
    return {"metadata": meta, "spec": built_spec(), "status": {"state": ray_state}}


def observed_cluster(**kwargs: Any) -> ClusterObservation:
    return kuberay.observe_cluster(cluster_body(**kwargs))


def warm(name: str = "old-ray", **kwargs: Any) -> ClusterObservation:
    """An available pool cluster with job()'s signature."""
    return observed_cluster(
        name=name, state=wp.STATE_AVAILABLE, signature=wp.pool_signature(job()), **kwargs
    )


def decide(status: RLHFJobStatus, observed: Observed, j: RLHFJob | None = None, **kw: Any):
    return machine.reconcile(j or job(), status, observed, NOW, generation=1, **kw)


def kinds(decision: Any) -> list[str]:
    return [type(a).__name__ for a in decision.actions]


def reasons(decision: Any) -> list[str]:
    return [e.reason for e in decision.events]


def claiming(pool_cluster: ClusterObservation) -> RLHFJobStatus:
    """The status of job() right after it decided to claim `pool_cluster`."""
    return decide(RLHFJobStatus(), Observed(pool=(pool_cluster.pool,)), pinned_spec="{}").status


def finished(phase: str = "Succeeded", **spec: Any) -> RLHFJobStatus:
    status = RLHFJobStatus(phase=phase, stage="sft", completion_time="2026-05-01T11:59:00Z")
    status.cluster.name = "job-a-ray"
    status.stages["sft"] = StageStatus(state=phase, attempts=1, ray_job="job-a-sft-1")
    return status


class TestMachine:
    def test_a_new_job_records_the_warm_cluster_then_claims_it(self) -> None:
        pool_cluster = warm()
        d = decide(RLHFJobStatus(), Observed(pool=(pool_cluster.pool,)), pinned_spec="{}")
        assert kinds(d) == ["PinSpec", "ClaimCluster"]  # no CreateCluster
        assert (d.status.cluster.name, d.status.cluster.reused) == ("old-ray", True)
        claim = d.actions[1]
        assert claim.name == "old-ray"
        assert claim.patch["metadata"]["resourceVersion"] == "11"
        assert claim.patch["metadata"]["labels"][wp.LABEL_CLAIMED_BY] == UID
        assert names.WARM_POOL_HIT not in reasons(d)  # said once the claim holds

    def test_no_matching_cluster_means_its_own_cluster_and_a_miss(self) -> None:
        others = (
            observed_cluster(name="x", state=wp.STATE_AVAILABLE, signature="other").pool,
            warm("expired", expires=NOW - timedelta(seconds=1)).pool,
            warm("sick", ray_state="failed").pool,
        )
        d = decide(RLHFJobStatus(), Observed(pool=others))
        assert kinds(d) == ["CreateCluster"]
        assert (d.status.cluster.name, d.status.cluster.reused) == ("job-a-ray", False)
        assert names.WARM_POOL_MISS in reasons(d)

    def test_a_job_that_does_not_use_pools_hears_no_miss(self) -> None:
        j = job(**{"warmPool.keepAliveSeconds": 0})
        d = decide(RLHFJobStatus(), Observed(), j)
        assert names.WARM_POOL_MISS not in reasons(d)

    def test_once_claimed_the_first_stage_starts_on_the_warm_cluster(self) -> None:
        status = claiming(warm())
        mine = observed_cluster(
            name="old-ray", owner=UID, state=wp.STATE_CLAIMED, claimed_by=UID, signature="s"
        )
        d = decide(status, Observed(cluster=mine))
        assert kinds(d) == ["CreateProgress", "CreateRayJob"]
        assert d.actions[-1].manifest["spec"]["clusterSelector"] == {
            names.LABEL_RAY_CLUSTER: "old-ray"
        }
        assert names.WARM_POOL_HIT in reasons(d)
        assert names.CLUSTER_READY not in reasons(d)

    def test_a_claim_that_did_not_land_is_made_again_with_the_current_version(self) -> None:
        status = claiming(warm(version="11"))
        d = decide(status, Observed(cluster=warm(version="12")))
        assert kinds(d) == ["ClaimCluster"]
        assert d.actions[0].patch["metadata"]["resourceVersion"] == "12"

    def test_a_cluster_another_job_claimed_is_given_up(self) -> None:
        status = claiming(warm())
        theirs = observed_cluster(
            name="old-ray", owner=OTHER_UID, state=wp.STATE_CLAIMED, claimed_by=OTHER_UID
        )
        stale_pool = (warm().pool,)  # the pool index has not caught up yet
        d = decide(status, Observed(cluster=theirs, pool=stale_pool))
        assert kinds(d) == ["CreateCluster"]
        assert (d.status.cluster.name, d.status.cluster.reused) == ("job-a-ray", False)

    def test_a_pool_cluster_holding_the_jobs_own_name_makes_it_pick_another(self) -> None:
        squatter = observed_cluster(name="job-a-ray", state=wp.STATE_AVAILABLE, signature="x")
        d = decide(RLHFJobStatus(), Observed(cluster=squatter))
        assert kinds(d) == ["CreateCluster"]
        assert d.status.cluster.name == f"job-a-{UID[:5]}-ray"

    def test_a_user_cluster_holding_the_name_is_still_a_conflict(self) -> None:
        status = decide(RLHFJobStatus(), Observed()).status
        foreign = observed_cluster(name="job-a-ray", owner=OTHER_UID)
        d = decide(status, Observed(cluster=foreign))
        assert d.status.phase == "Provisioning"  # waits for it to go; never adopts it
        assert names.CLUSTER_CONFLICT in [c.reason for c in d.status.conditions]
        assert "DeleteCluster" not in kinds(d)

    @pytest.mark.parametrize(
        ("phase", "rayjob_reason", "ray_state", "pooled"),
        [
            ("Succeeded", "", "ready", True),
            ("Failed", "AppFailed", "ready", True),
            ("Failed", "SubmissionFailed", "ready", False),
            ("Succeeded", "", "failed", False),
        ],
        ids=["succeeded", "failed-own-fault", "failed-cluster-fault", "unhealthy"],
    )
    def test_a_finished_jobs_cluster_is_pooled_or_deleted(
        self, phase: str, rayjob_reason: str, ray_state: str, pooled: bool
    ) -> None:
        ours = observed_cluster(name="job-a-ray", owner=UID, ray_state=ray_state)
        last = RayJobObservation(
            "job-a-sft-1",
            # AppFailed: the Ray job itself FAILED; SubmissionFailed: no verdict from Ray
            job_status={"Succeeded": "SUCCEEDED", "AppFailed": "FAILED"}.get(
                phase if phase == "Succeeded" else rayjob_reason, ""
            ),
            deployment_status="Complete" if phase == "Succeeded" else "Failed",
            reason=rayjob_reason,
            owner_uids=(UID,),
        )
        d = decide(finished(phase), Observed(cluster=ours, rayjob=last))
        if pooled:
            assert kinds(d) == ["ReleaseCluster"]
            labels = d.actions[0].patch["metadata"]["labels"]
            assert labels[wp.LABEL_SIGNATURE] == wp.pool_signature(job())
            assert labels[wp.LABEL_STATE] == wp.STATE_AVAILABLE
        else:  # (a RayJob whose Ray job may still run is deleted too: KubeRay stops it)
            assert kinds(d)[-1:] == ["DeleteCluster"] and "ReleaseCluster" not in kinds(d)

    def test_no_keep_alive_deletes(self) -> None:
        ours = observed_cluster(name="job-a-ray", owner=UID)
        d = decide(finished(), Observed(cluster=ours), job(**{"warmPool.keepAliveSeconds": 0}))
        assert kinds(d) == ["DeleteCluster"]

    def test_a_stage_still_running_on_a_finished_jobs_cluster_delays_pooling(self) -> None:
        ours = observed_cluster(name="job-a-ray", owner=UID)
        stopping = RayJobObservation(
            "job-a-sft-1", "RUNNING", "Running", deleting=True, owner_uids=(UID,)
        )
        d = decide(finished("Failed"), Observed(cluster=ours, rayjob=stopping))
        assert kinds(d) == []  # neither pooled (a stage still runs there) nor deleted: wait

    def test_suspending_deletes_even_with_a_warm_pool(self) -> None:
        j = job(runPolicy={"suspend": True})
        status = RLHFJobStatus(phase="Running", stage="sft")
        status.cluster.name = "job-a-ray"
        ours = observed_cluster(name="job-a-ray", owner=UID)
        d = decide(status, Observed(cluster=ours), j)
        assert "DeleteCluster" in kinds(d) and "ReleaseCluster" not in kinds(d)

    @pytest.mark.parametrize(
        ("since", "expected", "waits"),
        [
            (timedelta(seconds=5), ["DeleteRayJob"], True),
            (STOP_GRACE, ["DeleteRayJob", "DeleteCluster"], False),
        ],
        ids=["within-grace", "past-grace"],
    )
    def test_deleting_a_running_job_stops_its_stage_before_pooling(
        self, since: timedelta, expected: list[str], waits: bool
    ) -> None:
        status = RLHFJobStatus(phase="Running", stage="sft")
        status.cluster.name = "job-a-ray"
        status.stages["sft"] = StageStatus(state="Running", attempts=1, ray_job="job-a-sft-1")
        ours = observed_cluster(name="job-a-ray", owner=UID)
        running = RayJobObservation("job-a-sft-1", "RUNNING", "Running", owner_uids=(UID,))
        d = machine.finalize(
            job(), status, Observed(cluster=ours, rayjob=running), NOW, NOW - since
        )
        assert kinds(d) == expected
        assert bool(d.wait) is waits

    def test_a_deleted_jobs_cluster_goes_to_the_pool_once_its_stage_is_gone(self) -> None:
        status = RLHFJobStatus(phase="Running", stage="sft")
        status.cluster.name = "job-a-ray"
        ours = observed_cluster(name="job-a-ray", owner=UID)
        d = machine.finalize(job(), status, Observed(cluster=ours), NOW, NOW)
        assert kinds(d) == ["ReleaseCluster"] and d.wait is None


# --------------------------------------------------------------------------- integrity


def tamper(body: dict[str, Any], edit: str) -> dict[str, Any]:
    """A pooled cluster after `edit`, as the API server would then hold it."""
    body = copy.deepcopy(body)
    meta, spec = body["metadata"], body["spec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    if edit == "kubectl-edit":  # any spec change: the API server bumps the generation
        spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "evil:1"
        meta["generation"] = 2
    elif edit == "forged-generation":  # the edit, with the stamp rewritten to match
        head["initContainers"] = [{"name": "x", "image": "evil:1"}]
        meta["generation"] = 2
        meta["annotations"][wp.ANNOTATION_GENERATION] = "2"
    elif edit == "hand-labelled":  # someone's own RayCluster, given our labels
        head["containers"][0]["image"] = "theirs:1"
    elif edit == "unstamped":  # built by an operator version before the stamp
        del meta["annotations"][wp.ANNOTATION_GENERATION]
    elif edit == "other-builders":  # an older operator's builders: same label, other spec
        del spec["authOptions"]
    return body


EDITS = ["kubectl-edit", "forged-generation", "hand-labelled", "unstamped", "other-builders"]


class TestIntegrity:
    def test_an_untouched_pooled_cluster_is_intact(self) -> None:
        assert seen().intact and wp.choose_candidate([seen()], SIG, NOW) is not None

    @pytest.mark.parametrize("edit", EDITS)
    def test_a_cluster_that_is_not_what_its_label_says_is_never_claimed(self, edit: str) -> None:
        cluster = wp.observe(tamper(pooled(), edit))
        assert cluster.signature == SIG  # its label still says it fits
        assert not cluster.intact
        assert wp.choose_candidate([cluster], SIG, NOW) is None
        assert wp.tampered([cluster], SIG) == [cluster]

    def test_the_stored_spec_hashes_like_the_built_one(self) -> None:
        """The API server fills in KubeRay's CRD defaults (and nothing else) on what we create:
        SERVER_DEFAULTS must cover them, or no pooled cluster would ever be intact."""
        from kuberay_schema import CRDS, stored

        if not CRDS.is_dir():
            pytest.skip(f"KubeRay CRDs not found at {CRDS}")
        for kwargs in ({}, {"cluster.workers.tolerations": [{"key": "g", "operator": "Exists"}]}):
            cluster = builders.build_raycluster(job(**kwargs), "c", owner={})
            as_stored = stored("ray.io_rayclusters.yaml", cluster)
            assert as_stored["spec"] != cluster["spec"]  # the server does add fields
            assert wp.spec_digest(as_stored["spec"]) == wp.spec_digest(cluster["spec"])

    def test_a_created_cluster_is_stamped(self) -> None:
        d = decide(RLHFJobStatus(), Observed(), pinned_spec="{}")
        (create,) = [a for a in d.actions if type(a).__name__ == "CreateCluster"]
        meta = create.manifest["metadata"]
        assert meta["labels"][wp.LABEL_SIGNATURE] == SIG
        assert meta["annotations"][wp.ANNOTATION_GENERATION] == "1"
        stored = {**create.manifest, "metadata": {**meta, "generation": 1}}
        assert wp.observe(stored).intact  # as the API server returns it

    @pytest.mark.parametrize("edit", EDITS[:3])
    def test_a_job_passes_over_a_tampered_cluster_and_says_so(self, edit: str) -> None:
        body = tamper(cluster_body("old-ray", state=wp.STATE_AVAILABLE, signature=SIG), edit)
        forged = kuberay.observe_cluster(body)
        d = decide(RLHFJobStatus(), Observed(pool=(forged.pool,)), pinned_spec="{}")
        assert "ClaimCluster" not in kinds(d) and "CreateCluster" in kinds(d)
        (warning,) = [e for e in d.events if e.reason == names.WARM_POOL_TAMPERED]
        assert "old-ray" in warning.message and warning.type == "Warning"

    def test_a_cluster_edited_during_its_job_is_deleted_not_pooled(self) -> None:
        body = tamper(cluster_body("job-a-ray", owner=UID), "kubectl-edit")
        d = decide(finished(), Observed(cluster=kuberay.observe_cluster(body)))
        assert kinds(d) == ["DeleteCluster"]
        assert "spec changed" in _released(d)


def _released(decision: Any) -> str:
    return next(c.message for c in decision.status.conditions if c.type == "ClusterReady")


class TestPoolSize:
    def test_a_full_namespace_pool_deletes_the_next_cluster(self, monkeypatch) -> None:
        from rlhf_operator import tenancy

        monkeypatch.setattr(tenancy, "MAX_POOLED_CLUSTERS", 2)
        ours = observed_cluster(name="job-a-ray", owner=UID)
        room = decide(finished(), Observed(cluster=ours, pooled_in_namespace=1))
        assert kinds(room) == ["ReleaseCluster"]
        full = decide(finished(), Observed(cluster=ours, pooled_in_namespace=2))
        assert kinds(full) == ["DeleteCluster"]
        assert "maxPooledClusters" in _released(full)

    def test_the_driver_counts_every_signature_of_the_namespace(self) -> None:
        from rlhf_operator.reconcile import driver

        index = {
            ("team-a", "s1"): [seen(name="a")],
            ("team-a", "s2"): [seen(name="b"), seen(name="c")],
            ("team-b", "s1"): [seen(name="d")],
        }
        assert driver._pooled_in(index, "team-a") == 3
        assert driver._pooled_in(index, "team-c") == 0
