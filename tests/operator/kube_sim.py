"""A Kubernetes to run the real operator against: KMock's emulator, a simulated KubeRay, a runner.

Reusable by every operator-level test and benchmark (warm pools, observability, scale):

- `RLHFEmulator`: `emulator.Emulator` (KMock + resourceVersions/uid/preconditions) plus the two
  API-server semantics the operator's correctness depends on, added exactly:
    * `metadata.generation`: 1 at create, +1 when a write changes `spec` (observedGeneration and
      "spec changed after start" are read from it);
    * the status subresource: a write to `/status` changes only `.status`; a write to the object
      ignores `.status`; a create drops `.status` (so an operator that wrote status the wrong way
      would fail the tests, as it would fail on a real cluster).
  Not emulated (tests do not depend on it): ownerReference garbage collection, label selectors
  on list/watch (kopf filters on its side), schema validation and defaulting.
- `SimulatedKubeRay`: a tiny controller over HTTP, like KubeRay: marks RayClusters ready and
  walks every RayJob through a scripted list of statuses (`Plan`), one step per tick, once its
  `clusterSelector` cluster is ready.
- `OperatorRunner`: the real kopf operator (`rlhf_operator.handlers`) in this event loop, with
  start/stop to simulate operator restarts.
- `write_kubeconfig`: a kubeconfig pointing at the emulator, for kopf and `kubernetes`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import os
import random
import string
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

import aiohttp.web
import attrs
import kmock
import yaml
from emulator import Emulator
from kmock._internal import rendering
from rlhf_operator import names
from rlhf_operator.api import GROUP, KIND, PLURAL, VERSION

JOBS = f"{GROUP}/{VERSION}/{PLURAL}"
RAYCLUSTERS = f"{names.RAY_API_VERSION}/{names.RAYCLUSTERS}"
RAYJOBS = f"{names.RAY_API_VERSION}/{names.RAYJOBS}"
EVENTS = "v1/events"
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
                data = self._bump_generation(request, data)
            object.__setattr__(request, "data", data)  # Request is frozen; KMock keys on identity
        return await super()._handle(request)

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
    api.resources[EVENTS] = info(kind="Event", namespaced=True, verbs=ALL_VERBS)
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
"""RayJob statuses to walk through, one per tick; the last one stays."""

SUCCEED: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
]
FAIL: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {
        "jobDeploymentStatus": "Failed",
        "jobStatus": "FAILED",
        "reason": "AppFailed",
        "message": "Job entrypoint command failed with exit code 1: CUDA out of memory",
    },
]
HANG: Plan = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
]


def always(plan: Plan) -> Callable[[Mapping[str, Any]], Plan]:
    return lambda rayjob: plan


def stage_of(rayjob: Mapping[str, Any]) -> tuple[str, int]:
    labels = rayjob["metadata"].get("labels") or {}
    return labels.get(names.LABEL_STAGE, ""), int(labels.get(names.LABEL_ATTEMPT, "0"))


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


class SimulatedKubeRay(TickingController):
    """Moves RayCluster and RayJob statuses like KubeRay would, over the emulator's HTTP API.

    `plan(rayjob) -> Plan` scripts each RayJob (default: every one succeeds in three ticks).
    `ready_after` ticks pass before a new cluster is ready. `submitted` lists every RayJob name
    in the order KubeRay saw them.
    """

    def __init__(
        self,
        api: RLHFEmulator,
        plan: Callable[[Mapping[str, Any]], Plan] | None = None,
        *,
        tick: float = 0.05,
        ready_after: int = 1,
    ) -> None:
        self.api, self.tick, self.ready_after = api, tick, ready_after
        self.plan = plan or always(SUCCEED)
        self.submitted: list[str] = []
        self._age: dict[tuple[str, str, str], int] = {}

    def _older(self, kind: str, obj: Mapping[str, Any]) -> int:
        meta = obj["metadata"]
        key = (kind, meta.get("namespace", ""), meta.get("uid") or meta["name"])
        self._age[key] = self._age.get(key, -1) + 1
        return self._age[key]

    async def step(self) -> None:
        """One tick of the controller."""
        ready: set[tuple[str, str]] = set()
        for cluster in self.api.live(RAYCLUSTERS):
            meta = cluster["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            if (cluster.get("spec") or {}).get("suspend"):
                continue  # KubeRay makes no pods for a suspended cluster (e.g. Kueue holds it)
            if (cluster.get("status") or {}).get("state") == "ready":
                ready.add((meta["namespace"], meta["name"]))
            elif self._older("cluster", cluster) >= self.ready_after:
                await self._status(RAYCLUSTERS, cluster, CLUSTER_READY)
        for rayjob in self.api.live(RAYJOBS):
            meta = rayjob["metadata"]
            if meta.get("deletionTimestamp"):
                continue
            target = rayjob["spec"].get("clusterSelector", {}).get(names.LABEL_RAY_CLUSTER)
            if (meta["namespace"], target) not in ready:
                continue  # KubeRay waits in Initializing for the selected cluster
            age = self._older("rayjob", rayjob)
            if age == 0:
                self.submitted.append(meta["name"])
            plan = self.plan(rayjob)
            wanted = plan[min(age, len(plan) - 1)]
            if any((rayjob.get("status") or {}).get(k) != v for k, v in wanted.items()):
                await self._status(RAYJOBS, rayjob, {**wanted, "rayClusterName": target})

    async def _status(self, resource: str, obj: Mapping[str, Any], status: dict) -> None:
        meta = obj["metadata"]
        url = f"/apis/{resource.rsplit('/', 1)[0]}/namespaces/{meta['namespace']}/"
        url += f"{resource.rsplit('/', 1)[1]}/{meta['name']}/status"
        async with self.api.patch(url, json={"status": status}, headers=MERGE_PATCH) as resp:
            await resp.read()


CLUSTER_READY = {
    "state": "ready",
    "conditions": [
        {
            "type": "RayClusterProvisioned",
            "status": "True",
            "reason": "AllPodRunningAndReadyFirstTime",
        },
        {"type": "HeadPodReady", "status": "True", "reason": "HeadPodRunningAndReady"},
    ],
}


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
