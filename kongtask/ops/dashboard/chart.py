"""The dashboard's chart: jobs finished and failed per minute over the last hour, as inline SVG.

Completed jobs are deleted from the jobs table, so the database keeps no
record of them; PostgreSQL's statistics do count the deletions
(``n_tup_del``), and :class:`ThroughputSampler` turns samples of that
counter into per-minute figures from the moment the dashboard started.
Failures come straight from the table (jobs whose latest failure fell in
each minute).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from datetime import datetime, timedelta
from html import escape

__all__ = ["ThroughputSampler", "render_chart"]

MINUTE = timedelta(minutes=1)
#: Minutes shown in the chart.
WINDOW_MINUTES = 60


def floor_minute(when: datetime) -> datetime:
    """``when`` with seconds and microseconds cut off."""
    return when.replace(second=0, microsecond=0)


class ThroughputSampler:
    """Keeps (time, deleted-rows counter) samples for the last hour and a bit."""

    def __init__(self) -> None:
        self._samples: deque[tuple[datetime, int]] = deque()
        self._lock = threading.Lock()

    def add(self, when: datetime, total: int) -> None:
        """Record the counter's value at ``when`` (the database clock)."""
        with self._lock:
            if self._samples and total < self._samples[-1][1]:
                self._samples.clear()  # statistics were reset: start over
            self._samples.append((when, total))
            while self._samples and self._samples[0][0] < when - (WINDOW_MINUTES + 2) * MINUTE:
                self._samples.popleft()

    @property
    def since(self) -> datetime | None:
        """When the oldest kept sample was taken."""
        with self._lock:
            return self._samples[0][0] if self._samples else None

    def per_minute(self) -> dict[datetime, int]:
        """Rows deleted in each minute between samples (a gap's count goes to its end minute)."""
        with self._lock:
            samples = list(self._samples)
        result: dict[datetime, int] = {}
        for (_, before), (when, after) in itertools.pairwise(samples):
            if after > before:
                minute = floor_minute(when)
                result[minute] = result.get(minute, 0) + after - before
        return result


def render_chart(
    now: datetime,
    finished: dict[datetime, int],
    failed: dict[datetime, int],
    *,
    width: int = 720,
    height: int = 160,
) -> str:
    """An SVG bar chart of the last hour: finished (green) and failed (red) jobs per minute."""
    end = floor_minute(now)
    minutes = [end - (WINDOW_MINUTES - 1 - i) * MINUTE for i in range(WINDOW_MINUTES)]
    peak = max([1, *(finished.get(m, 0) for m in minutes), *(failed.get(m, 0) for m in minutes)])
    left, bottom, top = 36, 20, 8
    plot_w, plot_h = width - left - 4, height - bottom - top
    slot = plot_w / WINDOW_MINUTES
    bar = max(1.0, slot / 2 - 0.5)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="Jobs finished and failed per minute, last hour">',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 4}" y2="{top + plot_h}" '
        'stroke="#999" stroke-width="1"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" font-size="10">{peak}</text>',
        f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end" font-size="10">0</text>',
    ]
    for index, minute in enumerate(minutes):
        x = left + index * slot
        for offset, count, colour, label in (
            (0.0, finished.get(minute, 0), "#2f9e44", "finished"),
            (bar, failed.get(minute, 0), "#e03131", "failed"),
        ):
            if count:
                h = plot_h * count / peak
                parts.append(
                    f'<rect x="{x + offset:.1f}" y="{top + plot_h - h:.1f}" width="{bar:.1f}" '
                    f'height="{h:.1f}" fill="{colour}"><title>{escape(minute.strftime("%H:%M"))}'
                    f" UTC: {count} {label}</title></rect>"
                )
        if index % 10 == 0:
            parts.append(
                f'<text x="{x:.1f}" y="{height - 6}" font-size="10">'
                f"{escape(minute.strftime('%H:%M'))}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)
