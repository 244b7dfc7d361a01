"""How the operator runs inside kopf: storage of kopf's own state, workers, timer interval."""

from __future__ import annotations

import logging
import os

import kopf

from rlhf_operator import kube, names

RECONCILE_INTERVAL = float(os.environ.get("RLHF_RECONCILE_INTERVAL", "5"))
"""Seconds between two reconciles of a job (its timer); tests shorten it."""

EXPLAIN_INTERVAL = 6 * RECONCILE_INTERVAL
"""Seconds between two reads of a waiting cluster's pods and Events (why it is not ready):
slower than the reconcile, so many jobs queued for GPUs cost the API server little."""

WORKERS = int(os.environ.get("RLHF_WORKERS", "16"))
"""Threads running the (synchronous) reconciles; each API call blocks one for milliseconds."""


def configure(settings: kopf.OperatorSettings) -> None:
    """Apply the operator's settings and connect its API client (kopf's startup handler)."""
    kube.configure()
    # kopf's own progress and diff-base live in annotations: our status schema is strict, and
    # the API server would prune a `status.kopf` it does not know.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = names.FINALIZER
    settings.posting.level = logging.INFO  # Normal events (StageStarted...) are posted too
    settings.execution.max_workers = WORKERS
    # A timer caught mid-reconcile by a deletion finishes within milliseconds; kopf's default
    # re-check after 60 s would hold the deletion that long.
    settings.background.cancellation_polling = 1
