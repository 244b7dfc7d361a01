"""RFC 3339 timestamps as Kubernetes writes them ("2026-05-01T12:00:00Z")."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC, seconds precision (what the API server writes)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any) -> datetime | None:
    """An aware datetime, or None when the value is absent or unreadable (status is user-visible
    data that a hand edit can break; a reader must not crash on it)."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
