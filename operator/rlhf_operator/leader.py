"""Leader election through a Kubernetes Lease (coordination.k8s.io/v1), as client-go does it.

The chart runs two replicas; only the holder of the Lease runs kopf (watches, reconciles,
creates children). The other waits, live and ready, and takes over when the Lease expires
(the leader died) or is released (the leader stopped cleanly: SIGTERM, `helm upgrade`).

Why a Lease and not kopf's peering: kopf's peering is a priority handshake through a
KopfPeering object whose members pause when they see a higher-priority peer. Both start
serving until they have seen each other, and a peer that stops refreshing is dropped only after
its lifetime — there is no atomic claim, so two operators can act at once for a while. A
Lease is claimed by a write with the resourceVersion it was read at (the API server refuses a
second, concurrent claim with 409), and a leader that cannot renew within `renew_deadline`
(shorter than the lease duration) stops acting before anybody else may take over.

The timing (defaults): the leader renews every `retry_period` (1 s); a standby takes over once
it saw the Lease unchanged for `duration` (10 s) measured on its own clock (no clock-skew
assumptions, as client-go); a leader that could not renew for `renew_deadline` (7 s) gives up
(the process exits and is restarted as a standby). A killed leader is replaced within
duration + 2.2 retry periods = 12.2 s; a stopped one at the standby's next try (1 s).

Even if two replicas overlapped, nothing would be created twice: children have deterministic
names and are created if absent (docs/ARCHITECTURE.md §4); the election keeps their work (and API
load) single.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from rlhf_operator import kube

logger = logging.getLogger(__name__)

DEFAULT_LEASE = "rlhf-operator"


@dataclass(frozen=True)
class LeaseConfig:
    namespace: str
    name: str = DEFAULT_LEASE
    identity: str = ""
    duration: float = 10.0
    renew_deadline: float = 7.0
    retry_period: float = 1.0

    def __post_init__(self) -> None:
        if not self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                "leader election needs retry period < renew deadline < lease duration "
                f"(got {self.retry_period}, {self.renew_deadline}, {self.duration})"
            )


def default_identity() -> str:
    """The pod's name (POD_NAME from the downward API), else host + a random suffix."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _micro_time(now: datetime) -> str:
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """One replica's view of the Lease; `try_acquire_or_renew` is one attempt (blocking)."""

    def __init__(
        self,
        config: LeaseConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.identity = config.identity or default_identity()
        self._clock, self._wall = clock, wall
        self._observed: dict[str, Any] | None = None  # the Lease's spec as last seen
        self._observed_at = 0.0  # when it last changed, on our clock
        self.leading = False
        self.renewed_at: float | None = None
        self.contacted = False  # the API answered at least once (readiness)

    def try_acquire_or_renew(self) -> bool:
        """Hold the Lease after this call? Claims it when free or expired, renews it when
        ours; every write is conditional on the version read (409: someone else won)."""
        cfg, now = self.config, self._clock()
        try:
            lease = kube.read_lease(cfg.namespace, cfg.name)
            self.contacted = True
            if lease is None:
                kube.create_lease(cfg.namespace, self._lease({}, None))
                return self._won(now)
            spec = lease.get("spec") or {}
            if spec != self._observed:
                self._observed, self._observed_at = spec, now
            holder = spec.get("holderIdentity") or ""
            duration = spec.get("leaseDurationSeconds") or cfg.duration
            if holder and holder != self.identity and now < self._observed_at + duration:
                self.leading = False
                return False
            kube.patch_lease(cfg.namespace, cfg.name, self._lease(spec, lease))
            return self._won(now)
        except ApiException as exc:
            if exc.status != 409:
                logger.warning("leader election: Lease %s: HTTP %s", cfg.name, exc.status)
            self.leading = False
            return False
        except Exception as exc:  # API unreachable: not leading this round
            logger.warning("leader election: Lease %s unreachable: %s", cfg.name, exc)
            self.leading = False
            return False

    def _won(self, now: float) -> bool:
        if not self.leading:
            logger.info("leader election: %s holds Lease %s", self.identity, self.config.name)
        self.leading, self.renewed_at = True, now
        return True

    def _lease(self, spec: dict[str, Any], stored: dict[str, Any] | None) -> dict[str, Any]:
        now = _micro_time(self._wall())
        ours = spec.get("holderIdentity") == self.identity
        transitions = spec.get("leaseTransitions") or 0
        metadata: dict[str, Any] = {"name": self.config.name, "namespace": self.config.namespace}
        if stored is not None:
            metadata["resourceVersion"] = (stored.get("metadata") or {}).get("resourceVersion")
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.config.duration),
                "acquireTime": spec.get("acquireTime") if ours else now,
                "renewTime": now,
                "leaseTransitions": transitions if ours or stored is None else transitions + 1,
            },
        }

    def deadline_passed(self) -> bool:
        """The leader could not renew within the renew deadline: it must stop acting."""
        return self.renewed_at is None or (
            self._clock() - self.renewed_at > self.config.renew_deadline
        )

    def release(self) -> None:
        """Hand the Lease back (clean stop): a standby takes over at its next try."""
        if not self.leading:
            return
        self.leading = False
        cfg = self.config
        try:
            lease = kube.read_lease(cfg.namespace, cfg.name)
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            released = self._lease(spec, lease)
            released["spec"].update(holderIdentity="", leaseDurationSeconds=1)
            kube.patch_lease(cfg.namespace, cfg.name, released)
            logger.info("leader election: %s released Lease %s", self.identity, cfg.name)
        except Exception as exc:  # it expires by itself
            logger.warning("leader election: could not release Lease %s: %s", cfg.name, exc)


# The Lease's own thread: asyncio.to_thread's default executor is shared (kopf, the pool
# sweep), and a renewal queued behind a burst of reconciles would miss its deadline.
_LEASE_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")


async def _attempt(elector: LeaderElector) -> bool:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_LEASE_THREAD, elector.try_acquire_or_renew)


async def acquire(elector: LeaderElector) -> None:
    """Wait (as a standby) until this replica holds the Lease."""
    period = elector.config.retry_period
    while not await _attempt(elector):
        await asyncio.sleep(period * random.uniform(1.0, 1.2))  # jitter, as client-go


async def keep(elector: LeaderElector, on_lost: Callable[[], None]) -> None:
    """Renew every retry period; past the renew deadline without a renewal, call `on_lost`
    (the operator stops acting) and return.

    The renewals run on the Lease's own thread with its own clock, not on the event loop:
    a loop busy with a burst of watch events (thousands of jobs applied at once) would wake a
    renewal late, and a leader must not lose its Lease to its own reconcile work. The loop
    only watches the deadline: a renewal stuck on a slow API (the client retries) must not
    let this replica act past it.
    """
    loop = asyncio.get_running_loop()
    done = threading.Event()
    lost = asyncio.Event()

    def give_up() -> None:
        if not lost.is_set():
            done.set()  # a renewal still in flight must not make this replica lead again
            logger.error("leader election: %s lost Lease %s", elector.identity, elector.config.name)
            elector.leading = False
            lost.set()

    def renew() -> None:
        while not done.wait(elector.config.retry_period):
            renewed = elector.try_acquire_or_renew()
            if done.is_set():  # given up meanwhile (past the deadline): stays given up
                elector.leading = False
                return
            if renewed:
                continue
            if elector.deadline_passed() or not _still_ours(elector):
                loop.call_soon_threadsafe(give_up)
                return

    renewals = loop.run_in_executor(_LEASE_THREAD, renew)
    try:
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), elector.config.retry_period / 2)
            if elector.deadline_passed():
                give_up()
        on_lost()
    finally:
        done.set()  # the thread ends at its next wake-up (release() queues behind it)
        renewals.cancel()


async def release(elector: LeaderElector) -> None:
    """Hand the Lease back, on the Lease's thread: after the last renewal, never before it."""
    await asyncio.get_running_loop().run_in_executor(_LEASE_THREAD, elector.release)


def _still_ours(elector: LeaderElector) -> bool:
    """A failed renewal within the deadline keeps leadership unless the Lease now names
    someone else (then it was taken: we were too slow)."""
    holder = (elector._observed or {}).get("holderIdentity")
    return holder in (None, "", elector.identity)
