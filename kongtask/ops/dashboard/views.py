"""Filters the dashboard's Jinja2 templates use to lay values out (times, durations, JSON).

Each returns text for autoescaping, or :class:`~markupsafe.Markup` built from
escaped parts only.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from markupsafe import Markup, escape

from kongtask.db.timestamps import OutOfRangeTimestamp, format_utc

__all__ = ["duration", "firstline", "pretty", "when"]


def when(value: datetime | None, now: datetime | None = None) -> Markup:
    """A UTC time, with how long ago / from now when ``now`` is given (not for ``infinity``)."""
    if value is None:
        return Markup('<span class="muted">-</span>')
    text = format_utc(value, "%Y-%m-%d %H:%M:%S")
    if now is None or isinstance(value, OutOfRangeTimestamp):
        return escape(text)
    seconds = (value - now).total_seconds()
    relative = _relative(seconds)
    return Markup('{} <span class="muted">({})</span>').format(text, relative)


def duration(seconds: object) -> str:
    """A duration for people: ``850 ms``, ``12.3 s``, ``4m 05s``, ``2h 10m`` (else ``-``)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def pretty(value: Any) -> str:
    """JSON indented for reading (non-ASCII kept)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def firstline(text: str | None, width: int = 120) -> str:
    """The first line of ``text``, cut at ``width`` characters."""
    return text.splitlines()[0][:width] if text else ""


def _relative(seconds: float) -> str:
    size = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if size >= length:
            amount = f"{size / length:.0f}{unit}"
            break
    else:
        amount = f"{size:.0f}s"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"
