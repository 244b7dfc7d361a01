"""What this operator wrote that its watches have not shown yet.

kopf's indexes and its copy of each job are fed by watches, a moment behind the API server
(milliseconds on an idle one, seconds behind a burst of a thousand jobs). Kubernetes
controllers keep the same two memories (client-go's "expectations" and its mutation cache):

- Children: a RayCluster or RayJob the operator just created reaches the indexes later. A
  reconcile in that gap would not see it: it would create it again (409) and write "Creating
  ..." into status once more. The answer of the create stands in for the watched object until
  the watch shows an object of that name, or for `TTL` seconds at most (a lost watch event:
  the index is then trusted again, as before).
- Jobs: the operator's own write of a job (its pinned spec, its status) comes back as a watch
  event. Reconciling on it decides nothing new (the reconcile that wrote it decided on the same
  children), so it does not wake the job (`echo`); and a reconcile that starts before kopf's
  copy shows the write decides on the job as written (`latest`), not on the copy that write
  replaced, whose own writes would be refused (409) and cost a read.

Process-local and per operator run (kopf's memo): a new leader starts with none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

TTL = 60.0
"""Seconds an unseen creation stands in for its watched object at most."""

Key = tuple[str | None, str | None]


@dataclass
class _Written:
    """A job as this operator last wrote it, and the versions that write superseded."""

    stored: Mapping[str, Any]
    replaced: set[str] = field(default_factory=set)  # versions decided on, then written over
    echoes: set[str] = field(default_factory=set)  # versions that are this operator's writes


class Unseen:
    """Children created and jobs written by this process that the watches have not shown yet:
    per kind (e.g. "rayclusters"), (namespace, name) -> the created child's observation; per
    job uid, its last write."""

    def __init__(self, ttl: float = TTL) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()  # written by reconcile threads, read by the event loop
        self._created: dict[str, dict[Key, tuple[float, Any]]] = {}
        self._jobs: dict[str, _Written] = {}
        self._awaited: dict[tuple[str, str | None, str], tuple[float, set[str]]] = {}
        self._again: set[str] = set()  # job uids whose reconcile asked for another

    # ------------------------------------------------------------------ jobs

    def job_written(self, read: Mapping[str, Any], stored: Mapping[str, Any]) -> None:
        """A write of job `read` (the copy a decision was made on) answered with `stored`."""
        uid, before, after = _uid(stored), _version(read), _version(stored)
        if not uid or not after:
            return
        with self._lock:
            written = self._jobs.setdefault(uid, _Written(stored))
            written.stored = stored
            written.echoes.add(after)
            if before:
                written.replaced.add(before)

    def unsettled(self, stored: Mapping[str, Any]) -> None:
        """The decision behind this write was not carried out as made (a child at our name
        that is not the one we made, a lost claim): its echo would have woken the job, so the
        job decides again at once (`again`)."""
        with self._lock:
            self._again.add(_uid(stored))

    def again(self, uid: str) -> bool:
        """Whether the job's last reconcile asked for another (see `unsettled`); asks once."""
        with self._lock:
            if uid not in self._again:
                return False
            self._again.discard(uid)
            return True

    def latest(self, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The job as last known: this operator's own write of it when `body` (kopf's copy)
        is a version that write replaced, else `body`."""
        with self._lock:
            written = self._jobs.get(_uid(body))
            if written is not None and _version(body) in written.replaced:
                return written.stored
        return body

    def echo(self, body: Mapping[str, Any]) -> bool:
        """Whether a watch event of a job only shows a write of this operator's (its last
        write coming back also ends `latest`'s stand-in: kopf's copy is current again)."""
        uid, version = _uid(body), _version(body)
        with self._lock:
            written = self._jobs.get(uid)
            if written is None or version not in written.echoes:
                return False
            if version == _version(written.stored):
                del self._jobs[uid]
            return True

    def forget_job(self, uid: str) -> None:
        with self._lock:
            self._jobs.pop(uid, None)
            self._again.discard(uid)

    # ------------------------------------------------------------------ children

    def created(self, kind: str, namespace: str | None, name: str, observation: Any) -> None:
        with self._lock:
            self._created.setdefault(kind, {})[(namespace, name)] = (time.monotonic(), observation)

    def seen(self, kind: str, namespace: str | None, name: str | None) -> set[str]:
        """The watch showed an object of that name (any event): the index knows it now.
        Returns the jobs (names) that await that child's next change (`await_change`)."""
        with self._lock:
            self._created.get(kind, {}).pop((namespace, name), None)
            _, jobs = self._awaited.pop((kind, namespace, name or ""), (0.0, set()))
            return jobs

    def await_change(self, kind: str, namespace: str | None, name: str, job: str) -> None:
        """Job `job` found the child at `name` other than its index said (a create refused
        with 409, a claim lost): its next decision needs that child's next change. The
        child's owner and its `rlhf.dev/job` label may be another job's, so nothing else
        would wake this one."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (at, _) in self._awaited.items() if now - at > self.ttl]:
                del self._awaited[key]
            _, jobs = self._awaited.get((kind, namespace, name), (now, set()))
            self._awaited[(kind, namespace, name)] = (now, jobs | {job})

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
            created = sum(len(c) for c in self._created.values())
            return created + len(self._jobs) + len(self._awaited)


def _uid(body: Mapping[str, Any]) -> str:
    return (body.get("metadata") or {}).get("uid") or ""


def _version(body: Mapping[str, Any]) -> str:
    return (body.get("metadata") or {}).get("resourceVersion") or ""


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
