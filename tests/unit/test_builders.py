"""Pure builders: RLHFJob -> RayCluster / RayJob manifests, checked against KubeRay's real CRDs."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "operator"))

from kube_sim import sample_job
from kuberay_schema import errors, needs_kuberay_crds
from rlhf_operator import builders, names
from rlhf_operator.api import RLHFJob
from rlhf_operator.api.storage import PVC_MOUNT_ROOT

OWNER = builders.owner_reference({"name": "demo", "uid": "1234-uid"})


def job(**spec: Any) -> RLHFJob:
    manifest = sample_job("demo", **spec)
    manifest["metadata"]["uid"] = "1234-uid"
    return RLHFJob.from_manifest(manifest)


GPU_JOB = {
    "cluster": {
        "workers": {
            "replicas": 4,
            "gpusPerWorker": 2,
            "nodeSelector": {"nvidia.com/gpu.product": "A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "affinity": {"podAntiAffinity": {}},
        },
        "serviceAccountName": "trainer",
    },
    "stages": {
        "sft": {"batchSize": 16},
        "reward": {"batchSize": 16},
        "ppo": {"rolloutBatchSize": 16},
    },
}
PVC_JOB = {
    "storage": {"uri": "pvc://rlhf-data/runs", "secretRef": None},
    "model": {"base": "pvc://models/gpt2"},
}
S3_JOB = {
    "storage": {"uri": "s3://b/p", "secretRef": {"name": "minio"}, "endpoint": "http://minio:9000"}
}
SPECS = pytest.mark.parametrize(
    "spec", [{}, GPU_JOB, PVC_JOB, S3_JOB], ids=["cpu", "gpu", "pvc", "s3"]
)


def _pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _restricted(pod: dict) -> None:
    """The Kubernetes "restricted" Pod Security profile, as far as a pod template can show it."""
    pod_ctx = pod["spec"]["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["spec"]["containers"]:
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"] == {"drop": ["ALL"]}
        assert not ctx.get("privileged")
    allowed = {"emptyDir", "persistentVolumeClaim", "configMap", "secret", "projected", "name"}
    for volume in pod["spec"].get("volumes", []):
        assert set(volume) <= allowed, volume
    for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod["spec"].get(forbidden)


class TestRayCluster:
    @needs_kuberay_crds
    @SPECS
    def test_validates_against_the_kuberay_crd(self, spec: dict) -> None:
        assert (
            errors(
                "ray.io_rayclusters.yaml", builders.build_raycluster(job(**spec), "demo-ray", OWNER)
            )
            == []
        )

    @needs_kuberay_crds
    def test_the_schema_check_catches_a_misspelt_field(self) -> None:
        cluster = builders.build_raycluster(job(), "demo-ray", OWNER)
        cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2
        assert any("replica" in e for e in errors("ray.io_rayclusters.yaml", cluster))

    @SPECS
    def test_every_pod_meets_the_restricted_profile(self, spec: dict) -> None:
        for pod in _pods(builders.build_raycluster(job(**spec), "demo-ray", OWNER)):
            _restricted(pod)

    def test_one_fixed_size_worker_group_with_gpus_and_scheduling(self) -> None:
        cluster = builders.build_raycluster(job(**GPU_JOB), "demo-ray", OWNER)
        (group,) = cluster["spec"]["workerGroupSpecs"]
        assert group["groupName"] == "workers"
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
        pod = group["template"]["spec"]
        resources = pod["containers"][0]["resources"]
        assert (
            resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
        )
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100-SXM4-80GB"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        assert pod["affinity"] == {"podAntiAffinity": {}}
        assert pod["serviceAccountName"] == "trainer"

    def test_the_head_gets_no_gpu_no_cpu_for_tasks_and_serves_the_dashboard(self) -> None:
        head = builders.build_raycluster(job(**GPU_JOB), "demo-ray", OWNER)["spec"]["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert head["rayStartParams"]["num-cpus"] == "0"  # no training task lands on the head
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        container = head["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in json.dumps(container["resources"])
        assert {"name": "dashboard", "containerPort": 8265, "protocol": "TCP"} in container["ports"]

    @pytest.mark.parametrize(
        ("account", "expected"), [(None, builders.TRAINER_SERVICE_ACCOUNT), ("mine", "mine")]
    )
    def test_service_account(self, account: str | None, expected: str) -> None:
        cluster = builders.build_raycluster(
            job(cluster={"serviceAccountName": account}), "demo-ray", OWNER
        )
        assert {pod["spec"]["serviceAccountName"] for pod in _pods(cluster)} == {expected}

    def test_pvc_claims_are_mounted_under_the_mount_root(self) -> None:
        for pod in _pods(builders.build_raycluster(job(**PVC_JOB), "demo-ray", OWNER)):
            claims = {v["persistentVolumeClaim"]["claimName"]: v for v in pod["spec"]["volumes"]
                      if "persistentVolumeClaim" in v}  # fmt: skip
            assert set(claims) == {"rlhf-data", "models"}
            assert claims["models"]["persistentVolumeClaim"]["readOnly"] is True  # input only
            mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
            assert {f"{PVC_MOUNT_ROOT}/rlhf-data", f"{PVC_MOUNT_ROOT}/models", "/dev/shm"} <= mounts

    def test_shm_is_an_in_memory_empty_dir(self) -> None:
        for pod in _pods(builders.build_raycluster(job(), "demo-ray", OWNER)):
            assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["spec"]["volumes"]

    def test_storage_secret_is_referenced_by_name_never_copied(self) -> None:
        cluster = builders.build_raycluster(job(**S3_JOB), "demo-ray", OWNER)
        for pod in _pods(cluster):
            container = pod["spec"]["containers"][0]
            assert container["envFrom"] == [{"secretRef": {"name": "minio"}}]
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
            assert not any("valueFrom" in e for e in container.get("env", []))

    def test_owned_by_the_job_and_labelled(self) -> None:
        meta = builders.build_raycluster(job(), "demo-ray", OWNER)["metadata"]
        assert meta["ownerReferences"] == [OWNER]
        assert OWNER["uid"] == "1234-uid" and OWNER["controller"] is True
        assert meta["labels"][names.LABEL_JOB] == "demo"
        assert meta["namespace"] == "ns"


class TestStageRayJob:
    @needs_kuberay_crds
    @SPECS
    @pytest.mark.parametrize("attempt", [1, 3])
    def test_validates_against_the_kuberay_crd(self, spec: dict, attempt: int) -> None:
        rayjob = builders.build_stage_rayjob(job(**spec), "ppo", attempt, "demo-ray", OWNER)
        assert errors("ray.io_rayjobs.yaml", rayjob) == []

    @pytest.mark.parametrize("stage", ["sft", "reward", "ppo", "evaluation"])
    def test_runs_on_the_jobs_cluster_without_kuberay_retries(self, stage: str) -> None:
        rayjob = builders.build_stage_rayjob(job(), stage, 1, "demo-ray", OWNER)
        spec = rayjob["spec"]
        assert spec["clusterSelector"] == {"ray.io/cluster": "demo-ray"}
        assert "backoffLimit" not in spec and "suspend" not in spec
        assert spec["shutdownAfterJobFinishes"] is False
        assert rayjob["metadata"]["name"] == f"demo-{stage}-1"
        assert rayjob["metadata"]["labels"][names.LABEL_STAGE] == stage
        assert rayjob["metadata"]["labels"][names.LABEL_JOB] == "demo"
        assert rayjob["metadata"]["ownerReferences"] == [OWNER]

    @pytest.mark.parametrize(
        ("attempt", "resume"), [(1, None), (2, "s3://bucket/rlhf/demo/sft/checkpoints")]
    )
    def test_entrypoint_is_the_stage_command(self, attempt: int, resume: str | None) -> None:
        spec = builders.build_stage_rayjob(job(), "sft", attempt, "demo-ray", OWNER)["spec"]
        args = shlex.split(spec["entrypoint"])
        assert args[:5] == ["python", "-m", "rlhf_trainer", "stage", "sft"]
        assert args[args.index("--attempt") + 1] == str(attempt)
        assert (
            args[args.index("--resume-from") + 1] if "--resume-from" in args else None
        ) == resume
        manifest = json.loads(args[args.index("--job") + 1])  # shell-quoted JSON survives intact
        assert set(manifest) == {"apiVersion", "kind", "metadata", "spec"}
        assert RLHFJob.from_manifest(manifest).spec == job().spec

    def test_entrypoint_quotes_hostile_values(self) -> None:
        hostile = job(model={"base": "gpt2'; rm -rf / #"})
        args = shlex.split(
            builders.build_stage_rayjob(hostile, "sft", 1, "c", OWNER)["spec"]["entrypoint"]
        )
        assert args[:6] == ["python", "-m", "rlhf_trainer", "stage", "sft", "--job"]
        assert json.loads(args[6])["spec"]["model"]["base"] == "gpt2'; rm -rf / #"

    def test_the_submitter_pod_is_restricted_and_gets_no_secrets(self) -> None:
        template = builders.build_stage_rayjob(job(**S3_JOB), "sft", 1, "c", OWNER)["spec"][
            "submitterPodTemplate"
        ]
        _restricted(template)
        assert template["spec"]["automountServiceAccountToken"] is False
        assert "minio" not in json.dumps(template)


PASS_THROUGH = {
    "cluster": {
        "env": [
            {"name": "NCCL_DEBUG", "value": "INFO"},
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "nccl-tuning"}, "prefix": "X_"}],
        "imagePullSecrets": [{"name": "regcred"}],
        "head": {
            "nodeSelector": {"pool": "cpu"},
            "tolerations": [{"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
}


class TestAuthentication:
    @needs_kuberay_crds
    @pytest.mark.parametrize("spec", [{}, GPU_JOB, PASS_THROUGH], ids=["cpu", "gpu", "pass"])
    def test_token_mode_on_every_cluster_and_valid_for_kuberay(self, spec: dict) -> None:
        cluster = builders.build_raycluster(job(**spec), "demo-ray", OWNER)
        assert cluster["spec"]["authOptions"] == {"mode": "token"}
        major, minor, _ = (int(p) for p in cluster["spec"]["rayVersion"].split("."))
        assert (major, minor) >= (2, 52)  # KubeRay's token mode needs Ray >= 2.52
        assert errors("ray.io_rayclusters.yaml", cluster) == []

    def test_the_submitter_reads_the_clusters_token_by_reference(self) -> None:
        rayjob = builders.build_stage_rayjob(job(), "sft", 1, "pool-ray", OWNER)
        template = rayjob["spec"]["submitterPodTemplate"]
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        # KubeRay's Secret is named after the cluster (a claimed warm cluster keeps its own).
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {
            "secretKeyRef": {"name": "pool-ray", "key": "auth_token"}
        }
        assert template["metadata"]["labels"][names.LABEL_RAY_CLIENT] == "pool-ray"


class TestNetworkPolicy:
    POLICY = builders.build_network_policy("demo-ray", "team-a", "c-uid", ["ray-system", "rlhf"])

    @pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
    def test_is_valid_kubernetes(self, version: str) -> None:
        import kubernetes_validate

        kubernetes_validate.validate(self.POLICY, version, strict=True)

    def test_owned_by_the_raycluster_without_blocking_it(self) -> None:
        (owner,) = self.POLICY["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"]) == ("RayCluster", "demo-ray", "c-uid")
        assert owner["blockOwnerDeletion"] is False
        assert self.POLICY["metadata"]["namespace"] == "team-a"

    def test_admits_the_cluster_its_submitters_and_the_named_namespaces_only(self) -> None:
        spec = self.POLICY["spec"]
        assert spec["podSelector"] == {"matchLabels": {"ray.io/cluster": "demo-ray"}}
        assert spec["policyTypes"] == ["Ingress"]
        own, clients = spec["ingress"]
        assert own == {"from": [{"podSelector": {"matchLabels": {"ray.io/cluster": "demo-ray"}}}]}
        assert {p["port"] for p in clients["ports"]} == {6379, 8265, 10001}
        submitters, namespaces = clients["from"]
        assert submitters == {"podSelector": {"matchLabels": {"rlhf.dev/ray-client": "demo-ray"}}}
        assert "podSelector" not in namespaces  # every pod of those namespaces, no other
        (expr,) = namespaces["namespaceSelector"]["matchExpressions"]
        assert expr == {
            "key": "kubernetes.io/metadata.name",
            "operator": "In",
            "values": ["ray-system", "rlhf"],
        }

    def test_submitters_of_the_cluster_pass_the_policy(self) -> None:
        rayjob = builders.build_stage_rayjob(job(), "sft", 1, "demo-ray", OWNER)
        labels = rayjob["spec"]["submitterPodTemplate"]["metadata"]["labels"]
        selector = self.POLICY["spec"]["ingress"][1]["from"][0]["podSelector"]["matchLabels"]
        assert selector.items() <= labels.items()


class TestPassThrough:
    @needs_kuberay_crds
    def test_validates_against_the_kuberay_crd(self) -> None:
        cluster = builders.build_raycluster(job(**PASS_THROUGH), "demo-ray", OWNER)
        assert errors("ray.io_rayclusters.yaml", cluster) == []
        rayjob = builders.build_stage_rayjob(job(**PASS_THROUGH), "sft", 1, "demo-ray", OWNER)
        assert errors("ray.io_rayjobs.yaml", rayjob) == []

    def test_env_and_pull_secrets_reach_head_and_workers_by_reference(self) -> None:
        cluster = builders.build_raycluster(job(**PASS_THROUGH), "demo-ray", OWNER)
        for pod in _pods(cluster):
            (container,) = pod["spec"]["containers"]
            env = {e["name"]: e for e in container["env"]}
            assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "INFO"}
            assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
            assert {"configMapRef": {"name": "nccl-tuning"}, "prefix": "X_"} in container["envFrom"]
            assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]

    def test_head_scheduling_is_the_heads_own(self) -> None:
        cluster = builders.build_raycluster(job(**PASS_THROUGH), "demo-ray", OWNER)
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
        worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert head["nodeSelector"] == {"pool": "cpu"}
        assert head["tolerations"] == [
            {"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}
        ]
        assert "nodeSelector" not in worker and "tolerations" not in worker

    def test_the_submitter_pulls_with_the_same_secrets_but_gets_no_env(self) -> None:
        rayjob = builders.build_stage_rayjob(job(**PASS_THROUGH), "sft", 1, "demo-ray", OWNER)
        pod = rayjob["spec"]["submitterPodTemplate"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert {e["name"] for e in pod["containers"][0]["env"]} == {
            "RAY_AUTH_MODE",
            "RAY_AUTH_TOKEN",
        }

    def test_never_in_the_entrypoint(self) -> None:
        """The stage's --job argument (visible in the RayJob and the Ray dashboard) carries
        neither the env (a literal value could be a credential) nor the Secret names."""
        rayjob = builders.build_stage_rayjob(job(**PASS_THROUGH), "sft", 1, "demo-ray", OWNER)
        entrypoint = rayjob["spec"]["entrypoint"]
        for text in ("NCCL_DEBUG", "HF_TOKEN", "regcred", "nccl-tuning"):
            assert text not in entrypoint
