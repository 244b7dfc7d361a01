"""Pure text helpers shared by the renderer and the hints: durations, bars, sparklines."""

from __future__ import annotations

from collections.abc import Sequence

SPARK_CHARS = "▁▂▃▄▅▆▇█"
BAR_FULL, BAR_EMPTY = "█", "░"


def duration(seconds: float | None) -> str:
    """Compact, kubectl-style: 45s, 12m05s, 3h07m, 2d04h; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def bar(percent: float | None, width: int = 20) -> str:
    """A progress bar of `width` cells for 0..100 percent."""
    filled = round(max(0.0, min(percent or 0.0, 100.0)) / 100 * width)
    return BAR_FULL * filled + BAR_EMPTY * (width - filled)


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """One character per value (resampled to at most `width`), scaled min..max."""
    if not values:
        return ""
    if len(values) > width:
        values = [values[round(i * (len(values) - 1) / (width - 1))] for i in range(width)]
    low, high = min(values), max(values)
    span = high - low
    top = len(SPARK_CHARS) - 1
    if span == 0:
        return SPARK_CHARS[top // 2] * len(values)
    return "".join(SPARK_CHARS[round((v - low) / span * top)] for v in values)


def number(value: float | None) -> str:
    """A metric value: 4 significant digits, scientific for tiny/huge ones."""
    if value is None:
        return "-"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.2e}"
    return f"{value:.4g}"
