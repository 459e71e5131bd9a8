"""The dashboard's charts: jobs finished and failed per minute over the last hour, as inline SVG.

Completed jobs are deleted from the jobs table, so the figures come from the
per-minute counts kongtask pools write with their heartbeat
(``_kongtask_task_stats``, see :mod:`kongtask.jobs.stats`): true from the
first page load, for every pool that ran in the hour.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Any

__all__ = ["TaskThroughput", "render_chart", "task_throughput"]

MINUTE = timedelta(minutes=1)
#: Minutes shown in the chart.
WINDOW_MINUTES = 60


def floor_minute(when: datetime) -> datetime:
    """``when`` with seconds and microseconds cut off."""
    return when.replace(second=0, microsecond=0)


@dataclass(frozen=True)
class TaskThroughput:
    """One task's last hour, from the pools' per-minute statistics."""

    task: str
    finished: int
    failed: int
    latency_mean_s: float | None
    latency_max_s: float | None


def task_throughput(stats: Sequence[Mapping[str, Any]]) -> list[TaskThroughput]:
    """Per task over the rows of dashboard_task_stats: totals and pickup latency, busiest first."""
    totals: dict[str, list[float]] = {}
    maxima: dict[str, float | None] = {}
    for row in stats:
        entry = totals.setdefault(row["task"], [0, 0, 0.0, 0])
        entry[0] += row["finished"]
        entry[1] += row["failed"]
        if row["latency_mean_s"] is not None:
            entry[2] += row["latency_mean_s"] * row["latency_count"]
            entry[3] += row["latency_count"]
        if row["latency_max_s"] is not None:
            maxima[row["task"]] = max(row["latency_max_s"], maxima.get(row["task"]) or 0.0)
    rows = [
        TaskThroughput(
            task=task,
            finished=int(finished),
            failed=int(failed),
            latency_mean_s=latency_sum / count if count else None,
            latency_max_s=maxima.get(task),
        )
        for task, (finished, failed, latency_sum, count) in totals.items()
    ]
    rows.sort(key=lambda row: (-(row.finished + row.failed), row.task))
    return rows


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
