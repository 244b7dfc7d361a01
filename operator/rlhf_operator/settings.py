"""How the operator runs inside kopf: storage of kopf's own state, workers, resync interval."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from rlhf_operator import kube, names

RESYNC_INTERVAL = float(os.environ.get("RLHF_RESYNC_INTERVAL", "60"))
"""Seconds after which a running job is reconciled even though nothing woke it (a safety net
for a lost watch event: changes of the job and its children wake it at once, see wake.py).
Finished jobs have no resync."""

ERROR_BACKOFF = float(os.environ.get("RLHF_ERROR_BACKOFF", "1"))
"""Seconds before a reconcile that raised is retried; doubled per failure, up to the resync."""

EXPLAIN_INTERVAL = float(os.environ.get("RLHF_EXPLAIN_INTERVAL", "30"))
"""Seconds between two reads of a waiting cluster's pods and Events (why it is not ready). Pods
and Events do not wake a job (wake.py watches only the job and its Ray children), so a job
waiting for its cluster also wakes at this interval; many jobs queued for GPUs cost the API
server little."""

FINALIZER_WAIT = float(os.environ.get("RLHF_FINALIZER_WAIT", "30"))
"""Seconds a new job's first reconcile waits for kopf's finalizer to land (wake.py): the
write that would race it is refused anyway (a refused write and a read per job). The
finalizer's own watch event ends the wait, within milliseconds on a real API server. With a
thousand jobs applied at once kopf's patches took seconds (bench/operator_scale.py): capped
at 10 s, 1.9 refused writes per job, clusters created p99 34 s after apply and first RayJobs
p99 13.6 s after ready; at 30 s, none refused, 42 s and 5.2 s. A finalizer that never comes
only delays the job."""

WORKERS = int(os.environ.get("RLHF_WORKERS", "16"))
"""Threads running the (synchronous) reconciles; each API call blocks one for milliseconds.
Twice: reactions to events, and new jobs' first reconciles (handlers.configure)."""

RESUME_WORKERS = int(os.environ.get("RLHF_RESUME_WORKERS", "4"))
"""Threads running the first reconcile of jobs that started before this operator (a new
leader resumes every job at once)."""


WAKE_HANDLERS = ("job_changed", "raycluster_changed", "rayjob_changed", "progress_changed")


class NoChangeDetection(kopf.DiffBaseStorage):
    """kopf's diff-base ("last handled configuration") without the cost: an essence that never
    changes, stored nowhere.

    kopf keeps the diff-base for on.create / on.update / on.resume handlers, and the operator
    has none (tests/operator/test_events.py checks it): the daemon reconciles the whole job
    whatever changed, and on.delete is told by `deletionTimestamp`, not by a diff. kopf's
    annotation storage would still deep-copy every RLHFJob on every watch event to build one,
    and write it once per new job: a patch, its watch event coming back, and a conflict (409)
    with the job's first reconcile writing at the same moment. With a constant essence every
    event that is not a deletion is a no-op change for kopf.
    """

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return {}

    def fetch(self, *, body: Any) -> Any:
        return {}

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        pass


class _QuietWakeups(logging.Filter):
    """Drop kopf's "Handler 'rayjob_changed' succeeded." lines: the wake-up handlers run on
    every watch event of every job and child (thousands a minute on a busy cluster) and only
    set a flag; their failures are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.endswith("succeeded.") and any(f"'{h}'" in message for h in WAKE_HANDLERS)
        )


def configure(settings: kopf.OperatorSettings) -> None:
    """Apply the operator's settings and connect its API client (kopf's startup handler)."""
    kube.configure()
    kube.preload()
    quiet = logging.getLogger("kopf.objects")
    if not any(isinstance(f, _QuietWakeups) for f in quiet.filters):
        quiet.addFilter(_QuietWakeups())
    # kopf's own progress lives in annotations: our status schema is strict, and the API server
    # would prune a `status.kopf` it does not know.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = NoChangeDetection()
    settings.persistence.finalizer = names.FINALIZER
    settings.posting.level = logging.INFO  # Normal events (StageStarted...) are posted too
    settings.execution.max_workers = WORKERS
    # A timer caught mid-reconcile by a deletion finishes within milliseconds; kopf's default
    # re-check after 60 s would hold the deletion that long.
    settings.background.cancellation_polling = 1
