"""Pure builders: an RLHFJob in, the KubeRay manifests it needs out (dicts, no API calls).

`build_raycluster` makes the one RayCluster a job runs on; `build_stage_rayjob` makes the RayJob
of one attempt of one stage, pointed at that cluster with `clusterSelector`. Both are validated
against the real KubeRay CRD schemas in tests/unit/test_builders.py.

Security (docs/ARCHITECTURE.md §5): every pod meets the Kubernetes "restricted" Pod Security
profile (non-root, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp, only
emptyDir/PVC volumes). GPUs need no exception: the NVIDIA device plugin hands devices to an
unprivileged container through the `nvidia.com/gpu` resource. Secrets are referenced by name
(envFrom), never copied into a manifest.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from rlhf_operator import names
from rlhf_operator.api import API_VERSION, KIND, RLHFJob
from rlhf_operator.api.storage import PVC_MOUNT_ROOT, artifact_uri, pvc_claim

GPU_RESOURCE = "nvidia.com/gpu"
RAY_VERSION = "2.60.0"
"""Ray in the trainer image (trainer_image/Dockerfile's RAY_VERSION; a test keeps them equal).
KubeRay's token mode needs `spec.rayVersion` >= 2.52.0."""

AUTH_MODE_TOKEN = "token"
AUTH_TOKEN_KEY = "auth_token"
"""KubeRay (>= 1.5.1, `authOptions.mode: token`) makes a Secret named after the RayCluster with
the token under this key, and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container."""
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
GCS_PORT = 6379
CLIENT_PORT = 10001
TRAINER_SERVICE_ACCOUNT = "rlhf-trainer"
"""The chart's ServiceAccount for Ray pods when spec.cluster.serviceAccountName is empty."""

WORKER_GROUP = "workers"
HEAD_CONTAINER = "ray-head"
WORKER_CONTAINER = "ray-worker"
SUBMITTER_CONTAINER = "ray-job-submitter"
DASHBOARD_PORT = 8265
RAY_UID = 1000  # the `ray` user of rayproject/ray-based images (the trainer image builds on it)
RAY_GID = 100
SHM_VOLUME = "dshm"
SUBMITTER_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}


# --------------------------------------------------------------------------- shared pieces


def owner_reference(job_metadata: dict[str, Any]) -> dict[str, Any]:
    """The ownerReference that ties a child to its RLHFJob (garbage-collected with it)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job_metadata["name"],
        "uid": job_metadata["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_labels(job: RLHFJob) -> dict[str, str]:
    """Labels every child carries: whose it is and who manages it."""
    return {names.LABEL_JOB: job.metadata.name, names.LABEL_MANAGED_BY: names.MANAGED_BY}


def dashboard_url(cluster: str, namespace: str | None) -> str:
    """The Ray dashboard inside the cluster (KubeRay's head Service is `<cluster>-head-svc`)."""
    return f"http://{cluster}-head-svc.{namespace or 'default'}.svc:{DASHBOARD_PORT}"


def _pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RAY_UID,
        "runAsGroup": RAY_GID,
        "fsGroup": RAY_GID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _claims(job: RLHFJob) -> list[str]:
    """Every PersistentVolumeClaim a pvc:// URI of the spec names (storage first, then inputs)."""
    spec = job.spec
    uris = [
        spec.storage.uri,
        spec.model.base,
        spec.model.tokenizer,
        spec.stages.reward.model,
        *(
            (spec.stages.evaluation.judge.model, spec.stages.evaluation.judge.lexicon)
            if spec.stages.evaluation.judge
            else ()
        ),
        *(
            dataset.uri
            for dataset in (
                spec.stages.sft.dataset,
                spec.stages.reward.dataset,
                spec.stages.dpo.dataset if spec.stages.dpo else None,
                spec.stages.ppo.prompts,
                spec.stages.evaluation.prompts,
            )
            if dataset is not None
        ),
    ]
    claims: list[str] = []
    for uri in uris:
        claim = pvc_claim(uri) if uri else None
        if claim and claim not in claims:
            claims.append(claim)
    return claims


def _volumes(job: RLHFJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Pod volumes and container mounts: /dev/shm (Ray's object store and NCCL use it) + PVCs."""
    # emptyDir in memory, bounded by the container's memory limit: Docker's default 64 MiB
    # /dev/shm makes NCCL and Ray's plasma store fail on the first large tensor.
    volumes: list[dict[str, Any]] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    storage_claim = pvc_claim(job.spec.storage.uri)
    for index, claim in enumerate(_claims(job)):
        volume = f"pvc-{index}"
        read_only = claim != storage_claim  # inputs are only read; storage is written
        volumes.append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
        )
        mounts.append(
            {"name": volume, "mountPath": f"{PVC_MOUNT_ROOT}/{claim}", "readOnly": read_only}
        )
    return volumes, mounts


def job_env(job: RLHFJob) -> dict[str, str]:
    """The job's identity for the trainer (docs/CONTRACTS.md §2), passed per RayJob in its runtime
    env, never baked into the RayCluster: a warm-pool cluster serves many jobs in turn."""
    return {
        "RLHF_JOB_NAME": job.metadata.name,
        "RLHF_JOB_NAMESPACE": job.metadata.namespace or "default",
    }


def _env(job: RLHFJob) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Container env and envFrom of the Ray pods: storage endpoint, storage Secret by name, and
    the user's spec.cluster.env/envFrom (Secrets and ConfigMaps by name, never their values).

    Only what the warm-pool signature covers (rlhf_operator.warmpool): nothing job-specific.
    """
    env: list[dict[str, Any]] = []
    storage = job.spec.storage
    cluster = job.spec.cluster
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    env += [var.to_wire() for var in cluster.env]
    env_from = [{"secretRef": {"name": storage.secret_ref.name}}] if storage.secret_ref else []
    env_from += [source.to_wire() for source in cluster.env_from]
    return env, env_from


def _image_pull_secrets(job: RLHFJob) -> list[dict[str, str]]:
    return [ref.to_wire() for ref in job.spec.cluster.image_pull_secrets]


def _resources(requests: dict[str, Any], limits: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def _pod_template(
    job: RLHFJob, container: dict[str, Any], labels: dict[str, str], **pod: Any
) -> dict[str, Any]:
    volumes, mounts = _volumes(job)
    env, env_from = _env(job)
    cluster = job.spec.cluster
    full_container = {
        "image": cluster.image,
        "imagePullPolicy": cluster.image_pull_policy,
        **({"env": env} if env else {}),
        **({"envFrom": env_from} if env_from else {}),
        "volumeMounts": mounts,
        "securityContext": _container_security_context(),
        **container,
    }
    return {
        "metadata": {"labels": labels},
        "spec": {
            "serviceAccountName": cluster.service_account_name or TRAINER_SERVICE_ACCOUNT,
            **(
                {"priorityClassName": priority} if (priority := cluster.priority_class_name) else {}
            ),
            "securityContext": _pod_security_context(),
            "containers": [full_container],
            "volumes": volumes,
            **{k: v for k, v in pod.items() if v},
            **({"imagePullSecrets": pulls} if (pulls := _image_pull_secrets(job)) else {}),
        },
    }


# --------------------------------------------------------------------------- RayCluster


def build_raycluster(job: RLHFJob, name: str, owner: dict[str, Any]) -> dict[str, Any]:
    """The job's RayCluster: a CPU-only head and one worker group `workers` of fixed size."""
    cluster = job.spec.cluster
    workers = cluster.workers
    labels = child_labels(job)
    # The pods carry no job label: a warm-pool cluster outlives its first job (KubeRay's
    # ray.io/cluster label finds them).
    pod_labels = {names.LABEL_MANAGED_BY: names.MANAGED_BY}
    head_resources = cluster.head.resources
    worker_requests = dict(workers.resources.requests)
    worker_limits = dict(workers.resources.limits)
    if workers.gpus_per_worker:
        # GPUs are whole devices: request == limit, as the device plugin requires.
        worker_requests[GPU_RESOURCE] = worker_limits[GPU_RESOURCE] = workers.gpus_per_worker

    head = _pod_template(
        job,
        {
            "name": HEAD_CONTAINER,
            "resources": _resources(head_resources.requests, head_resources.limits),
            "ports": [
                # protocol spelt out: the API server would default it, and the warm pool
                # checks that a cluster's stored spec still hashes to what was built.
                {"name": "gcs-server", "containerPort": GCS_PORT, "protocol": "TCP"},
                {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
                {"name": "client", "containerPort": CLIENT_PORT, "protocol": "TCP"},
            ],
        },
        pod_labels,
        nodeSelector=dict(cluster.head.node_selector),
        tolerations=[t.to_wire() for t in cluster.head.tolerations],
    )
    worker = _pod_template(
        job,
        {"name": WORKER_CONTAINER, "resources": _resources(worker_requests, worker_limits)},
        pod_labels,
        nodeSelector=dict(workers.node_selector),
        tolerations=[t.to_wire() for t in workers.tolerations],
        affinity=workers.affinity,
    )
    if cluster.queue_name:
        # Kueue admits the RayCluster as one gang: its webhook suspends it on creation
        # (spec.suspend) until the LocalQueue's ClusterQueue has quota for all its pods.
        labels = {**labels, names.LABEL_KUEUE_QUEUE: cluster.queue_name}
    return {
        "apiVersion": names.RAY_API_VERSION,
        "kind": names.RAYCLUSTER_KIND,
        "metadata": {
            "name": name,
            "namespace": job.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "rayVersion": RAY_VERSION,
            # Ray's dashboard, client and GCS ports take any caller by default; KubeRay >= 1.5.1
            # makes a per-cluster token Secret and hands it to every Ray container (an older
            # KubeRay's CRD prunes this field: reconcile/cluster.py then fails the job).
            "authOptions": {"mode": AUTH_MODE_TOKEN},
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                # The head schedules and runs stage drivers, never training: no GPU and no
                # CPU for Ray tasks, so a CPU-only training worker never lands on it.
                "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0", "num-gpus": "0"},
                "template": head,
            },
            "workerGroupSpecs": [
                {
                    "groupName": WORKER_GROUP,
                    "replicas": workers.replicas,
                    "minReplicas": workers.replicas,
                    "maxReplicas": workers.replicas,
                    "rayStartParams": {},  # KubeRay derives num-cpus/num-gpus from resources
                    "template": worker,
                }
            ],
        },
    }


# --------------------------------------------------------------------------- RayJob


def job_json(job: RLHFJob) -> str:
    """The RLHFJob as the trainer's `--job` argument (docs/CONTRACTS.md §1): no status, compact."""
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        # The pods' env and pull Secrets are the cluster's business, not the trainer's: kept out
        # of the entrypoint (a literal value would show in the RayJob and the Ray dashboard).
        "spec": job.spec.model_dump(
            mode="json",
            by_alias=True,
            exclude_none=True,
            exclude={"cluster": {"env", "env_from", "image_pull_secrets"}},
        ),
    }
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True)


def stage_entrypoint(job: RLHFJob, stage: str, attempt: int) -> str:
    """`python -m rlhf_trainer stage <stage> --job '<json>' --attempt N [--resume-from URI]`."""
    args = ["python", "-m", "rlhf_trainer", "stage", stage, "--job", job_json(job)]
    args += ["--attempt", str(attempt)]
    if attempt >= 2:
        checkpoints = f"{artifact_uri(job.spec.storage.uri, job.metadata.name, stage)}/checkpoints"
        args += ["--resume-from", checkpoints]
    return shlex.join(args)


def _submitter_template(job: RLHFJob, labels: dict[str, str], cluster_name: str) -> dict[str, Any]:
    """The pod that runs `ray job submit` (KubeRay fills in its command and dashboard address).

    It needs no storage and no API access, so it gets none; its one Secret is the cluster's Ray
    token (by reference: KubeRay's Secret `<cluster>`, key auth_token), which `ray job submit`
    reads from RAY_AUTH_TOKEN. KubeRay sets the same variables on submitters it knows need
    them and leaves ones already set alone. The `rlhf.dev/ray-client` label lets it through
    the cluster's NetworkPolicy to the dashboard.
    """
    cluster = job.spec.cluster
    token = {"secretKeyRef": {"name": cluster_name, "key": AUTH_TOKEN_KEY}}
    return {
        "metadata": {"labels": {**labels, names.LABEL_RAY_CLIENT: cluster_name}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": _pod_security_context(),
            "containers": [
                {
                    "name": SUBMITTER_CONTAINER,
                    "image": cluster.image,
                    "imagePullPolicy": cluster.image_pull_policy,
                    "env": [
                        {"name": RAY_AUTH_MODE_ENV, "value": AUTH_MODE_TOKEN},
                        {"name": RAY_AUTH_TOKEN_ENV, "valueFrom": token},
                    ],
                    "resources": SUBMITTER_RESOURCES,
                    "securityContext": _container_security_context(),
                }
            ],
            **({"imagePullSecrets": pulls} if (pulls := _image_pull_secrets(job)) else {}),
        },
    }


def build_stage_rayjob(
    job: RLHFJob, stage: str, attempt: int, cluster_name: str, owner: dict[str, Any]
) -> dict[str, Any]:
    """The RayJob of attempt `attempt` of `stage`, submitted to the job's running cluster.

    No `backoffLimit` (KubeRay rejects retries for clusterSelector RayJobs: retries are the
    operator's, each a new RayJob), no `suspend` (not allowed with clusterSelector either), and
    `shutdownAfterJobFinishes: false`: the cluster is the job's, kept warm for the next stage.
    """
    labels = {
        **child_labels(job),
        names.LABEL_STAGE: stage,
        names.LABEL_ATTEMPT: str(attempt),
    }
    return {
        "apiVersion": names.RAY_API_VERSION,
        "kind": names.RAYJOB_KIND,
        "metadata": {
            "name": names.rayjob_name(job.metadata.name, stage, attempt),
            "namespace": job.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner],
        },
        "spec": {
            "clusterSelector": {names.LABEL_RAY_CLUSTER: cluster_name},
            "entrypoint": stage_entrypoint(job, stage, attempt),
            # JSON is YAML: the job's identity reaches the driver and every Ray worker of it.
            "runtimeEnvYAML": json.dumps({"env_vars": job_env(job)}, sort_keys=True),
            "shutdownAfterJobFinishes": False,
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": _submitter_template(job, labels, cluster_name),
        },
    }


# --------------------------------------------------------------------------- NetworkPolicy


def cluster_owner_reference(cluster_name: str, cluster_uid: str) -> dict[str, Any]:
    """A RayCluster as owner: its NetworkPolicy goes when the cluster goes (also a warm-pool
    cluster that outlives its job). Not blocking: the operator may not update RayCluster
    finalizers (OwnerReferencesPermissionEnforcement), and needs not."""
    return {
        "apiVersion": names.RAY_API_VERSION,
        "kind": names.RAYCLUSTER_KIND,
        "name": cluster_name,
        "uid": cluster_uid,
        "controller": False,
        "blockOwnerDeletion": False,
    }


def build_network_policy(
    cluster_name: str, namespace: str | None, cluster_uid: str, client_namespaces: list[str]
) -> dict[str, Any]:
    """Ingress to the Ray pods of one cluster: from its own pods on any port (Ray's object
    manager and workers talk on many), and on the GCS, dashboard and client ports only from
    the stage submitters of this cluster (label `rlhf.dev/ray-client: <cluster>`) and from
    `client_namespaces` (KubeRay's, which polls the dashboard, and the operator's).

    Labels are the only selector a NetworkPolicy has, and anyone who may create pods in the
    namespace may set them: the Ray token (authOptions) is what authenticates; this policy
    keeps every other namespace off the ports, and is a second wall if the token leaks.
    """
    cluster_pods = {"matchLabels": {names.LABEL_RAY_CLUSTER: cluster_name}}
    clients: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {names.LABEL_RAY_CLIENT: cluster_name}}}
    ]
    if client_namespaces:
        clients.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {
                            "key": names.LABEL_NAMESPACE_NAME,
                            "operator": "In",
                            "values": sorted(set(client_namespaces)),
                        }
                    ]
                }
            }
        )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": names.network_policy_name(cluster_name),
            "namespace": namespace,
            "labels": {
                names.LABEL_MANAGED_BY: names.MANAGED_BY,
                names.LABEL_RAY_CLUSTER: cluster_name,
            },
            "ownerReferences": [cluster_owner_reference(cluster_name, cluster_uid)],
        },
        "spec": {
            "podSelector": cluster_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": cluster_pods}]},
                {
                    "from": clients,
                    "ports": [
                        {"protocol": "TCP", "port": port}
                        for port in (GCS_PORT, DASHBOARD_PORT, CLIENT_PORT)
                    ],
                },
            ],
        },
    }
