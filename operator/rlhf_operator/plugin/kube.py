"""The plugin's I/O: reads from the Kubernetes API with the official client, as the user.

Objects come back as the API's own JSON (wire dicts, camelCase) so the pure modules read the
same shape as `kubectl get -o json`; that is why every call asks for the raw response
(`_preload_content=False`) instead of the client's model classes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from rlhf_operator import names
from rlhf_operator.api import GROUP, KIND, PLURAL, VERSION

Obj = dict[str, Any]

SUBMITTER_JOB_LABEL = "job-name"
"""Set by the Job controller on a Job's pods. KubeRay's submitter (K8sJobMode) is a batch Job
named after the RayJob, so its pod carries `job-name=<rayjob>`."""
SUBMITTER_CONTAINER = "ray-job-submitter"
"""KubeRay's default submitter container; it runs `ray job submit` and tails the driver log."""
IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class PluginError(Exception):
    """A failure the user can act on; printed as `error: <message>` with exit code 1."""


def connect(context: str | None = None, kubeconfig: str | None = None) -> tuple[Kube, str]:
    """A client from kubeconfig (`--kubeconfig`, $KUBECONFIG, ~/.kube/config) or in-cluster,
    and the namespace of the chosen context ("default" when it names none)."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or None
    try:
        api = config.new_client_from_config(config_file=path, context=context)
        contexts, active = config.list_kube_config_contexts(config_file=path)
    except config.ConfigException as exc:
        if context or kubeconfig:
            raise PluginError(f"cannot load kubeconfig: {exc}") from exc
        try:  # running inside a pod (e.g. a CI job): use its ServiceAccount
            config.load_incluster_config()
        except config.ConfigException:
            raise PluginError(
                f"no Kubernetes configuration: {exc}. Set KUBECONFIG or pass --kubeconfig."
            ) from exc
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() or "default"
        return Kube(client.ApiClient()), namespace
    chosen = next((c for c in contexts if c["name"] == context), active) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return Kube(api), namespace


class Kube:
    """The handful of reads the plugin needs."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    def list_jobs(self, namespace: str | None) -> list[Obj]:
        """RLHFJobs in `namespace` (every namespace when None), sorted by namespace and name."""
        if namespace is None:
            raw = self.custom.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, _preload_content=False
            )
        else:
            raw = self.custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, _preload_content=False
            )
        items = _json(raw).get("items") or []
        return sorted(
            items, key=lambda j: (j["metadata"].get("namespace", ""), j["metadata"]["name"])
        )

    def get_job(self, namespace: str, name: str) -> Obj:
        """One RLHFJob; a clear error when it does not exist."""
        try:
            raw = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False
            )
        except ApiException as exc:
            if exc.status == 404:
                raise PluginError(
                    f'rlhfjob "{name}" not found in namespace "{namespace}" '
                    "(kubectl rlhf list -A shows every job)"
                ) from exc
            raise
        return _json(raw)

    def cluster_pods(self, namespace: str, cluster: str) -> list[Obj]:
        """The head and worker pods of a RayCluster (KubeRay labels them `ray.io/cluster`)."""
        return self._pods(namespace, f"{names.LABEL_RAY_CLUSTER}={cluster}")

    def stage_rayjobs(self, namespace: str, job: str) -> list[Obj]:
        """Every RayJob (stage attempt) the operator created for `job`."""
        raw = self.custom.list_namespaced_custom_object(
            names.RAY_GROUP,
            names.RAY_VERSION,
            namespace,
            names.RAYJOBS,
            label_selector=f"{names.LABEL_JOB}={job}",
            _preload_content=False,
        )
        return _json(raw).get("items") or []

    def job_events(self, namespace: str, job: str) -> list[Obj]:
        """Events about the RLHFJob, oldest first."""
        raw = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind={KIND},involvedObject.name={job}",
            _preload_content=False,
        )
        items = _json(raw).get("items") or []
        return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")

    def submitter_pods(self, namespace: str, rayjob: str) -> list[Obj]:
        """KubeRay's submitter pods of `rayjob`, newest first."""
        pods = self._pods(namespace, f"{SUBMITTER_JOB_LABEL}={rayjob}")
        return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True)

    def stream_logs(
        self, namespace: str, pod: str, container: str | None, follow: bool, tail: int | None
    ) -> Iterator[bytes]:
        """The container's log as it arrives (until it ends, or forever with `follow`)."""
        kwargs: dict[str, Any] = {"follow": follow, "_preload_content": False}
        if container:
            kwargs["container"] = container
        if tail is not None:
            kwargs["tail_lines"] = tail
        response = self.core.read_namespaced_pod_log(pod, namespace, **kwargs)
        try:
            yield from response.stream(4096)
        finally:
            response.release_conn()

    def _pods(self, namespace: str, selector: str) -> list[Obj]:
        raw = self.core.list_namespaced_pod(
            namespace, label_selector=selector, _preload_content=False
        )
        return _json(raw).get("items") or []


def _json(response: Any) -> Obj:
    return json.loads(response.data)


def api_error(exc: ApiException) -> str:
    """The API server's own message from an ApiException (its Status body), else the reason."""
    try:
        return json.loads(exc.body or "{}").get("message") or str(exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)
