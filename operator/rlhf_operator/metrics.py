"""Operator metrics in Prometheus format (`prometheus_client`), derived from status transitions.

The reconcile code calls ONE function where it writes a job's status::

    metrics.observe_transition(old_status, new_status, body)

and every job-level metric follows from comparing the two statuses (the KubeRay operator does the
same in `emitRayJobMetrics`). Because the inputs are the persisted old status and the new one,
an operator restart re-observes nothing: a stage that already had its RayJob is not counted twice.

Two events are not visible in one job's status and have their own call:
``observe_pool_expiry()`` (the warm-pool timer deleted an expired cluster) and
``count_reconcile_errors`` (a decorator on the reconcile entry point). ``forget_job()`` drops a
deleted job from the jobs-by-phase gauge.

Metrics (all prefixed ``rlhf_operator_``):

==========================================  =========  =====================================
``jobs{phase}``                              gauge      RLHFJobs the operator sees, by phase
``jobs_finished_total{phase}``               counter    jobs that ended Succeeded / Failed
``stage_duration_seconds{stage,state}``      histogram  first attempt start -> stage end
``stage_retries_total{stage}``               counter    attempts started after a failure
``warm_pool_hits_total``                     counter    jobs whose claimed warm cluster got ready
``warm_pool_misses_total``                   counter    jobs whose own new cluster got ready
``warm_pool_expiries_total``                 counter    warm clusters deleted, unclaimed
``reconcile_errors_total{error}``            counter    exceptions escaping a reconcile
``apply_to_first_rayjob_seconds``            histogram  creationTimestamp -> first RayJob
``reconciles_total{phase}``                  counter    reconciles run, by the job's phase
``leader``                                   gauge      1: this replica holds the Lease and acts
==========================================  =========  =====================================

Each ``OperatorMetrics`` owns a ``CollectorRegistry`` (not the process-global one), so tests get
isolated instances; the module-level functions use the operator's default instance.
"""

from __future__ import annotations

import copy
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import generate_latest
from pydantic import BaseModel

from rlhf_operator import names
from rlhf_operator.api.spec import STAGE_ORDER
from rlhf_operator.api.status import TERMINAL_PHASES, Phase, is_terminal
from rlhf_operator.api.timestamps import parse_time

DEFAULT_METRICS_PORT = 9090
"""Port of the operator's /metrics endpoint (`rlhf-operator --metrics-port`; 0 disables it)."""

PREFIX = "rlhf_operator"
PHASES: tuple[str, ...] = get_args(Phase)
FINISHED_STAGE_STATES = frozenset({"Succeeded", "Failed"})

# Stages run minutes to days; provisioning a GPU cluster takes seconds to an hour.
STAGE_DURATION_BUCKETS = (60, 300, 900, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800)
APPLY_TO_RAYJOB_BUCKETS = (5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)

Status = Mapping[str, Any] | BaseModel | None
F = TypeVar("F", bound=Callable[..., Any])


class OperatorMetrics:
    """The operator's metrics on their own registry, and the transition logic that feeds them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge(
            f"{PREFIX}_jobs", "RLHFJobs seen by the operator, by phase.", ["phase"], registry=r
        )
        self.jobs_finished = Counter(
            f"{PREFIX}_jobs_finished",
            "RLHFJobs that finished, by final phase.",
            ["phase"],
            registry=r,
        )
        self.stage_duration = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Wall time of a stage from its first attempt's start to its end (retries included).",
            ["stage", "state"],
            buckets=STAGE_DURATION_BUCKETS,
            registry=r,
        )
        self.stage_retries = Counter(
            f"{PREFIX}_stage_retries",
            "Stage attempts started after a failed one (resumes excluded).",
            ["stage"],
            registry=r,
        )
        self.pool_hits = Counter(
            f"{PREFIX}_warm_pool_hits",
            "Jobs whose claimed warm Ray cluster turned ready.",
            registry=r,
        )
        self.pool_misses = Counter(
            f"{PREFIX}_warm_pool_misses",
            "Jobs whose newly created Ray cluster turned ready.",
            registry=r,
        )
        self.pool_expiries = Counter(
            f"{PREFIX}_warm_pool_expiries",
            "Warm Ray clusters deleted after keepAliveSeconds unclaimed.",
            registry=r,
        )
        self.reconcile_errors = Counter(
            f"{PREFIX}_reconcile_errors",
            "Exceptions escaping a reconcile, by type.",
            ["error"],
            registry=r,
        )
        self.apply_to_first_rayjob = Histogram(
            f"{PREFIX}_apply_to_first_rayjob_seconds",
            "Time from the RLHFJob's creation to its first stage RayJob.",
            buckets=APPLY_TO_RAYJOB_BUCKETS,
            registry=r,
        )
        self.reconciles = Counter(
            f"{PREFIX}_reconciles",
            "Reconciles run, by the job's phase (finished jobs run none unless they change).",
            ["phase"],
            registry=r,
        )
        self.leader = Gauge(
            f"{PREFIX}_leader",
            "1 on the replica that holds the leader-election Lease and acts, 0 on a standby.",
            registry=r,
        )
        self.leader.set(1)  # without leader election the one replica acts
        self._phases: dict[tuple[str, str], str] = {}
        self._last: dict[tuple[str, str], Mapping[str, Any]] = {}
        self._lock = threading.Lock()  # kopf runs handlers concurrently; the phase map is shared
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        # Known label values start at 0, so rate() and alerts see a series before the first event.
        for stage in STAGE_ORDER:
            self.stage_retries.labels(stage)
        for phase in TERMINAL_PHASES:
            self.jobs_finished.labels(phase)

    # ------------------------------------------------------------------ the one reconcile call

    def observe_transition(
        self,
        old_status: Status,
        new_status: Status,
        job: Mapping[str, Any] | BaseModel,
        now: datetime | None = None,
    ) -> None:
        """Update every job-level metric from one status write (old -> new) of `job`.

        Statuses may be wire dicts (camelCase, as in the API; kopf's own keys are ignored) or
        `RLHFJobStatus` models; `job` is the RLHFJob body (for name, namespace and
        creationTimestamp). Calling it with old == new is harmless and keeps the phase gauge
        right for jobs the operator resumes after a restart.

        The baseline is the last status observed for the job when there is one, else `old`:
        a reconcile that reads a stale body (the watch has not delivered the previous write
        yet) and writes the same transition again counts nothing twice.
        """
        now = now or datetime.now(UTC)
        # a model is dumped into a new dict; a wire dict is the caller's: keep a copy
        new = (
            _wire(new_status)
            if isinstance(new_status, BaseModel)
            else copy.deepcopy(dict(_wire(new_status)))
        )
        body = _wire(job)
        meta = body.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")

        phase = new.get("phase") or "Pending"
        with self._lock:
            old = self._last.get(key) or _wire(old_status)
            self._last[key] = new
            self._set_phase(key, phase)
        if is_terminal(phase) and old.get("phase") != phase:
            self.jobs_finished.labels(phase).inc()

        old_stages, new_stages = old.get("stages") or {}, new.get("stages") or {}
        for stage, st in new_stages.items():
            before = old_stages.get(stage) or {}
            self._observe_stage(stage, before, st, now)

        # A hit or a miss is decided when the job's cluster turns ready: a claim can lose a race
        # and fall back to another cluster, so the cluster first recorded proves nothing.
        if _cluster_ready(new) and not _cluster_ready(old):
            reused = (new.get("cluster") or {}).get("reused")
            (self.pool_hits if reused else self.pool_misses).inc()

        had_rayjob = any((s or {}).get("rayJob") for s in old_stages.values())
        first = [s for s in new_stages.values() if (s or {}).get("rayJob")]
        created = parse_time(meta.get("creationTimestamp"))
        if first and not had_rayjob and created is not None:
            started = min((parse_time(s.get("startTime")) or now) for s in first)
            self.apply_to_first_rayjob.observe(max((started - created).total_seconds(), 0.0))

    def _observe_stage(
        self, stage: str, old: Mapping[str, Any], new: Mapping[str, Any], now: datetime
    ) -> None:
        retries = _retries(new) - _retries(old)
        if retries > 0:
            self.stage_retries.labels(stage).inc(retries)
        state = new.get("state")
        if state in FINISHED_STAGE_STATES and old.get("state") != state:
            start = parse_time(new.get("startTime"))
            end = parse_time(new.get("completionTime")) or now
            if start is not None:
                self.stage_duration.labels(stage, state).observe(
                    max((end - start).total_seconds(), 0.0)
                )

    # ------------------------------------------------------------------ other events

    def forget_job(self, namespace: str, name: str) -> None:
        """Drop a deleted job from the jobs-by-phase gauge."""
        with self._lock:
            self._set_phase((namespace, name), None)
            self._last.pop((namespace, name), None)

    def observe_reconcile(self, phase: str) -> None:
        """One reconcile of a job in `phase` starts."""
        self.reconciles.labels(phase).inc()

    def set_leader(self, leading: bool) -> None:
        """This replica took (True) or lost / waits for (False) the leader-election Lease."""
        self.leader.set(1 if leading else 0)

    def observe_pool_expiry(self, count: int = 1) -> None:
        """The warm-pool timer deleted `count` expired clusters."""
        self.pool_expiries.inc(count)

    def observe_reconcile_error(self, error: BaseException) -> None:
        """A reconcile raised `error` (labelled by its class name: bounded cardinality)."""
        self.reconcile_errors.labels(type(error).__name__).inc()

    def count_reconcile_errors(self, fn: F) -> F:
        """Decorator (sync or async): count exceptions escaping `fn`, then re-raise them."""
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:
                    self.observe_reconcile_error(exc)
                    raise

            return awrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                self.observe_reconcile_error(exc)
                raise

        return wrapper  # type: ignore[return-value]

    # ------------------------------------------------------------------ exposition

    def exposition(self) -> bytes:
        """The text exposition format, as served on /metrics."""
        return generate_latest(self.registry)

    def start_server(self, port: int = DEFAULT_METRICS_PORT, addr: str = "0.0.0.0") -> Any:
        """Serve /metrics on `addr:port` from a daemon thread; returns the WSGI server."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        return server

    def _set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Move one job between phases (None: gone): only the two gauges that change, not a
        count over every job (a reconcile per event of a thousand jobs would make it O(n²))."""
        before = self._phases.pop(key, None)
        if phase is not None:
            self._phases[key] = phase
        if before == phase:
            return
        if before is not None:
            self.jobs.labels(before).dec()
        if phase is not None:
            self.jobs.labels(phase).inc()


def _cluster_ready(status: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == names.COND_CLUSTER_READY and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def _retries(stage: Mapping[str, Any]) -> int:
    """Attempts started after a failure: each retry follows a failure, while a resume after
    suspension is a new attempt without one (so it is no retry)."""
    return max(min((stage.get("attempts") or 0) - 1, stage.get("failures") or 0), 0)


def _wire(obj: Mapping[str, Any] | BaseModel | None) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    return obj


# ---------------------------------------------------------------------- the operator's instance

METRICS = OperatorMetrics()
"""The instance the running operator uses (and its /metrics endpoint serves)."""


def observe_transition(
    old_status: Status, new_status: Status, job: Mapping[str, Any] | BaseModel
) -> None:
    """See `OperatorMetrics.observe_transition` (on the operator's instance)."""
    METRICS.observe_transition(old_status, new_status, job)


def forget_job(namespace: str, name: str) -> None:
    """See `OperatorMetrics.forget_job`."""
    METRICS.forget_job(namespace, name)


def observe_pool_expiry(count: int = 1) -> None:
    """See `OperatorMetrics.observe_pool_expiry`."""
    METRICS.observe_pool_expiry(count)


def count_reconcile_errors(fn: F) -> F:
    """Decorator: see `OperatorMetrics.count_reconcile_errors` (operator's instance)."""
    return METRICS.count_reconcile_errors(fn)


def start_metrics_server(port: int = DEFAULT_METRICS_PORT, addr: str = "0.0.0.0") -> Any:
    """Serve the operator's metrics on http://addr:port/metrics (daemon thread)."""
    return METRICS.start_server(port, addr)
