"""The dashboard's pages as HTML fragments; every value is escaped on the way in.

Action buttons are POST forms carrying the per-process CSRF token in a hidden
field (see :mod:`kongtask.ops.dashboard.app`); nothing here changes anything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from typing import Any
from urllib.parse import urlencode

from kongtask.db.timestamps import OutOfRangeTimestamp, format_utc
from kongtask.ops.status import JOB_STATES, CronStatus, JobInfo, PoolInfo, StateCounts, StatusReport

__all__ = [
    "cron_section",
    "failing_section",
    "job_detail",
    "jobs_page",
    "overview",
]


def e(value: Any) -> str:
    """``value`` as escaped HTML text (``-`` for None)."""
    return "-" if value is None else escape(str(value), quote=True)


def when(value: datetime | None, now: datetime | None = None) -> str:
    """A UTC time, with how long ago / from now when ``now`` is given (not for ``infinity``)."""
    if value is None:
        return '<span class="muted">-</span>'
    text = format_utc(value, "%Y-%m-%d %H:%M:%S")
    if now is None or isinstance(value, OutOfRangeTimestamp):
        return e(text)
    seconds = (value - now).total_seconds()
    return f'{e(text)} <span class="muted">({e(_relative(seconds))})</span>'


def _relative(seconds: float) -> str:
    size = abs(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if size >= length:
            amount = f"{size / length:.0f}{unit}"
            break
    else:
        amount = f"{size:.0f}s"
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


class Forms:
    """Builds the POST forms of the actions, all carrying the CSRF token."""

    def __init__(self, base: str, csrf: str, back: str) -> None:
        self.base = base
        self.csrf = csrf
        self.back = back

    def button(self, action: str, label: str, fields: Mapping[str, Any], extra: str = "") -> str:
        hidden = "".join(
            f'<input type="hidden" name="{e(name)}" value="{e(value)}">'
            for name, value in {**fields, "csrf": self.csrf, "next": self.back}.items()
        )
        return (
            f'<form class="inline" method="post" action="{e(self.base)}/actions/{e(action)}">'
            f'{hidden}{extra}<button type="submit" name="do" value="{e(action)}">'
            f"{e(label)}</button></form>"
        )

    def cancel(self, info: JobInfo) -> str:
        """The Cancel button (with an optional reason) of a job that has not failed for good."""
        if info.state == "failed":
            return ""
        return self.button(
            "cancel",
            "Cancel",
            {"job_id": info.job.id},
            '<input type="text" name="reason" placeholder="reason (optional)" size="12" '
            'maxlength="1000"> ',
        )

    def job_actions(self, info: JobInfo) -> str:
        job = info.job
        if info.state == "running":
            # Only a cancel applies: it asks the pool holding the job to abort it.
            return '<span class="muted">running</span> ' + self.cancel(info)
        buttons = [self.button("retry", "Retry now", {"job_id": job.id})]
        if info.state != "failed":
            buttons.append(
                self.button(
                    "fail",
                    "Fail",
                    {"job_id": job.id},
                    '<input type="text" name="reason" placeholder="reason" size="10" required>',
                )
            )
        if job.key:
            buttons.append(self.button("remove", "Remove", {"key": job.key}))
        if info.state != "failed":
            buttons.append(self.cancel(info))
        return " ".join(buttons)


def _counts_table(title: str, groups: Sequence[StateCounts], base: str, param: str) -> str:
    if not groups:
        return f'<p class="muted">No {e(title.lower())}.</p>'
    head = "".join(f"<th>{e(state)}</th>" for state in JOB_STATES)
    rows = []
    for group in groups:
        link = f"{base}/jobs?{urlencode({param: group.name or ''})}"
        cells = "".join(f'<td class="n">{getattr(group, state)}</td>' for state in JOB_STATES)
        rows.append(
            f'<tr><td><a href="{e(link)}">{e(group.name)}</a></td>{cells}'
            f'<td class="n">{group.total}</td></tr>'
        )
    return (
        f"<table><thead><tr><th>{e(title)}</th>{head}<th>total</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def overview(
    report: StatusReport,
    *,
    base: str,
    chart: str,
    chart_since: datetime | None,
    failing: str,
    pools: str,
    cron: str,
) -> str:
    """The overview page: counts, chart, tasks, queues, failing jobs, pools, cron."""
    cards = "".join(
        f'<div class="card state-{e(state)}"><a href="{e(base)}/jobs?state={e(state)}">'
        f'<b data-state="{e(state)}">{getattr(report.totals, state)}</b>{e(state)}</a></div>'
        for state in JOB_STATES
    )
    since = (
        f"finished jobs counted since {when(chart_since)} UTC"
        if chart_since is not None
        else "finished jobs are counted from now on"
    )
    locked = {queue.queue_name: queue for queue in report.locked_queues}
    queue_rows = _counts_table("Named queue", report.queues, base, "queue")
    if locked:
        queue_rows += (
            "<p>Locked: "
            + ", ".join(
                f"{e(name)} by <code>{e(q.locked_by)}</code> since {when(q.locked_at, report.now)}"
                for name, q in locked.items()
            )
            + "</p>"
        )
    return (
        f'<div class="cards" id="totals">{cards}</div>'
        '<section id="chart"><h2>Last hour</h2>'
        '<div class="legend"><span class="swatch" style="background:#2f9e44"></span>finished'
        '<span class="swatch" style="background:#e03131"></span>failed '
        f'<span class="muted">({since})</span></div>{chart}</section>'
        f'<section id="tasks"><h2>Tasks</h2>'
        f"{_counts_table('Task', report.tasks, base, 'task')}</section>"
        f'<section id="queues"><h2>Named queues</h2>{queue_rows}</section>'
        f'<section id="failing"><h2>Failing and failed jobs</h2>{failing}</section>'
        f'<section id="pools"><h2>Pools</h2>{pools}</section>'
        f'<section id="cron"><h2>Cron</h2>{cron}</section>'
    )


def jobs_table(infos: Sequence[JobInfo], forms: Forms, base: str, now: datetime) -> str:
    """Jobs with their state, attempts, timing, last error and actions."""
    if not infos:
        return '<p class="muted">No jobs.</p>'
    rows = []
    for info in infos:
        job = info.job
        error = (job.last_error or "").splitlines()[0][:120] if job.last_error else ""
        rows.append(
            f'<tr data-job-id="{job.id}"><td><a href="{e(base)}/jobs/{job.id}">{job.id}</a></td>'
            f"<td>{e(job.task_identifier)}</td><td>{e(info.queue_name)}</td>"
            f'<td class="state">{e(info.state)}</td>'
            f'<td class="n">{job.attempts}/{job.max_attempts}</td>'
            f'<td>{when(job.run_at, now)}</td><td class="err">{e(error) if error else ""}</td>'
            f"<td>{forms.job_actions(info)}</td></tr>"
        )
    return (
        "<table><thead><tr><th>id</th><th>task</th><th>queue</th><th>state</th>"
        "<th>attempts</th><th>run at (UTC)</th><th>last error</th><th></th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def failing_section(infos: Sequence[JobInfo], forms: Forms, base: str, now: datetime) -> str:
    """The retrying and permanently failed jobs, newest failure first."""
    ordered = sorted(infos, key=lambda info: info.job.updated_at, reverse=True)
    return jobs_table(ordered, forms, base, now)


def jobs_page(
    infos: Sequence[JobInfo],
    forms: Forms,
    *,
    base: str,
    now: datetime,
    filters: Mapping[str, str | None],
    limit: int,
) -> str:
    """The job list with its filter form."""
    options = "".join(
        f'<option value="{e(state)}"{" selected" if filters.get("state") == state else ""}>'
        f"{e(state)}</option>"
        for state in ("", *JOB_STATES)
    )
    form = (
        f'<form method="get" action="{e(base)}/jobs">'
        f'task <input type="text" name="task" value="{e(filters.get("task") or "")}" size="14"> '
        f'queue <input type="text" name="queue" value="{e(filters.get("queue") or "")}" '
        f'size="14"> state <select name="state">{options}</select> '
        '<button type="submit">Filter</button></form>'
    )
    note = (
        f'<p class="muted">Showing the first {limit} jobs, oldest run_at first.</p>'
        if len(infos) >= limit
        else ""
    )
    return (
        f"<section>{form}</section><section>{note}{jobs_table(infos, forms, base, now)}</section>"
    )


def job_detail(info: JobInfo, forms: Forms) -> str:
    """One job: every column, its error and the actions that apply."""
    job = info.job
    extra = info.extra
    now = extra.get("now")
    rows = [
        ("state", e(info.state)),
        ("task", e(job.task_identifier)),
        ("queue", e(info.queue_name)),
        ("key", e(job.key)),
        ("priority", e(job.priority)),
        ("attempts", f"{job.attempts} of {job.max_attempts} ({extra.get('attempts_left')} left)"),
        ("run at", when(job.run_at, now)),
        ("created at", when(job.created_at, now)),
        ("updated at", when(job.updated_at, now)),
        (
            "locked by",
            e(job.locked_by) + (" since " + when(job.locked_at, now) if job.locked_at else ""),
        ),
        ("flags", e(", ".join(sorted(job.flags)) if job.flags else None)),
        ("revision", e(job.revision)),
    ]
    import json

    table = "".join(f"<tr><th>{e(name)}</th><td>{value}</td></tr>" for name, value in rows)
    payload = json.dumps(job.payload, indent=2, ensure_ascii=False, default=str)
    error = f'<pre class="err">{e(job.last_error)}</pre>' if job.last_error else "<p>-</p>"
    actions = ""
    if info.state == "running":
        actions = f"{_RUNNING_NOTE}<p>{forms.cancel(info)}</p>"
    else:
        actions = (
            f"<p>{forms.job_actions(info)}</p><p>"
            + forms.button(
                "reschedule",
                "Reschedule",
                {"job_id": job.id},
                '<input type="text" name="at" placeholder="+1h, now or 2030-01-01T10:00Z" '
                'size="24" required> ',
            )
            + "</p>"
        )
    return (
        f'<section id="job"><table>{table}</table></section>'
        f"<section><h2>Last error</h2>{error}</section>"
        f"<section><h2>Payload</h2><pre>{e(payload)}</pre></section>"
        f'<section id="actions"><h2>Actions</h2>{actions}</section>'
    )


_RUNNING_NOTE = (
    '<p class="muted">The job is running: Cancel asks the pool holding it to abort it; '
    "the other actions apply once it stops.</p>"
)


def pools_section(
    pools: Sequence[PoolInfo], dead: Iterable[Any], forms: Forms, now: datetime
) -> str:
    """Live (and recently stale) pools from their heartbeat, and dead lock holders."""
    parts = []
    if pools:
        rows = "".join(
            f"<tr><td><code>{e(p.pool_id)}</code></td><td>{e(p.hostname)}</td>"
            f'<td class="n">{p.pid}</td><td class="n">{p.concurrency}</td>'
            f"<td>{when(p.started_at, now)}</td><td>{when(p.last_seen, now)}</td>"
            f"<td>{'live' if p.live else '<span class=err>not seen lately</span>'}</td></tr>"
            for p in pools
        )
        parts.append(
            "<table><thead><tr><th>pool</th><th>host</th><th>pid</th><th>concurrency</th>"
            f"<th>started</th><th>last seen</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        )
    else:
        parts.append('<p class="muted">No pool has sent a heartbeat.</p>')
    dead = list(dead)
    if dead:
        rows = "".join(
            f'<tr><td><code>{e(d.pool_id)}</code></td><td class="n">{d.jobs}</td>'
            f'<td class="n">{d.queues}</td><td>{when(d.locked_since, now)}</td>'
            f"<td>{forms.button('unlock', 'Unlock', {'pool_id': d.pool_id})}</td></tr>"
            for d in dead
        )
        parts.append(
            '<h2>Dead pools holding locks</h2><p class="muted">kongtask pool ids that hold '
            "jobs or queues but have no recent heartbeat.</p>"
            "<table><thead><tr><th>pool</th><th>jobs</th><th>queues</th><th>locked since</th>"
            f"<th></th></tr></thead><tbody>{rows}</tbody></table>"
        )
    return "".join(parts)


def _history_rows(history: Sequence[Any]) -> str:
    rows = []
    for run in history:
        data: Mapping[str, Any]
        if dataclasses.is_dataclass(run) and not isinstance(run, type):
            data = dataclasses.asdict(run)
        elif isinstance(run, Mapping):
            data = run
        elif hasattr(run, "_asdict"):
            data = run._asdict()
        else:
            data = {"run": run}
        rows.append(
            "<li>"
            + ", ".join(
                f"{e(k)}: {when(v) if isinstance(v, datetime) else e(v)}" for k, v in data.items()
            )
            + "</li>"
        )
    return f"<ul>{''.join(rows)}</ul>" if rows else '<p class="muted">No past runs.</p>'


def cron_section(
    items: Sequence[CronStatus], now: datetime, history: Sequence[Any] | None = None
) -> str:
    """Cron items with their last and next firings (and past runs when the history exists)."""
    if not items:
        body = '<p class="muted">No cron items (start the dashboard with --crontab FILE).</p>'
    else:
        rows = "".join(
            f"<tr><td>{e(c.identifier)}</td><td>{e(c.task)}</td><td><code>{e(c.spec)}</code></td>"
            f"<td>{when(c.last_execution, now)}</td><td>{when(c.next_firing, now)}</td></tr>"
            for c in items
        )
        body = (
            "<table><thead><tr><th>identifier</th><th>task</th><th>item</th>"
            "<th>last firing</th><th>next firing</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
        )
    if history is not None:
        body += f"<h2>Past runs</h2>{_history_rows(history)}"
    return body
