"""A Kubernetes to run the real operator against: KMock's emulator, a simulated KubeRay, a runner.

Reusable by every operator-level test and benchmark (warm pools, observability, scale):

- `RLHFEmulator`: `emulator.Emulator` (KMock + resourceVersions/uid/preconditions) plus the
  API-server semantics the operator's correctness depends on, added exactly:
    * `metadata.generation`: 1 at create, +1 when a write changes `spec` (observedGeneration and
      "spec changed after start" are read from it);
    * the status subresource: a write to `/status` changes only `.status`; a write to the object
      ignores `.status`; a create drops `.status` (so an operator that wrote status the wrong way
      would fail the tests, as it would fail on a real cluster);
    * the CRD's transition rules (`x-kubernetes-validations: self == oldSelf`, read from the
      CRD the operator generates): a write that changes an immutable field of an RLHFJob
      (spec.model, spec.storage, spec.parallelism) is refused with 422 and the rule's message,
      as the API server refuses it;
    * `labelSelector` / `fieldSelector` (equality terms) on lists, which the operator's own
      reads (a cluster's pods, their Events) rely on.
  Not emulated (tests do not depend on it): schema validation and defaulting.
- `GarbageCollector`: ownerReference garbage collection, late as the real one.
- `SimulatedKubeRay`: KubeRay's controllers over HTTP, as faithful as the operator needs: pods
  and conditions of clusters that get ready or never do (and why), RayJob validation, its
  finalizer (a deleted RayJob lingers until KubeRay stopped its Ray job), statuses walked from
  a scripted `Plan` (SubmissionFailed while the Ray job runs included), and the Ray jobs that
  run on each cluster.
- `OperatorRunner`: the real kopf operator (`rlhf_operator.handlers`) in this event loop, with
  start/stop to simulate operator restarts.
- `write_kubeconfig`: a kubeconfig pointing at the emulator, for kopf and `kubernetes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
import logging
import os
import random
import string
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import aiohttp.web
import attrs
import kmock
import yaml
from emulator import Emulator, InvalidError
from kmock._internal import rendering
from rlhf_operator import names
from rlhf_operator.api import GROUP, KIND, PLURAL, VERSION
from rlhf_operator.api.progress import PROGRESS_PLURAL
from rlhf_operator.crd import build_crd

JOBS = f"{GROUP}/{VERSION}/{PLURAL}"
RAYCLUSTERS = f"{names.RAY_API_VERSION}/{names.RAYCLUSTERS}"
RAYJOBS = f"{names.RAY_API_VERSION}/{names.RAYJOBS}"
EVENTS = "v1/events"
PODS = "v1/pods"
PROGRESSES = f"{GROUP}/{VERSION}/{PROGRESS_PLURAL}"  # the trainers' reports (api/progress.py)
ALL_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}

# --------------------------------------------------------------------------- the API server


def _merge(base: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch (what the API server does with merge-patch+json)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


@attrs.define(kw_only=True)
class RLHFEmulator(Emulator):
    """`Emulator` + metadata.generation + a real status subresource (see the module docstring).

    `request_history`: keep only the latest N requests. KMock matches every request against
    every request recorded so far (`request in payload`), which is quadratic over a long run; a
    benchmark bounds it (tests keep everything, to assert on requests).
    """

    request_history: int | None = None
    _in_flight: set[int] = attrs.field(factory=set, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        declare_resources(self)

    def _has_status(self, resource: Any) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if self.request_history is None:
            return await self._handle_semantics(request)
        self._in_flight.add(id(request))
        try:
            self._forget_requests(self.request_history)
            return await self._handle_semantics(request)
        finally:
            self._in_flight.discard(id(request))

    async def _handle_semantics(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.get("metadata") or {}
            if not meta.get("name") and meta.get("generateName"):  # e.g. kopf's Events
                data = {**data, "metadata": {**meta, "name": meta["generateName"] + _suffix()}}
                object.__setattr__(request, "data", data)
        if (
            request.resource is not None
            and self._has_status(request.resource)
            and isinstance(data, dict)
        ):
            if request.action == kmock.action.CREATE:
                meta = {**(data.get("metadata") or {}), "generation": 1}
                data = {**{k: v for k, v in data.items() if k != "status"}, "metadata": meta}
            elif request.action == kmock.action.UPDATE and request.subresource == "status":
                meta = data.get("metadata") or {}
                version = {"resourceVersion": meta["resourceVersion"]} if meta else {}
                data = {"status": data.get("status"), **({"metadata": version} if version else {})}
            elif request.action == kmock.action.UPDATE:
                data = {k: v for k, v in data.items() if k != "status"}
                self._check_transition_rules(request, data)
                data = self._bump_generation(request, data)
            object.__setattr__(request, "data", data)  # Request is frozen; KMock keys on identity
        return await super()._handle(request)

    def _check_transition_rules(self, request: rendering.Request, data: dict[str, Any]) -> None:
        """422 when a write changes a field whose CRD rule is `self == oldSelf`."""
        key = (request.resource, request.namespace, request.name)
        if request.resource != kmock.resource(JOBS) or "spec" not in data:
            return
        if key not in self.objects or self.objects[key].deleted:
            return
        old = self.objects[key].raw
        new = _merge(old, data)
        for path, message, schema in IMMUTABLE_FIELDS:
            # the API server compares the objects as stored, i.e. with the CRD's defaults
            before = _defaulted(copy.deepcopy(_at(old, path)), schema)
            after = _defaulted(copy.deepcopy(_at(new, path)), schema)
            if before is not None and after is not None and before != after:
                field = ".".join(path)
                raise InvalidError(
                    message=f'{KIND}.{GROUP} "{request.name}" is invalid: {field}: Invalid '
                    f'value: "object": {message}',
                )

    async def _serve_list(self, request: rendering.Request) -> Any:
        listing = await super()._serve_list(request)
        labels = _parse_selector(request.params.get("labelSelector", ""))
        fields = _parse_selector(request.params.get("fieldSelector", ""))
        listing["items"] = [
            item
            for item in listing["items"]
            if _selected(labels, lambda key, item=item: _label(item, key))
            and _selected(fields, lambda key, item=item: _at(item, tuple(key.split("."))))
        ]
        return listing

    def _forget_requests(self, keep: int) -> None:
        """Drop old finished requests (requests in flight must stay: KMock matches them)."""
        if len(self._requests) > 2 * keep + len(self._in_flight):  # amortised: in batches
            recent = self._requests[-keep:]
            kept = {id(r) for r in recent}
            older = [r for r in self._requests[:-keep] if id(r) in self._in_flight]
            self._requests[:] = [*(r for r in older if id(r) not in kept), *recent]
            for payload in self._payloads:
                del payload._requests[:-keep]

    def _bump_generation(self, request: rendering.Request, data: dict[str, Any]) -> dict[str, Any]:
        key = (request.resource, request.namespace, request.name)
        if "spec" not in data or key not in self.objects or self.objects[key].deleted:
            return data
        current = self.objects[key].raw
        if _merge(current.get("spec"), data["spec"]) == current.get("spec"):
            return data
        generation = (current.get("metadata") or {}).get("generation", 1) + 1
        return {**data, "metadata": {**(data.get("metadata") or {}), "generation": generation}}

    # ---- conveniences for tests (they read the stored state, as `kubectl get` would)

    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every existing object of `resource` ("ray.io/v1/rayclusters"), oldest first."""
        wanted = kmock.resource(resource)
        return [
            obj.raw
            for (res, ns, _), obj in list(self.objects.items())
            if res == wanted and not obj.deleted and namespace in (None, ns)
        ]

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        key = (kmock.resource(resource), namespace, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def events_for(self, name: str) -> list[dict[str, Any]]:
        """Events whose involvedObject is the named RLHFJob, in posting order."""
        return [
            e
            for e in self.live(EVENTS)
            if (e.get("involvedObject") or {}).get("name") == name
            and (e.get("involvedObject") or {}).get("kind") == KIND
        ]

    def reasons_for(self, name: str) -> list[str]:
        return [e.get("reason") for e in self.events_for(name)]


def _transition_rules(schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> list:
    """(path, message, schema) of every `self == oldSelf` rule in a CRD's structural schema."""
    rules = [
        (path, rule["message"], schema)
        for rule in schema.get("x-kubernetes-validations") or []
        if rule.get("rule") == "self == oldSelf"
    ]
    for name, child in (schema.get("properties") or {}).items():
        rules += _transition_rules(child, (*path, name))
    return rules


def _defaulted(value: Any, schema: Mapping[str, Any]) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores an object."""
    if value is None and "default" in schema:
        value = copy.deepcopy(schema["default"])
    if isinstance(value, dict):
        for name, child in (schema.get("properties") or {}).items():
            filled = _defaulted(value.get(name), child)
            if filled is not None:
                value[name] = filled
    return value


IMMUTABLE_FIELDS: list[tuple[tuple[str, ...], str, Mapping[str, Any]]] = _transition_rules(
    build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
)


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _parse_selector(text: str) -> list[tuple[str, str, str | None]]:
    """Equality selector terms (`k=v`, `k==v`, `k!=v`, bare `k`), as the API server reads them."""
    terms: list[tuple[str, str, str | None]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        for op in ("!=", "==", "="):
            if op in term:
                key, value = term.split(op, 1)
                terms.append((key.strip(), op, value.strip()))
                break
        else:
            terms.append((term, "exists", None))
    return terms


def _selected(terms: list[tuple[str, str, str | None]], get: Callable[[str], Any]) -> bool:
    for key, op, value in terms:
        have = get(key)
        have = None if have is None else str(have)
        if (op == "exists" and have is None) or (op == "!=" and have == value):
            return False
        if op in ("=", "==") and have != value:
            return False
    return True


def _label(obj: Mapping[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def _suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def declare_resources(api: kmock.KubernetesEmulator) -> None:
    """API discovery for everything the operator touches (kopf discovers before it watches)."""
    info = kmock.ResourceInfo
    api.resources[JOBS] = info(
        kind=KIND, namespaced=True, verbs=ALL_VERBS, subresources={"status"}, shortnames={"rlhf"}
    )
    for resource, kind in ((RAYCLUSTERS, "RayCluster"), (RAYJOBS, "RayJob")):
        api.resources[resource] = info(
            kind=kind, namespaced=True, verbs=ALL_VERBS, subresources={"status"}
        )
    api.resources[PROGRESSES] = info(
        kind="RLHFJobProgress", namespaced=True, verbs=ALL_VERBS, subresources={"status"}
    )
    api.resources[EVENTS] = info(kind="Event", namespaced=True, verbs=ALL_VERBS)
    api.resources[PODS] = info(
        kind="Pod", namespaced=True, verbs=ALL_VERBS, subresources={"status"}
    )
    api.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=ALL_VERBS)
    api.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=ALL_VERBS
    )


def write_kubeconfig(url: str, path: Path) -> Path:
    """A kubeconfig for `url` with no credentials (the emulator asks for none)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": "tester", "user": {"token": "emulator"}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------- KubeRay, simulated

Plan = list[dict[str, Any]]
"""RayJob statuses to walk through, one per tick once the cluster is ready; the last one stays.
A step whose jobDeploymentStatus is terminal (Complete, Failed) is the last KubeRay writes: it
never updates a finished RayJob again, whatever its Ray job does afterwards."""

SUCCEED: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
]


def app_failed(exit_code: int, log_tail: str) -> Plan:
    """The Ray job's entrypoint exited `exit_code`: KubeRay mirrors the message Ray's job
    supervisor writes, whose log tail ends with the driver's last stderr lines."""
    return [
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {
            "jobDeploymentStatus": "Failed",
            "jobStatus": "FAILED",
            "reason": "AppFailed",
            "message": f"Job entrypoint command failed with exit code {exit_code}, last "
            f"available logs (truncated to 20,000 chars):\n{log_tail}",
        },
    ]


FAIL = app_failed(
    1,
    "torch.OutOfMemoryError: CUDA out of memory\n"
    "error: sft failed: OutOfMemoryError: CUDA out of memory",
)
# The trainer's exit 2 (bad input, CONTRACTS §6): its last line names the field.
BAD_INPUT = app_failed(
    2,
    "INFO loading s3://bucket/reviews.jsonl\n"
    "error: spec.stages.sft.dataset.promptField: column 'prompt' is not in the dataset "
    "(columns: text); set promptField to one of them.",
)
HANG: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
]
SUBMITTER_GAVE_UP: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    # rayjob_controller.go (checkSubmitterAndUpdateStatusIfNeeded): the submitter Job hit its
    # backoffLimit (e.g. its pod was evicted) while the Ray job still runs. The RayJob is Failed
    # and never updated again; its jobStatus stays RUNNING, and so does the driver on the cluster.
    {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "RUNNING",
        "reason": "SubmissionFailed",
        "message": "Job submission has failed. Reason: BackoffLimitExceeded. Message: Job has "
        "reached the specified backoff limit",
    },
]

RAY_JOB_TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})  # rayv1.IsJobTerminal
DEPLOYMENT_TERMINAL = frozenset({"Complete", "Failed", "ValidationFailed"})
RAYJOB_FINALIZER = "ray.io/rayjob-finalizer"  # KubeRay's utils.RayJobStopJobFinalizer


def always(plan: Plan) -> Callable[[Mapping[str, Any]], Plan]:
    return lambda rayjob: plan


def stage_of(rayjob: Mapping[str, Any]) -> tuple[str, int]:
    labels = rayjob["metadata"].get("labels") or {}
    return labels.get(names.LABEL_STAGE, ""), int(labels.get(names.LABEL_ATTEMPT, "0"))


def kuberay_validation(rayjob: Mapping[str, Any]) -> str | None:
    """KubeRay's own checks of a RayJob (utils.ValidateRayJobMetadata / ValidateRayJobSpec, the
    ones a clusterSelector RayJob can meet), with its messages; None when it passes."""
    name, spec = rayjob["metadata"]["name"], rayjob.get("spec") or {}
    if len(name) > names.KUBERAY_MAX_RAYJOB_NAME:
        return (
            "The RayJob metadata is invalid: RayJob name should be no more than "
            f"{names.KUBERAY_MAX_RAYJOB_NAME} characters"
        )
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        return (
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false "
            "is not allowed to be suspended"
        )
    if not spec.get("shutdownAfterJobFinishes") and (spec.get("ttlSecondsAfterFinished") or 0) > 0:
        return (
            "The RayJob spec is invalid: a RayJob with shutdownAfterJobFinishes set to false "
            "cannot have TTLSecondsAfterFinished"
        )
    if spec.get("suspend") and spec.get("clusterSelector"):
        return (
            "The RayJob spec is invalid: the ClusterSelector mode doesn't support the suspend "
            "operation"
        )
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        return "The RayJob spec is invalid: one of RayClusterSpec or ClusterSelector must be set"
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML") or "")
    except yaml.YAMLError as exc:
        return f"failed to unmarshal RuntimeEnvYAML: {exc}"
    if (spec.get("backoffLimit") or 0) < 0:
        return "The RayJob spec is invalid: backoffLimit must be a positive integer"
    return None


class TickingController:
    """A controller stand-in: `step()` every `tick` seconds in a background task while the
    `async with` block runs; a failing step is logged and the loop goes on, as a real
    controller's would."""

    tick: float
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as exc:  # the test sees the log
                logging.getLogger(__name__).exception("%s: %s", type(self).__name__, exc)
            await asyncio.sleep(self.tick)

    async def step(self) -> None:
        raise NotImplementedError


class GarbageCollector(TickingController):
    """Kubernetes' garbage collector, late as the real one: an object whose every owner (by
    ownerReference uid) is gone is deleted `delay` seconds after the collector noticed, with
    its own finalizers honoured (a RayJob then waits for KubeRay). Until then an RLHFJob
    re-applied under the same name finds its predecessor's children at its own names."""

    def __init__(self, api: RLHFEmulator, *, delay: float = 1.0, tick: float = 0.1) -> None:
        self.api, self.delay, self.tick = api, delay, tick
        self.paused = False  # a test holds the collector (it may lag for minutes on a real one)
        self._orphaned: dict[str, float] = {}  # uid -> when its owners were found gone

    async def step(self) -> None:
        if self.paused:
            return
        live = [obj for _, obj in self._objects()]
        uids = {obj["metadata"].get("uid") for obj in live}
        now = time.monotonic()
        for resource, obj in self._objects():
            meta = obj["metadata"]
            owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
            if not owners or any(uid in uids for uid in owners) or meta.get("deletionTimestamp"):
                self._orphaned.pop(meta.get("uid"), None)
                continue
            since = self._orphaned.setdefault(meta["uid"], now)
            if now - since >= self.delay:
                await _delete(self.api, resource, meta)

    def _objects(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            ("/".join(p for p in (res.group, res.version, res.plural) if p), obj.raw)
            for (res, _, _), obj in list(self.api.objects.items())
            if not obj.deleted and "uid" in (obj.raw.get("metadata") or {})
        ]


@dataclass
class Provisioning:
    """Why a RayCluster's pods do not come up (`SimulatedKubeRay.provisioning`), as Kubernetes
    and KubeRay report it: pod phase and conditions, container states, Warning Events from
    the scheduler or the kubelet, and KubeRay's RayCluster conditions."""

    workers_unschedulable: str | None = None  # the scheduler's FailedScheduling message
    image_pull: str | None = None  # the kubelet's "Failed to pull image" message (every pod)
    head_forbidden: str | None = None  # the API server's refusal of the head pod


NO_GPUS = Provisioning(
    workers_unschedulable="0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: "
    "0/3 nodes are available: 3 No preemption victims found for incoming pod.",
)


def image_not_found(image: str) -> Provisioning:
    return Provisioning(
        image_pull=f'Failed to pull image "{image}": rpc error: code = NotFound desc = failed to '
        f'pull and unpack image "{image}": not found',
    )


def missing_service_account(namespace: str, account: str) -> Provisioning:
    return Provisioning(
        head_forbidden=f"error looking up service account {namespace}/{account}: serviceaccount "
        f'"{account}" not found',
    )


@dataclass
class RayJobRun:
    """One Ray job (driver) on a cluster, as the head's job API knows it."""

    cluster: tuple[str, str]
    status: str = "RUNNING"


class SimulatedKubeRay(TickingController):
    """KubeRay over the emulator's HTTP API, as rayjob_controller.go / raycluster_controller.go
    behave (ray-project/kuberay v1.x):

    - RayCluster: creates the head and worker pods (owned by the cluster, so the garbage
      collector removes them late after it), and marks the cluster ready `ready_after` ticks
      later, unless `provisioning(cluster)` names a reason it never gets ready: then the pods
      stay Pending or waiting with the scheduler's or kubelet's Warning Events, and the cluster
      has `state` unset and the conditions KubeRay sets (HeadPodReady from the head pod's Ready
      condition, RayClusterProvisioned False, ReplicaFailure when a pod cannot be created).
    - RayJob: first KubeRay's validation (a failure is `ValidationFailed`, terminal; also
      `reject(rayjob)`, a rule of the installed KubeRay this simulation does not model), then
      its finalizer `ray.io/rayjob-finalizer`; it waits in Initializing for its selected
      cluster, then walks `plan(rayjob)` one status per tick. The Ray job itself (`runs`) starts
      with jobStatus RUNNING and ends at a terminal jobStatus, or when it is stopped.
    - Deleting a RayJob: KubeRay stops its Ray job if its jobStatus is not terminal (StopJob),
      then removes its finalizer `stop_after` ticks later; only then is the RayJob gone.
    - A Ray job ends when its cluster is deleted.

    `submitted` lists every RayJob name in the order KubeRay submitted them; `peak_drivers`
    is the most Ray jobs that ever ran at once on each cluster ((namespace, name) -> count).
    """

    def __init__(
        self,
        api: RLHFEmulator,
        plan: Callable[[Mapping[str, Any]], Plan] | None = None,
        *,
        tick: float = 0.05,
        ready_after: int = 1,
        stop_after: int = 3,
    ) -> None:
        self.api, self.tick, self.ready_after, self.stop_after = api, tick, ready_after, stop_after
        self.plan = plan or always(SUCCEED)
        self.provisioning: Callable[[Mapping[str, Any]], Provisioning | None] = lambda c: None
        self.reject: Callable[[Mapping[str, Any]], str | None] = lambda rj: None
        self.submitted: list[str] = []
        self.runs: dict[str, RayJobRun] = {}  # RayJob uid -> its Ray job
        self.peak_drivers: dict[tuple[str, str], int] = {}
        self._age: dict[tuple[str, str, str], int] = {}
        self._pods: dict[tuple[str, str], list[dict[str, Any]]] | None = None

    def _older(self, kind: str, obj: Mapping[str, Any]) -> int:
        meta = obj["metadata"]
        key = (kind, meta.get("namespace", ""), meta.get("uid") or meta["name"])
        self._age[key] = self._age.get(key, -1) + 1
        return self._age[key]

    def drivers(self, namespace: str, cluster: str) -> list[str]:
        """RayJob uids whose Ray job runs on the cluster now."""
        return [
            uid
            for uid, run in self.runs.items()
            if run.cluster == (namespace, cluster) and run.status not in RAY_JOB_TERMINAL
        ]

    async def step(self) -> None:
        """One tick of the controller."""
        self._pods = None  # read once per tick, when a cluster comes up (see _pods_running)
        ready: set[tuple[str, str]] = set()
        clusters = set()
        for cluster in self.api.live(RAYCLUSTERS):
            meta = cluster["metadata"]
            clusters.add((meta["namespace"], meta["name"]))
            if meta.get("deletionTimestamp"):
                continue
            if (cluster.get("spec") or {}).get("suspend"):
                continue  # KubeRay makes no pods for a suspended cluster (e.g. Kueue holds it)
            if await self._reconcile_cluster(cluster):
                ready.add((meta["namespace"], meta["name"]))
        for run in self.runs.values():  # a cluster deleted under its Ray jobs ends them
            if run.cluster not in clusters and run.status not in RAY_JOB_TERMINAL:
                run.status = "STOPPED"
        for rayjob in self.api.live(RAYJOBS):
            await self._reconcile_rayjob(rayjob, ready)

    # ---- RayCluster

    async def _reconcile_cluster(self, cluster: Mapping[str, Any]) -> bool:
        """Pods and status of one cluster; True when it is ready."""
        meta, status = cluster["metadata"], cluster.get("status") or {}
        if status.get("state") == "ready":
            return True
        age = self._older("cluster", cluster)
        problem = self.provisioning(cluster)
        if age == 0:
            await self._create_pods(cluster, problem)
        if problem is None and age >= self.ready_after:
            await self._pods_running(cluster)
            await _patch(self.api, RAYCLUSTERS, meta, {"status": CLUSTER_READY}, "status")
            return True
        if age == 0:
            status = _provisioning(meta["name"], problem)
            await _patch(self.api, RAYCLUSTERS, meta, {"status": status}, "status")
        return False

    async def _create_pods(self, cluster: Mapping[str, Any], problem: Provisioning | None) -> None:
        meta = cluster["metadata"]
        if problem is not None and problem.head_forbidden:
            return  # the API server refused the head pod: KubeRay reports ReplicaFailure
        spec = cluster.get("spec") or {}
        image = _container(spec.get("headGroupSpec") or {}).get("image", "")
        pods = [(f"{meta['name']}-head-{_suffix()}", "head", "ray-head", image)]
        for group in spec.get("workerGroupSpecs") or []:
            worker_image = _container(group).get("image", "")
            for _ in range(group.get("replicas") or 0):
                name = f"{meta['name']}-{group.get('groupName', 'workers')}-worker-{_suffix()}"
                pods.append((name, "worker", "ray-worker", worker_image))
        for name, node_type, container, pod_image in pods:
            pod = _pod(cluster, name, node_type, container, pod_image)
            await _create(self.api, PODS, meta["namespace"], pod)  # status: the scheduler's
            if self._pods is not None:
                self._pods.setdefault((meta["namespace"], meta["name"]), []).append(pod)
            status = _pending_pod(container, node_type, problem)
            await _patch(self.api, PODS, pod["metadata"], {"status": status}, "status")
            for reason, message, source in _pod_warnings(node_type, problem):
                await _create(
                    self.api, EVENTS, meta["namespace"], _event(pod, reason, message, source)
                )

    async def _pods_running(self, cluster: Mapping[str, Any]) -> None:
        if self._pods is None:  # the pods by cluster, once per tick (a fleet comes up at once)
            self._pods = {}
            for pod in self.api.live(PODS):
                meta = pod["metadata"]
                owner = (meta.get("labels") or {}).get(names.LABEL_RAY_CLUSTER)
                self._pods.setdefault((meta.get("namespace"), owner), []).append(pod)
        key = (cluster["metadata"]["namespace"], cluster["metadata"]["name"])
        for pod in self._pods.get(key, []):
            await _patch(self.api, PODS, pod["metadata"], {"status": RUNNING_POD}, "status")

    # ---- RayJob

    async def _reconcile_rayjob(self, rayjob: Mapping[str, Any], ready: set) -> None:
        meta, status = rayjob["metadata"], rayjob.get("status") or {}
        run = self.runs.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            await self._finalize(rayjob, run)
            return
        if status.get("jobDeploymentStatus") in DEPLOYMENT_TERMINAL:
            return  # KubeRay never updates a finished RayJob again
        if not status:
            refused = kuberay_validation(rayjob) or self.reject(rayjob)
            if refused:
                failed = {
                    "jobDeploymentStatus": "ValidationFailed",
                    "reason": "ValidationFailed",
                    "message": refused,
                }
                await _patch(self.api, RAYJOBS, meta, {"status": failed}, "status")
                return
            finalizers = [*(meta.get("finalizers") or []), RAYJOB_FINALIZER]
            await _patch(self.api, RAYJOBS, meta, {"metadata": {"finalizers": finalizers}})
            await _patch(
                self.api,
                RAYJOBS,
                meta,
                {"status": {"jobDeploymentStatus": "Initializing"}},
                "status",
            )
            return
        target = rayjob["spec"].get("clusterSelector", {}).get(names.LABEL_RAY_CLUSTER)
        cluster = (meta["namespace"], target)
        if cluster not in ready:
            return  # KubeRay waits in Initializing for the selected cluster
        age = self._older("rayjob", rayjob)
        if age == 0:
            self.submitted.append(meta["name"])
        plan = self.plan(rayjob)
        wanted = plan[min(age, len(plan) - 1)]
        job_status = wanted.get("jobStatus")
        if job_status and run is None:
            run = self.runs[meta["uid"]] = RayJobRun(cluster)
            count = len(self.drivers(*cluster))
            self.peak_drivers[cluster] = max(self.peak_drivers.get(cluster, 0), count)
        if run is not None and job_status in RAY_JOB_TERMINAL and run.status == "RUNNING":
            run.status = job_status
        if any(status.get(k) != v for k, v in wanted.items()):
            await _patch(
                self.api, RAYJOBS, meta, {"status": {**wanted, "rayClusterName": target}}, "status"
            )

    async def _finalize(self, rayjob: Mapping[str, Any], run: RayJobRun | None) -> None:
        """rayjob_controller.go on a deleted RayJob: StopJob unless its jobStatus is terminal,
        then remove the finalizer (after `stop_after` ticks: the dashboard call and requeue)."""
        meta, status = rayjob["metadata"], rayjob.get("status") or {}
        if RAYJOB_FINALIZER not in (meta.get("finalizers") or []):
            return
        if status.get("jobStatus") not in RAY_JOB_TERMINAL and run is not None:
            run.status = "STOPPED"
        if self._older("deleting", rayjob) >= self.stop_after:
            rest = [f for f in meta["finalizers"] if f != RAYJOB_FINALIZER]
            await _patch(self.api, RAYJOBS, meta, {"metadata": {"finalizers": rest}})


CLUSTER_READY = {
    "state": "ready",
    "conditions": [
        {
            "type": "RayClusterProvisioned",
            "status": "True",
            "reason": "AllPodRunningAndReadyFirstTime",
            "message": "All Ray Pods are ready for the first time",
        },
        {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
    ],
}
RUNNING_POD = {
    "phase": "Running",
    "conditions": [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True"},
    ],
}


def _provisioning(cluster: str, problem: Provisioning | None) -> dict[str, Any]:
    """A RayCluster's status while its pods come up (raycluster_controller.go calculateStatus):
    no `state`; HeadPodReady False with the head pod's Ready reason ("Unknown" before it has
    one); RayClusterProvisioned False; ReplicaFailure True when a pod could not be created."""
    head_ready: dict[str, str] = {"type": "HeadPodReady", "status": "False", "reason": "Unknown"}
    if problem is not None and problem.workers_unschedulable:
        head_ready = {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"}
    if problem is not None and problem.image_pull:
        head_ready = {
            **head_ready,
            "reason": "ContainersNotReady",
            "message": "containers with unready status: [ray-head]",
        }
    if problem is not None and problem.head_forbidden:
        head_ready = {**head_ready, "reason": "HeadPodNotFound"}
    conditions = [
        head_ready,
        {
            "type": "RayClusterProvisioned",
            "status": "False",
            "reason": "RayClusterPodsProvisioning",
            "message": "RayCluster Pods are being provisioned for first time",
        },
    ]
    if problem is not None and problem.head_forbidden:
        conditions.append(
            {
                "type": "ReplicaFailure",
                "status": "True",
                "reason": "FailedCreateHeadPod",
                "message": f'pods "{cluster}-head-" is forbidden: {problem.head_forbidden}',
            }
        )
    return {"conditions": conditions}


def _container(group: Mapping[str, Any]) -> dict[str, Any]:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    return containers[0]


def _pod(
    cluster: Mapping[str, Any], name: str, node_type: str, container: str, image: str
) -> dict[str, Any]:
    meta = cluster["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {names.LABEL_RAY_CLUSTER: meta["name"], "ray.io/node-type": node_type},
            "ownerReferences": [
                {
                    "apiVersion": names.RAY_API_VERSION,
                    "kind": names.RAYCLUSTER_KIND,
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": {"containers": [{"name": container, "image": image}]},
    }


def _pending_pod(container: str, node_type: str, problem: Provisioning | None) -> dict:
    """A new pod's status as the scheduler and kubelet leave it while `problem` holds."""
    if problem is not None and problem.workers_unschedulable:
        if node_type == "head":
            return RUNNING_POD  # the head asks for no GPU: it runs
        return {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                 "message": problem.workers_unschedulable},
            ],
        }  # fmt: skip
    if problem is not None and problem.image_pull:
        waiting = {
            "reason": "ImagePullBackOff",
            "message": problem.image_pull.replace("Failed to pull image", "Back-off pulling image"),
        }
        return {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "False", "reason": "ContainersNotReady",
                 "message": f"containers with unready status: [{container}]"},
            ],
            "containerStatuses": [
                {"name": container, "ready": False, "state": {"waiting": waiting}}
            ],
        }  # fmt: skip
    return {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}


def _pod_warnings(node_type: str, problem: Provisioning | None) -> list[tuple[str, str, str]]:
    """(reason, message, source) of the Warning Events a pod gets from the scheduler/kubelet."""
    if problem is None:
        return []
    if problem.workers_unschedulable and node_type == "worker":
        return [("FailedScheduling", problem.workers_unschedulable, "default-scheduler")]
    if problem.image_pull:
        return [
            ("Failed", problem.image_pull, "kubelet"),
            ("Failed", "Error: ErrImagePull", "kubelet"),
        ]
    return []


def _event(pod: Mapping[str, Any], reason: str, message: str, source: str) -> dict[str, Any]:
    meta = pod["metadata"]
    now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{_suffix()}", "namespace": meta["namespace"]},
        "involvedObject": {
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "apiVersion": "v1",
        },
        "type": "Warning",
        "reason": reason,
        "message": message,
        "source": {"component": source},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def _url(resource: str, namespace: str, name: str | None = None) -> str:
    group_version, plural = resource.rsplit("/", 1)
    prefix = "/api" if "/" not in group_version else "/apis"
    url = f"{prefix}/{group_version}/namespaces/{namespace}/{plural}"
    return f"{url}/{name}" if name else url


async def _patch(
    api: RLHFEmulator, resource: str, meta: Mapping[str, Any], body: dict, sub: str = ""
) -> None:
    url = _url(resource, meta["namespace"], meta["name"]) + (f"/{sub}" if sub else "")
    async with api.patch(url, json=body, headers=MERGE_PATCH) as resp:
        await resp.read()


async def _create(api: RLHFEmulator, resource: str, namespace: str, body: dict) -> None:
    async with api.post(_url(resource, namespace), json=body) as resp:
        await resp.read()


async def _delete(api: RLHFEmulator, resource: str, meta: Mapping[str, Any]) -> None:
    namespace = meta.get("namespace")
    url = _url(resource, namespace, meta["name"]) if namespace else None
    if url is None:
        return  # the collector here only deals in namespaced children
    async with api.delete(url) as resp:
        await resp.read()


# --------------------------------------------------------------------------- the operator


class OperatorRunner:
    """The real operator (kopf + rlhf_operator.handlers) in a thread with its own event loop.

    Its own loop, not the test's: on stop, kopf cancels every task of its loop that it did not
    find at start, which would include the emulator's connection handlers. `stop()` + `start()`
    is an operator restart: nothing survives but what is stored in the API.

    `stop()` and `kill()` return only once the operator is gone entirely: its thread, its event
    loop's tasks, kopf's handler threads and the loop's executor threads (all named after the
    runner, and checked). An operator left running past its test would go on reconciling, or
    raising (kopf's LoginError once its emulator is gone), inside the next test.
    """

    STOP_TIMEOUT = 60.0
    """Seconds a stop may take before it is forced (a loaded CI box is slow, never this slow)."""

    _instances = itertools.count(1)

    def __init__(self, namespaces: tuple[str, ...] = ()) -> None:
        self.namespaces = namespaces
        self.name = f"operator-{next(self._instances)}"
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the operator's, for kill()
        self._main: asyncio.Task[Any] | None = None

    def _run(self, ready: threading.Event) -> None:
        import kopf
        import rlhf_operator.handlers  # noqa: F401  (registers with kopf's default registry)

        settings = kopf.OperatorSettings()
        # kopf runs sync handlers (the reconcile) in this pool; named, so stop() can check it.
        workers = ThreadPoolExecutor(thread_name_prefix=f"{self.name}-handler")
        settings.execution.executor = workers

        async def main() -> None:
            self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
            # asyncio.to_thread (the pool sweep) and kopf's stop-flag waiter use this one;
            # asyncio.run joins it on exit.
            self._loop.set_default_executor(
                ThreadPoolExecutor(thread_name_prefix=f"{self.name}-io")
            )
            await kopf.operator(
                registry=kopf.get_default_registry(),
                settings=settings,
                clusterwide=not self.namespaces,
                namespaces=self.namespaces,
                standalone=True,
                stop_flag=self._stop,
                ready_flag=ready,
                memo=kopf.Memo(),
            )

        try:
            asyncio.run(main())
        except BaseException as exc:  # surfaced by stop()
            self.error = exc
        finally:
            # kopf awaits every handler thread it started, so these are idle: end them.
            workers.shutdown(wait=True, cancel_futures=True)

    async def start(self) -> None:
        ready = threading.Event()
        self._stop = threading.Event()
        self.error = None
        self._loop = self._main = None
        self._thread = threading.Thread(target=self._run, args=(ready,), name=self.name)
        self._thread.start()
        if not await asyncio.to_thread(self._wait_ready, ready, self.STOP_TIMEOUT):
            error = self.error
            await self.stop(raise_error=False)  # never leave a half-started operator behind
            raise TimeoutError(f"the operator did not start: {error!r}")

    def _wait_ready(self, ready: threading.Event, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self._thread is None or not self._thread.is_alive() or time.monotonic() > deadline:
                return False
        return True

    async def stop(self, *, raise_error: bool = True) -> None:
        """Stop the operator as SIGTERM would (kopf finishes what it is doing), completely."""
        if self._thread is None:
            return
        self._stop.set()
        await self._join()
        if self.error is not None and raise_error:
            raise self.error

    async def kill(self, then: Callable[[], None] = lambda: None) -> None:
        """Kill the operator where it stands, as SIGKILL would: every task of it is cancelled
        mid-step (kopf still runs its cleanup activities; ours only stop the expiry sweep,
        which a killed process loses anyway). `then()` runs as the kill is sent: e.g. release
        a request the emulator holds, which a (sync) handler thread waits on and kopf cannot
        cancel; that thread then fails on its answer (503) and writes nothing more."""
        if self._thread is None:
            return
        self._cancel()
        then()
        deadline = time.monotonic() + self.STOP_TIMEOUT
        while self._main is not None and not self._main.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._stop.set()  # only wakes kopf's stop-flag waiter thread, which would block the exit
        await self._join()
        self.error = None  # the cancellation was the point

    def _cancel(self) -> None:
        """Cancel the operator's main task, from any thread."""
        if self._loop is not None and self._main is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: already over
                self._loop.call_soon_threadsafe(self._main.cancel)

    async def _join(self) -> None:
        """Wait until the operator's thread ended (forcing it after STOP_TIMEOUT) and none of
        its threads is left; else fail loudly here rather than in a later test."""
        thread = self._thread
        assert thread is not None
        await asyncio.to_thread(thread.join, self.STOP_TIMEOUT)
        if thread.is_alive():
            logging.getLogger(__name__).warning("%s did not stop in time: cancelling it", self.name)
            self._cancel()
            self._stop.set()
            await asyncio.to_thread(thread.join, self.STOP_TIMEOUT)
        leftovers = self.threads()
        if leftovers:
            raise RuntimeError(f"{self.name} left threads running: {leftovers}")
        self._thread = None

    def threads(self) -> list[str]:
        """This operator's live threads: its own, kopf's handler threads, its loop's executor."""
        return [
            t.name
            for t in threading.enumerate()
            if t.name == self.name or t.name.startswith(f"{self.name}-")
        ]

    async def __aenter__(self) -> OperatorRunner:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def kubeconfig_env(path: Path) -> dict[str, str]:
    return {**os.environ, "KUBECONFIG": str(path)}


# --------------------------------------------------------------------------- jobs


def sample_job(name: str = "demo", namespace: str = "ns", **spec: Any) -> dict[str, Any]:
    """A valid RLHFJob manifest (s3 storage, all four stages); `spec` keys override the spec's."""
    base: dict[str, Any] = {
        "model": {"base": "gpt2"},
        "storage": {"uri": "s3://bucket/rlhf", "secretRef": {"name": "s3-creds"}},
        "stages": {
            "sft": {"dataset": {"uri": "imdb"}, "batchSize": 8},
            "reward": {"dataset": {"uri": "prefs"}, "batchSize": 8},
            "ppo": {"prompts": {"uri": "prompts"}, "rolloutBatchSize": 8},
            "evaluation": {"numPrompts": 8},
        },
        "cluster": {"workers": {"replicas": 2}},
        "runPolicy": {"backoffLimit": 1},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": _merge(base, spec),
    }


def job_url(namespace: str, name: str | None = None) -> str:
    url = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"
    return f"{url}/{name}" if name else url


async def create_job(api: RLHFEmulator, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`kubectl apply` (create) an RLHFJob."""
    url = job_url(manifest["metadata"]["namespace"])
    async with api.post(url, json=manifest) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def create_jobs_while_down(
    api: RLHFEmulator, operator: OperatorRunner, *manifests: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """Create RLHFJobs while the operator is stopped, then start it.

    kopf fills every index (e.g. the warm pool) before it runs any handler, so the jobs' first
    reconcile sees all the API holds. A job created while the operator runs can be reconciled
    a moment before the watch has brought a just-released cluster: real, harmless (the job
    makes its own), but a test that asserts reuse must not depend on that timing.
    """
    await operator.stop()
    created = [await create_job(api, manifest) for manifest in manifests]
    await operator.start()
    return created


async def patch_job(api: RLHFEmulator, namespace: str, name: str, patch: dict) -> dict[str, Any]:
    """`kubectl patch --type merge` an RLHFJob."""
    async with api.patch(job_url(namespace, name), json=patch, headers=MERGE_PATCH) as resp:
        assert resp.status < 300, await resp.text()
        return await resp.json()


async def delete_job(api: RLHFEmulator, namespace: str, name: str) -> None:
    async with api.delete(job_url(namespace, name)) as resp:
        assert resp.status < 300, await resp.text()


PATIENCE = 60.0
"""How long `eventually` waits by default (seconds). The slowest scenario (four stages, a
restart) takes ~3 s on an idle 2-core box and a few times that when the CPU is shared (CI):
waiting ends as soon as the outcome is there, so only a real failure ever waits this long."""


async def eventually(
    check: Callable[[], Any], timeout: float = PATIENCE, every: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy; its last value or an AssertionError.

    Tests wait for outcomes with this, never for a fixed time or a number of operator ticks.
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s (last value: {value!r})")
        await asyncio.sleep(every)
