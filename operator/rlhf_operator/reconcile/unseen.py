"""Children the operator created that its watch has not shown yet.

kopf's indexes are fed by watches: a RayCluster or RayJob the operator just created reaches
them a moment later (milliseconds on an idle API server, seconds behind a burst of a thousand
jobs). A reconcile in that gap (woken by the job's own status write coming back, say) would
not see the child it just made: it would create it again (409), and say "Creating ..." once
more in status. Kubernetes controllers hold the same "expectations" (the ReplicaSet
controller's `ControllerExpectations`); here, the answer of the create stands in for the
watched object until the watch shows that object, or for `TTL` seconds at most (a watch event
lost: the index is then trusted again, as before).

Process-local and per operator run (kopf's memo): a new leader starts with none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

TTL = 60.0
"""Seconds an unseen creation stands in for its watched object at most."""

Key = tuple[str | None, str | None]


class Unseen:
    """(namespace, name) -> the observation of a child created by this process, per kind
    (e.g. "rayclusters"), until the kind's watch shows an object of that name."""

    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()  # written by reconcile threads, read by the event loop
        self._created: dict[str, dict[Key, tuple[float, Any]]] = {}

    def created(self, kind: str, namespace: str | None, name: str, observation: Any) -> None:
        with self._lock:
            self._created.setdefault(kind, {})[(namespace, name)] = (time.monotonic(), observation)

    def seen(self, kind: str, namespace: str | None, name: str | None) -> None:
        """The watch showed an object of that name (any event): the index knows it now."""
        with self._lock:
            self._created.get(kind, {}).pop((namespace, name), None)

    def overlay(self, kind: str, index: Mapping[Key, Any]) -> Mapping[Key, Any]:
        """`index`, with the unseen creations of `kind` where it has no object of their name."""
        with self._lock:
            created = self._created.get(kind)
            if not created:
                return index
            now = time.monotonic()
            for key in [k for k, (at, _) in created.items() if now - at > self.ttl]:
                del created[key]
            extra = {key: (observation,) for key, (_, observation) in created.items()}
        return _Overlay(index, extra) if extra else index

    def __len__(self) -> int:
        with self._lock:
            return sum(len(c) for c in self._created.values())


class _Overlay(Mapping[Key, Any]):
    """A read-only view: the index's entry for a key, else the unseen creation's."""

    def __init__(self, index: Mapping[Key, Any], extra: dict[Key, Any]) -> None:
        self._index = index
        self._extra = extra

    def __getitem__(self, key: Key) -> Any:
        found = self._index.get(key)
        if found:
            return found
        return self._extra[key]

    def __iter__(self) -> Iterator[Key]:
        yield from self._index
        yield from (key for key in self._extra if not self._index.get(key))

    def __len__(self) -> int:
        return sum(1 for _ in self)
