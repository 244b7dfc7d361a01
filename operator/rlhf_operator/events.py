"""Kubernetes Events on an RLHFJob, posted by kopf's event poster (batched, retried, async)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from rlhf_operator.reconcile.model import Event

MESSAGE_LIMIT = 1024  # the API server truncates longer Event messages anyway


def post(body: Mapping[str, Any], event: Event) -> None:
    """Queue one Event about `body` (safe from kopf's worker threads)."""
    message = event.message
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 1] + "…"
    kopf.event(body, type=event.type, reason=event.reason, message=message)
