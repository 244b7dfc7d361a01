"""KMock's Kubernetes emulator plus the API-server semantics that warm pools and restarts rely on.

KMock 0.8's `KubernetesEmulator` merges JSON naively and never versions objects. A warm-pool claim
is only atomic because the real API server refuses a write whose `metadata.resourceVersion` is
stale, so this subclass adds exactly that, the way the API server does it:

- every create and every write gets a new `metadata.resourceVersion` (one global counter, a
  string, as in etcd); a create also gets a `metadata.uid` and a `creationTimestamp`;
- a merge-patch that carries `metadata.resourceVersion` is a precondition: a stale one is
  refused with 409 Conflict and the object is left untouched;
- a JSON-patch is applied all-or-nothing: a failed `test` op (kopf's own optimistic-concurrency
  check) is refused with 422, as the API server does;
- a DELETE with `preconditions.resourceVersion` (DeleteOptions) is refused with 409 when stale;
  marking an object with finalizers for deletion is a write too (new resourceVersion);
- a create is answered 201 Created with the object (KMock says 200, and the kubernetes client
  reads the body of a create's 201 only: it returns None for a 200).

The check and the write happen under one lock, so two racing writers cannot both pass.

For race tests it has "gates" (hold matching writes until N arrived, then let them race), and
for the restart tests "tripwires": stop a matching write either before it lands
(the operator died before sending it) or right after it landed (the operator died before it saw
the answer), until the test has killed the operator. Once released, the held request is answered
with 503 either way: the killed operator never reads an answer, and a client thread still
blocked on it must not carry on as if it had. Everything else is KMock's own behaviour.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import rendering

WRITES = frozenset({kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE})


@attrs.frozen
class ConflictError(kmock.KubernetesError):
    """409 Conflict: the write's resourceVersion precondition no longer holds."""

    status: int = 409
    reason: str = "Conflict"


@attrs.frozen
class InvalidError(kmock.KubernetesError):
    """422 Invalid: a JSON-patch that cannot be applied (e.g. a failed `test` op)."""

    status: int = 422
    reason: str = "Invalid"


@attrs.frozen
class ServiceUnavailableError(kmock.KubernetesError):
    """503: the answer to a tripwired request (its operator was killed meanwhile)."""

    status: int = 503
    reason: str = "ServiceUnavailable"
    message: str = "the operator that sent this request was killed (tripwire)"


@dataclass
class Tripwire:
    """Stops the first write matching `matches` and holds it until `release()`.

    `landed=True`: the write is stored first (the operator dies before reading the answer);
    `landed=False`: the write never lands (the operator dies before sending it).
    Either way the request is then answered 503 (nobody is left to read a real answer).
    """

    matches: Callable[[rendering.Request], bool]
    landed: bool
    tripped: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    request: rendering.Request | None = None

    def release(self) -> None:
        """Let the held request finish (its client is gone by then)."""
        self._released.set()

    async def _hold(self, request: rendering.Request) -> None:
        self.request = request
        self.tripped.set()
        await self._released.wait()


@dataclass
class Gate:
    """Holds writes matching `matches` until `count` of them arrived, then lets them all go at
    once (in arrival order), so that racing writers really race (they read the same version)."""

    matches: Callable[[rendering.Request], bool]
    count: int
    arrived: int = 0
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    async def _pass(self, request: rendering.Request) -> None:
        if self.opened.is_set() or not self.matches(request):
            return
        self.arrived += 1
        if self.arrived >= self.count:
            self.opened.set()
            await asyncio.sleep(0)  # the earlier arrivals go first
        await self.opened.wait()


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """`kmock.KubernetesEmulator` with resourceVersions, preconditions and tripwires."""

    _versions: itertools.count = attrs.field(factory=lambda: itertools.count(1), init=False)
    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _tripwires: list[Tripwire] = attrs.field(factory=list, init=False)
    _gates: list[Gate] = attrs.field(factory=list, init=False)

    def gate(self, matches: Callable[[rendering.Request], bool], count: int = 2) -> Gate:
        """Arm a gate (see `Gate`) on writes that `matches`."""
        gate = Gate(matches=matches, count=count)
        self._gates.append(gate)
        return gate

    def tripwire(
        self, matches: Callable[[rendering.Request], bool], *, landed: bool = True
    ) -> Tripwire:
        """Arm a one-shot tripwire on the next write that `matches` (see `Tripwire`)."""
        wire = Tripwire(matches=matches, landed=landed)
        self._tripwires.append(wire)
        return wire

    def release_all(self) -> None:
        """Release every held request (teardown: no client waits forever)."""
        for wire in self._tripwires:
            wire.release()
        for gate in self._gates:
            gate.opened.set()

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        if request.resource is None or request.action not in WRITES:
            return await super()._handle(request)
        for gate in self._gates:
            await gate._pass(request)
        wire = self._take_tripwire(request)
        if wire is not None and not wire.landed:
            await wire._hold(request)
            raise ServiceUnavailableError()
        async with self._write_lock:
            request = await self._apply_preconditions(request)
            response = await super()._handle(request)
        if wire is not None:
            await wire._hold(request)
            raise ServiceUnavailableError()
        return response

    def _take_tripwire(self, request: rendering.Request) -> Tripwire | None:
        for wire in self._tripwires:
            if not wire.tripped.is_set() and wire.request is None and wire.matches(request):
                wire.request = request  # claimed by this request: one-shot
                return wire
        return None

    async def _apply_preconditions(self, request: rendering.Request) -> rendering.Request:
        """Refuse a stale write (409/422), else return the request stamped with a new version."""
        version = str(next(self._versions))
        async with self._lock:
            current = self._current(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = {
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                **((request.data or {}).get("metadata") or {}),
                "resourceVersion": version,
            }
            return _with_data(request, {**request.data, "metadata": meta})
        if current is None:
            return request  # KMock answers 404 itself
        if request.action == kmock.action.DELETE:
            wanted = ((request.data or {}).get("preconditions") or {}).get("resourceVersion")
            _check_version(current, wanted, request)
            await self._mark_deleted(request, current, version)
            return request
        if isinstance(request.data, list):  # JSON-patch: all ops or none, as the API server
            try:
                jsonpatch.apply_patch(copy.deepcopy(current), request.data)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise InvalidError(message=str(exc)) from exc
            ops = [
                *request.data,
                {"op": "add", "path": "/metadata/resourceVersion", "value": version},
            ]
            return _with_data(request, ops)
        if not isinstance(request.data, dict):
            return request
        meta = request.data.get("metadata") or {}
        _check_version(current, meta.get("resourceVersion"), request)
        return _with_data(
            request, {**request.data, "metadata": {**meta, "resourceVersion": version}}
        )

    async def _mark_deleted(
        self, request: rendering.Request, current: dict[str, Any], version: str
    ) -> None:
        """Setting deletionTimestamp on an object with finalizers is a write: new version."""
        meta = current.get("metadata") or {}
        if not meta.get("finalizers") or meta.get("deletionTimestamp"):
            return  # KMock deletes it (or it is already marked)
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            obj = self._objects[key]
            obj.patch({"metadata": {"deletionTimestamp": _now(), "resourceVersion": version}})
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})

    async def _serve_create(self, request: rendering.Request) -> rendering.Response:
        return rendering.Response(status=201, payload=await super()._serve_create(request))

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        if request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return None
        return copy.deepcopy(self._objects[key].raw)


def _check_version(current: dict[str, Any], wanted: str | None, request: rendering.Request) -> None:
    have = (current.get("metadata") or {}).get("resourceVersion")
    if wanted is not None and str(wanted) != have:
        raise ConflictError(
            message=(
                f'Operation cannot be fulfilled on {request.resource.plural} "{request.name}": '
                "the object has been modified; please apply your changes to the latest version "
                "and try again"
            ),
        )


def _with_data(request: rendering.Request, data: Any) -> rendering.Request:
    """The same request (KMock matches requests by identity) carrying the server-stamped body.

    The recorded request then shows what was stored (the new resourceVersion, uid), not the
    client's precondition: assert on outcomes (409, stored labels), not on request bodies.
    """
    object.__setattr__(request, "data", data)  # Request is a frozen attrs class
    return request


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
