"""The operator's only Kubernetes API I/O (the official `kubernetes` client, synchronous).

kopf runs sync handlers in a thread pool, so these blocking calls never stall its event loop.
Every call is a small named function decorated with `@api_call(group, resource, verb)`: the
decorator records it in `API_CALLS`, from which `permissions()` derives the exact RBAC rules the
operator needs (the Helm chart's RBAC test reads it; tests/operator/test_kube.py proves each
function sends only the request it declares). `FRAMEWORK_PERMISSIONS` lists what kopf itself
does for us: watching, its annotations and finalizer, posting Events.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import kubernetes
from kubernetes.client.exceptions import ApiException

from rlhf_operator import names
from rlhf_operator.api import GROUP, PLURAL, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL

P = ParamSpec("P")
R = TypeVar("R")
A = TypeVar("A")  # a kubernetes.client API class

CORE = ""  # the core API group ("" in RBAC rules)
REQUEST_TIMEOUT = (5, 30)  # connect, read (seconds): a hung call must not pin a worker thread
POOL_SIZE = int(os.environ.get("RLHF_API_POOL_SIZE", "40"))  # >= every reconcile thread


@dataclass(frozen=True)
class ApiCall:
    """One kind of request: API group, resource (or resource/subresource) and RBAC verb."""

    group: str
    resource: str
    verb: str


API_CALLS: dict[str, ApiCall] = {}
"""Function name -> the request it makes; filled by `@api_call`."""

FRAMEWORK_PERMISSIONS: tuple[ApiCall, ...] = (
    # kopf watches the jobs and keeps its progress, diff-base and finalizer in metadata
    ApiCall(GROUP, PLURAL, "list"),
    ApiCall(GROUP, PLURAL, "watch"),
    ApiCall(GROUP, PLURAL, "patch"),
    # kopf indexes the children (the state machine reads them from memory, not by GET)
    ApiCall(names.RAY_GROUP, names.RAYCLUSTERS, "list"),
    ApiCall(names.RAY_GROUP, names.RAYCLUSTERS, "watch"),
    ApiCall(names.RAY_GROUP, names.RAYJOBS, "list"),
    ApiCall(names.RAY_GROUP, names.RAYJOBS, "watch"),
    # ... and the trainers' progress reports (mirrored into RLHFJob status)
    ApiCall(GROUP, PROGRESS_PLURAL, "list"),
    ApiCall(GROUP, PROGRESS_PLURAL, "watch"),
    # kopf posts the operator's Events (kopf.event)
    ApiCall(CORE, "events", "create"),
    # kopf's scanning: notices CRDs and namespaces that appear after it started
    ApiCall("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ApiCall("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ApiCall(CORE, "namespaces", "list"),
    ApiCall(CORE, "namespaces", "watch"),
)

ADMISSION_PERMISSIONS: tuple[ApiCall, ...] = (
    # No request, but an admission rule: OwnerReferencesPermissionEnforcement (OpenShift,
    # hardened clusters) lets a child name an owner with blockOwnerDeletion=true (every child
    # we make: builders.owner_reference) only for whoever may update that owner's finalizers.
    ApiCall(GROUP, f"{PLURAL}/finalizers", "update"),
)


def api_call(group: str, resource: str, verb: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Register a function as making exactly this kind of request."""

    def register(fn: Callable[P, R]) -> Callable[P, R]:
        API_CALLS[fn.__name__] = ApiCall(group, resource, verb)
        return fn

    return register


def permissions() -> dict[tuple[str, str], list[str]]:
    """(group, resource) -> sorted verbs: everything the operator does, framework and admission
    rules included."""
    rules: dict[tuple[str, str], set[str]] = {}
    for call in (*API_CALLS.values(), *FRAMEWORK_PERMISSIONS, *ADMISSION_PERMISSIONS):
        rules.setdefault((call.group, call.resource), set()).add(call.verb)
    return {key: sorted(verbs) for key, verbs in sorted(rules.items())}


# --------------------------------------------------------------------------- client


_client: kubernetes.client.ApiClient | None = None
_lock = threading.Lock()


def configure() -> None:
    """Load credentials: in-cluster inside a pod, else the current kubeconfig ($KUBECONFIG)."""
    global _client
    config = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        # $KUBECONFIG read now (the client library reads it once, at import)
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=config
        )
    # One connection per concurrent worker thread: urllib3 would otherwise discard and reopen.
    config.connection_pool_maxsize = POOL_SIZE
    with _lock:
        if _client is not None:
            _client.close()
        _client = kubernetes.client.ApiClient(config)
        _apis.clear()


def preload() -> None:
    """Import the API modules the operator calls. kubernetes.client imports each on first
    use, and one import (hundreds of validated methods) takes seconds: done before the first
    reconciles (kopf's startup; a standby's spare time), it keeps the worker threads of a
    burst from queueing on the import lock."""
    for kind in _API_KINDS:
        getattr(kubernetes.client, kind)


_API_KINDS = ("CustomObjectsApi", "CoreV1Api", "NetworkingV1Api", "CoordinationV1Api")
_apis: dict[type, Any] = {}
"""One client per API group on the operator's connection (stateless: shared by threads)."""


def _api(kind: type[A]) -> A:
    """An API group's client on the operator's connection (configure() first)."""
    api = _apis.get(kind)
    if api is not None:
        return api
    with _lock:
        if _client is None:
            raise RuntimeError("rlhf_operator.kube.configure() was not called")
        return _apis.setdefault(kind, kind(_client))


def _custom() -> kubernetes.client.CustomObjectsApi:
    return _api(kubernetes.client.CustomObjectsApi)


def _core() -> kubernetes.client.CoreV1Api:
    return _api(kubernetes.client.CoreV1Api)


def _items(response: Any) -> list[dict[str, Any]]:
    """A list's items as plain JSON (the typed models would drop nothing we read, but cost)."""
    return json.loads(response.data).get("items") or []


def _networking() -> kubernetes.client.NetworkingV1Api:
    return _api(kubernetes.client.NetworkingV1Api)


def _ignoring(status: int) -> Callable[[Callable[P, R]], Callable[P, R | None]]:
    """Turn one expected API status (404 on delete) into None."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R | None]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R | None:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == status:
                    return None
                raise

        return call

    return wrap


def _create(group: str, plural: str, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    namespace = manifest["metadata"]["namespace"]
    try:
        created = _custom().create_namespaced_custom_object(
            group, names.RAY_VERSION, namespace, plural, manifest, _request_timeout=REQUEST_TIMEOUT
        )
        return created, True
    except ApiException as exc:
        if exc.status != 409:
            raise
    return {}, False


def _delete(group: str, plural: str, namespace: str, name: str) -> None:
    _custom().delete_namespaced_custom_object(
        group,
        names.RAY_VERSION,
        namespace,
        plural,
        name,
        propagation_policy="Background",
        _request_timeout=REQUEST_TIMEOUT,
    )


# --------------------------------------------------------------------------- RayClusters


@api_call(names.RAY_GROUP, names.RAYCLUSTERS, "create")
def create_raycluster(manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create unless it exists: (the created object, True) or ({}, False) on 409."""
    return _create(names.RAY_GROUP, names.RAYCLUSTERS, manifest)


@api_call(names.RAY_GROUP, names.RAYCLUSTERS, "delete")
@_ignoring(404)
def delete_raycluster(namespace: str, name: str) -> None:
    _delete(names.RAY_GROUP, names.RAYCLUSTERS, namespace, name)


@api_call(names.RAY_GROUP, names.RAYCLUSTERS, "patch")
def patch_raycluster(namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge-patch of a RayCluster's metadata (warm-pool release and claim).

    A `metadata.resourceVersion` in the patch is a precondition: 409 when the cluster changed.
    """
    return _custom().patch_namespaced_custom_object(
        names.RAY_GROUP,
        names.RAY_VERSION,
        namespace,
        names.RAYCLUSTERS,
        name,
        patch,
        _request_timeout=REQUEST_TIMEOUT,
    )


@api_call(names.RAY_GROUP, names.RAYCLUSTERS, "delete")
def delete_raycluster_unchanged(namespace: str, name: str, resource_version: str) -> bool:
    """Delete a RayCluster only if it is still at `resource_version` (an expired pool cluster
    that nobody claimed meanwhile). False when it changed (409) or is gone (404)."""
    try:
        _custom().delete_namespaced_custom_object(
            names.RAY_GROUP,
            names.RAY_VERSION,
            namespace,
            names.RAYCLUSTERS,
            name,
            propagation_policy="Background",
            body=kubernetes.client.V1DeleteOptions(
                preconditions=kubernetes.client.V1Preconditions(resource_version=resource_version)
            ),
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status in (404, 409):
            return False
        raise
    return True


# --------------------------------------------------------------------------- NetworkPolicies


@api_call("networking.k8s.io", "networkpolicies", "create")
def create_network_policy(manifest: dict[str, Any]) -> bool:
    """Create unless it exists: True when created, False on 409."""
    try:
        _networking().create_namespaced_network_policy(
            manifest["metadata"]["namespace"],
            manifest,
            _preload_content=False,  # unread: a typed V1NetworkPolicy costs a millisecond
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False
    return True


# --------------------------------------------------------------------------- RayJobs


@api_call(names.RAY_GROUP, names.RAYJOBS, "create")
def create_rayjob(manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Create unless it exists: (the created object, True) or ({}, False) on 409."""
    return _create(names.RAY_GROUP, names.RAYJOBS, manifest)


@api_call(names.RAY_GROUP, names.RAYJOBS, "delete")
@_ignoring(404)
def delete_rayjob(namespace: str, name: str) -> None:
    _delete(names.RAY_GROUP, names.RAYJOBS, namespace, name)


# --------------------------------------------------------------------------- pods, Events

# Read only while a job waits for its cluster: the reason it is not ready is often only there.


@api_call(CORE, "pods", "list")
def list_cluster_pods(namespace: str, cluster: str) -> list[dict[str, Any]]:
    """The head and worker pods of a RayCluster (KubeRay labels them `ray.io/cluster`)."""
    return _items(
        _core().list_namespaced_pod(
            namespace,
            label_selector=f"{names.LABEL_RAY_CLUSTER}={cluster}",
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
    )


@api_call(CORE, "events", "list")
def list_pod_warnings(namespace: str, pod: str) -> list[dict[str, Any]]:
    """Warning Events about one pod (the scheduler's FailedScheduling, the kubelet's pulls)."""
    return _items(
        _core().list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod},type=Warning",
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
    )


# --------------------------------------------------------------------------- RLHFJobs


def _unchanged_since(resource_version: str | None) -> dict[str, Any]:
    """The merge-patch part that makes a write conditional: 409 if the object changed since."""
    return {"resourceVersion": resource_version} if resource_version else {}


@api_call(GROUP, PROGRESS_PLURAL, "create")
def create_progress(manifest: dict[str, Any]) -> bool:
    """Create a job's RLHFJobProgress unless it exists: True when created, False on 409."""
    try:
        _custom().create_namespaced_custom_object(
            GROUP,
            VERSION,
            manifest["metadata"]["namespace"],
            PROGRESS_PLURAL,
            manifest,
            _request_timeout=REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status != 409:
            raise
        return False
    return True


@api_call(GROUP, f"{PLURAL}/status", "patch")
def patch_job_status(
    namespace: str, name: str, patch: dict[str, Any], resource_version: str | None = None
) -> dict[str, Any]:
    """JSON merge-patch of the status subresource (only the fields that changed).

    `resource_version`: the version the patch was computed from; the API server then refuses
    the write (409) if the job changed since, instead of merging a diff onto another status.
    Returns the job as stored.
    """
    body: dict[str, Any] = {"status": patch}
    if resource_version:
        body["metadata"] = _unchanged_since(resource_version)
    return _custom().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, body, _request_timeout=REQUEST_TIMEOUT
    )


@api_call(GROUP, PLURAL, "patch")
def annotate_job(
    namespace: str, name: str, annotations: dict[str, str], resource_version: str | None = None
) -> dict[str, Any]:
    """Merge-patch annotations of an RLHFJob (the pinned spec); conditional as
    `patch_job_status`. Returns the job as stored."""
    metadata = {"annotations": annotations, **_unchanged_since(resource_version)}
    return _custom().patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        {"metadata": metadata},
        _request_timeout=REQUEST_TIMEOUT,
    )


@api_call(GROUP, PLURAL, "get")
@_ignoring(404)
def get_job(namespace: str, name: str) -> dict[str, Any]:
    """Read an RLHFJob as stored (None: gone). Only after a write of it met a conflict: the
    reconcile otherwise works on the copy kopf's watch keeps."""
    return _custom().get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT
    )


@api_call(GROUP, PLURAL, "delete")
@_ignoring(404)
def delete_job(namespace: str, name: str) -> None:
    """Delete an RLHFJob (ttlSecondsAfterFinished); its children go with it."""
    _custom().delete_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        propagation_policy="Background",
        _request_timeout=REQUEST_TIMEOUT,
    )


# --------------------------------------------------------------------------- leader election

LEASE_GROUP = "coordination.k8s.io"
LEASE_CALLS: dict[str, ApiCall] = {}
"""The Lease requests of leader election (leader.py). Kept apart from `API_CALLS`: the Lease
lives in the operator's own namespace, granted by its own Role (the chart's leader-election
Role), whatever namespaces the operator serves."""


def lease_call(verb: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    def register(fn: Callable[P, R]) -> Callable[P, R]:
        LEASE_CALLS[fn.__name__] = ApiCall(LEASE_GROUP, "leases", verb)
        return fn

    return register


def lease_permissions() -> dict[tuple[str, str], list[str]]:
    rules: dict[tuple[str, str], set[str]] = {}
    for call in LEASE_CALLS.values():
        rules.setdefault((call.group, call.resource), set()).add(call.verb)
    return {key: sorted(verbs) for key, verbs in sorted(rules.items())}


def _coordination() -> kubernetes.client.CoordinationV1Api:
    return _api(kubernetes.client.CoordinationV1Api)


LEASE_TIMEOUT = (2, 3)  # a renewal that hangs must not outlive the renew deadline


@lease_call("get")
@_ignoring(404)
def read_lease(namespace: str, name: str) -> dict[str, Any]:
    """The Lease as stored (None: there is none yet)."""
    lease = _coordination().read_namespaced_lease(name, namespace, _request_timeout=LEASE_TIMEOUT)
    return _coordination().api_client.sanitize_for_serialization(lease)


@lease_call("create")
def create_lease(namespace: str, lease: dict[str, Any]) -> dict[str, Any]:
    """Create the Lease (409: another replica created it first)."""
    created = _coordination().create_namespaced_lease(
        namespace, lease, _request_timeout=LEASE_TIMEOUT
    )
    return _coordination().api_client.sanitize_for_serialization(created)


@lease_call("patch")
def patch_lease(namespace: str, name: str, lease: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch the Lease; `lease` carries the resourceVersion it was read at, so a replica
    that decided on an old copy gets 409 instead of overwriting another's claim."""
    patched = _coordination().patch_namespaced_lease(
        name,
        namespace,
        lease,
        _content_type="application/merge-patch+json",
        _request_timeout=LEASE_TIMEOUT,
    )
    return _coordination().api_client.sanitize_for_serialization(patched)
