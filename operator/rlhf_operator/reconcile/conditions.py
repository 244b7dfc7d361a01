"""Status helpers, pure: Kubernetes-style conditions, RFC 3339 times, the minimal status patch."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rlhf_operator.api.status import Condition, ConditionStatus, RLHFJobStatus
from rlhf_operator.api.timestamps import format_time as timestamp
from rlhf_operator.api.timestamps import parse_time

__all__ = ["get_condition", "parse_time", "set_condition", "status_patch", "timestamp"]


def get_condition(status: RLHFJobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def set_condition(
    status: RLHFJobStatus,
    type_: str,
    value: ConditionStatus,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None = None,
) -> None:
    """Set a condition in place; `lastTransitionTime` moves only when its status flips."""
    current = get_condition(status, type_)
    if current is None:
        status.conditions.append(
            Condition(
                type=type_,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=timestamp(now),
                observed_generation=generation,
            )
        )
        return
    if current.status != value:
        current.last_transition_time = timestamp(now)
    current.status, current.reason, current.message = value, reason, message
    current.observed_generation = generation


def status_patch(old: RLHFJobStatus | None, new: RLHFJobStatus) -> dict[str, Any]:
    """The JSON merge-patch (RFC 7386) from `old` to `new`: only what changed, None = removed.

    Fields the trainer reports (progress, metrics) are carried over unchanged from `old` and so
    never appear here: a status write cannot clobber a concurrent progress report.
    """
    before = old.to_wire() if old is not None else {}
    return _diff(before, new.to_wire())


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            nested = _diff(old[key], value)
            if nested:
                patch[key] = nested
        elif value != old[key]:
            patch[key] = value
    for key in old.keys() - new.keys():
        patch[key] = None
    return patch
