"""The real operator as a subprocess against KMock's emulated API server (shared by benchmarks).

The emulator and simulated KubeRay come from tests/operator/kube_sim.py, the same ones the
operator tests use.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kmock
from kmock._internal import apps, dsl, filtering, rendering

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "operator"))

from kube_sim import ALL_VERBS, RLHFEmulator, write_kubeconfig  # noqa: E402


class _DirectDispatch(apps.RawHandler):
    """KMock's request matching, without its cost: KMock finds a request's reaction by
    re-filtering every recorded request through every reaction's filter (14 built-in
    reactions x the history, per request), which a thousand jobs' requests turn into the
    emulator's main work. With only the emulator's built-in reactions (no test-added ones),
    a resource request's reaction is the one for its action (list, watch, fetch, create,
    update, delete): served directly, the same handler KMock would pick. Anything else
    takes KMock's own path."""

    __slots__ = ()

    async def _handle(self, request: rendering.Request) -> Any:
        payload = self._builtin_reaction(request)
        if payload is None:
            return await super()._handle(request)
        return await payload(request)

    def _builtin_reaction(self, request: rendering.Request) -> Any:
        if request.resource is None or request.action is None:
            return None
        found = None
        for payload in self._payloads:
            source = payload._source
            criteria = getattr(source, "criteria", None)
            if isinstance(source, dsl.Priority) and criteria is None:
                continue  # the last resort (404 for unknown endpoints)
            if type(source) is not dsl.Filter or payload._disabled.is_set():
                return None
            if isinstance(criteria, filtering.HTTPCriteria):
                if criteria(request):
                    return None  # a discovery endpoint (they come first): KMock serves it
                continue
            if not isinstance(criteria, filtering.K8sCriteria) or any(
                getattr(criteria, f) is not ...
                for f in ("method", "resource", "namespace", "name", "subresource")
            ):
                return None  # a reaction a test added: KMock decides
            if criteria.action == request.action:
                found = payload
        return found


class FastEmulator(RLHFEmulator, _DirectDispatch):
    """The benchmarks' emulator: the same API semantics (tests/operator/kube_sim.py), found
    faster. KMock looks an object up by scanning every stored object (a thousand jobs bring
    ten thousand objects, pods included); a request naming one is a dict lookup here, and
    falls back to KMock's scan when the lookup misses."""

    def _KubernetesEmulator__get_objs(self, request: rendering.Request, strict: bool) -> list:
        if strict and request.resource is not None and request.name is not None:
            obj = self._objects._objects.get((request.resource, request.namespace, request.name))
            if obj is not None:
                return [obj]
        return kmock.KubernetesEmulator._KubernetesEmulator__get_objs(self, request, strict)

    def live(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """As RLHFEmulator.live (the simulated KubeRay reads it every tick), comparing the
        resources' names as tuples instead of KMock's parsing `==`."""
        parsed = kmock.resource(resource)
        wanted = (parsed.plural, parsed.version, parsed.group)
        return [
            obj.raw
            for (res, ns, _), obj in list(self._objects._objects.items())
            if (res.plural, res.version, res.group) == wanted
            and namespace in (None, ns)
            and not obj.deleted
        ]


OPERATOR = [sys.executable, "-m", "rlhf_operator", "--liveness", "", "--metrics-port", "0"]


@dataclass
class EmulatedOperator:
    api: RLHFEmulator
    workdir: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    stop_first: list[asyncio.Task[None]] = field(default_factory=list)  # cancelled at teardown

    @property
    def process(self) -> subprocess.Popen:
        """The first operator process."""
        return self.processes[0]

    @property
    def log(self) -> Path:
        return self.workdir / "operator.log"

    def start_replica(self, name: str, *args: str) -> subprocess.Popen:
        """An operator process against the API (more than one: e.g. leader election)."""
        with (self.workdir / f"{name}.log").open("a") as log:
            process = subprocess.Popen(
                [*OPERATOR, *args],
                env={**self.env, "POD_NAME": name},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(process)
        return process


@asynccontextmanager
async def emulated_operator(
    interval: float | None, *args: str, emulator: type[RLHFEmulator] = FastEmulator
) -> AsyncIterator[EmulatedOperator]:
    """Start the emulator and `python -m rlhf_operator [args]` pointed at it; stop all at exit.

    `interval` overrides the resync interval (RLHF_RESYNC_INTERVAL); None keeps the production
    default. The emulator keeps a short request history: KMock matches each request against
    all recorded ones, which is quadratic over a long benchmark. It serves Leases too (leader
    election).
    """
    workdir = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    async with emulator(request_history=16) as api, kmock.Server(api) as server:
        api.resources["coordination.k8s.io/v1/leases"] = kmock.ResourceInfo(
            kind="Lease", namespaced=True, verbs=ALL_VERBS
        )
        kubeconfig = write_kubeconfig(str(server.url).rstrip("/"), workdir / "kubeconfig")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        if interval is not None:
            env["RLHF_RESYNC_INTERVAL"] = str(interval)
        emulated = EmulatedOperator(api, workdir, env)
        emulated.start_replica("operator", *args)
        try:
            yield emulated
        finally:
            for task in emulated.stop_first:
                task.cancel()
            for process in emulated.processes:
                if process.poll() is None:
                    process.terminate()
            for process in emulated.processes:
                try:
                    await asyncio.to_thread(process.wait, 30)
                except subprocess.TimeoutExpired:
                    process.kill()
