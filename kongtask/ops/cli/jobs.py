"""``kongtask status`` and ``kongtask jobs ...``: see and steer the queue from the shell.

A thin layer over ``WorkerUtils.status()``, ``list_jobs()``, ``get_job()``,
``retry_jobs()``, ``permanently_fail_jobs()``, ``remove_job()`` and
``reschedule_jobs()`` and ``cancel_job()``: every listing takes ``--json`` for scripts. Actions
print what they changed and exit with status 1 when some job could not be
changed (it is running, or does not exist), naming those jobs.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kongtask.cron.options import time_phrase_to_timedelta
from kongtask.cron.source import CrontabSource
from kongtask.cron.types import ParsedCronItem
from kongtask.db.timestamps import WRITABLE_YEARS, format_utc, unwritable
from kongtask.errors import ConfigurationError, CrontabError
from kongtask.job import Job
from kongtask.ops.cli.arguments import ArgumentParser
from kongtask.ops.status import JOB_STATES, JobInfo, StateCounts, StatusReport, dumps
from kongtask.worker_utils import WorkerUtils

__all__ = ["jobs_main", "parse_time", "status_main"]

#: Cancel outcomes that did what was asked (exit status 0).
_DONE = ("cancelled", "signalled")
_RELATIVE = re.compile(r"^\+(?P<phrase>[0-9smhdw]+)$")


def parse_time(text: str, *, now: datetime | None = None, name: str = "--at") -> datetime:
    """``now``, ``+1h30m`` (from now) or an ISO 8601 time (UTC if it has no offset).

    ``name`` is what error messages call the value (a flag or a form field).
    A time after year 9999 in UTC is refused: it could not be read back.
    """
    current = now or datetime.now(UTC)
    if text == "now":
        return current
    relative = _RELATIVE.match(text)
    if relative:
        try:
            return current + time_phrase_to_timedelta(relative.group("phrase"))
        except CrontabError as exc:
            raise ConfigurationError(f"{name}: {exc}", name=name, value=text) from None
        except OverflowError:
            raise ConfigurationError(
                f"{name}: {text} from now is after year 9999 in UTC; {WRITABLE_YEARS}",
                name=name,
                value=text,
            ) from None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"{name} expects 'now', '+DURATION' (like +1h30m) or an ISO 8601 time, got {text!r}",
            name=name,
            value=text,
        ) from None
    when = when if when.utcoffset() is not None else when.replace(tzinfo=UTC)
    reason = unwritable(when)
    if reason is not None:
        raise ConfigurationError(f"{name}: {reason}", name=name, value=text)
    return when


def _connection_args(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # On a subcommand too (suppressed defaults keep the group's value), so both
    # ``kongtask jobs -c URL list`` and ``kongtask jobs list -c URL`` work.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument(
        "-c", "--connection", metavar="URL", default=default, help="PostgreSQL connection string"
    )
    parser.add_argument(
        "-s", "--schema", metavar="NAME", default=default, help="schema holding the queue"
    )


def load_cron_items(crontab: str | None) -> list[ParsedCronItem]:
    """The items of ``crontab`` (a file; ``./crontab`` when present and none is given)."""
    if crontab is None:
        if not Path("crontab").is_file():
            return []
        crontab = "crontab"
    return CrontabSource(file=Path(crontab)).load()


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return format_utc(value, "%Y-%m-%d %H:%M:%S UTC")


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _counts_rows(groups: Sequence[StateCounts]) -> list[list[Any]]:
    return [[g.name, *(getattr(g, s) for s in JOB_STATES), g.total] for g in groups]


def render_status(report: StatusReport) -> str:
    """The status report as the text ``kongtask status`` prints."""
    headers = [s.upper() for s in JOB_STATES] + ["TOTAL"]
    out = [f"Queue at {_when(report.now)}", ""]
    totals = StateCounts("(all tasks)", **{s: getattr(report.totals, s) for s in JOB_STATES})
    out += _table(["TASK", *headers], [*_counts_rows(report.tasks), *_counts_rows([totals])])
    out.append("")
    if report.queues:
        out += _table(["QUEUE", *headers], _counts_rows(report.queues))
    else:
        out.append("Named queues: none")
    out.append("")
    if report.locked_queues:
        out.append("Locked queues:")
        out += [
            f"  {q.queue_name} by {q.locked_by} since {_when(q.locked_at)}"
            for q in report.locked_queues
        ]
    else:
        out.append("Locked queues: none")
    if report.running_by_pool:
        out.append("Running jobs by pool:")
        out += [f"  {pool}: {count}" for pool, count in report.running_by_pool.items()]
    out.append("")
    if report.pools:
        out += _table(
            ["LIVE POOL", "HOST", "PID", "CONCURRENCY", "RUNNING", "STUCK", "STARTED", "LAST SEEN"],
            [
                [
                    *(p.pool_id, p.hostname, p.pid, p.concurrency, p.running, p.stuck_threads),
                    *(_when(p.started_at), _when(p.last_seen)),
                ]
                for p in report.pools
            ],
        )
    else:
        out.append("Live pools: none")
    out.append("")
    if report.cron:
        out += _table(
            ["CRON ITEM", "TASK", "LAST FIRING", "NEXT FIRING"],
            [
                [c.identifier, c.task or "-", _when(c.last_execution), _when(c.next_firing)]
                for c in report.cron
            ],
        )
    else:
        out.append("Cron items: none")
    return "\n".join(out)


def render_jobs(infos: Sequence[JobInfo]) -> str:
    """One line per job, as ``kongtask jobs list`` prints them."""
    if not infos:
        return "No jobs"
    rows = []
    for info in infos:
        job = info.job
        error = (job.last_error or "").splitlines()[0][:60] if job.last_error else ""
        rows.append(
            [
                job.id,
                job.task_identifier,
                info.queue_name or "-",
                info.state,
                f"{job.attempts}/{job.max_attempts}",
                _when(job.run_at),
                error,
            ]
        )
    headers = ["ID", "TASK", "QUEUE", "STATE", "ATTEMPTS", "RUN AT", "LAST ERROR"]
    return "\n".join(_table(headers, rows))


def render_job(info: JobInfo) -> str:
    """Every field of one job, as ``kongtask jobs show`` prints it."""
    job = info.job
    extra = info.extra
    lines = [
        f"id:            {job.id}",
        f"task:          {job.task_identifier}",
        f"state:         {info.state}",
        f"queue:         {info.queue_name or '-'}",
        f"key:           {job.key or '-'}",
        f"priority:      {job.priority}",
        f"attempts:      {job.attempts} of {job.max_attempts}"
        + (f" ({extra['attempts_left']} left)" if "attempts_left" in extra else ""),
        f"run at:        {_when(job.run_at)}",
        f"created at:    {_when(job.created_at)}",
        f"updated at:    {_when(job.updated_at)}",
        f"locked by:     {job.locked_by or '-'}"
        + (f" since {_when(job.locked_at)}" if job.locked_at else ""),
        f"flags:         {', '.join(sorted(job.flags)) if job.flags else '-'}",
        f"revision:      {job.revision}",
        f"payload:       {dumps(job.payload)}",
        "last error:    " + (job.last_error.replace("\n", "\n  ") if job.last_error else "-"),
    ]
    return "\n".join(lines)


def _status_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask status",
        description="Show the queue: jobs per task and named queue by state, locked queues, "
        "live pools and cron items with their last and next firing.",
    )
    _connection_args(parser)
    parser.add_argument(
        "--crontab",
        metavar="FILE",
        help="crontab whose items to show with their next firing (default: ./crontab if present)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    return parser


def status_main(argv: Sequence[str]) -> int:
    """Run ``kongtask status``; returns the exit code."""
    args = _status_parser().parse_args(list(argv))
    items = load_cron_items(args.crontab)
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        report = utils.status(cron_items=items)
    print(dumps(report) if args.json else render_status(report))
    return 0


def _jobs_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kongtask jobs", description="List and act on jobs.")
    _connection_args(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="list jobs, oldest run_at first")
    listing.add_argument("--task", metavar="T", help="only jobs of this task")
    listing.add_argument("--queue", metavar="Q", help="only jobs in this named queue")
    listing.add_argument("--state", choices=JOB_STATES, help="only jobs in this state")
    listing.add_argument(
        "--limit", type=int, default=100, metavar="N", help="at most N jobs (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = commands.add_parser("show", help="show one job: row, last error, attempts, timing")
    show.add_argument("job_id", type=int, metavar="ID")
    show.add_argument("--json", action="store_true", help="print JSON")
    retry = commands.add_parser("retry", help="run jobs now (a failed job gets one more attempt)")
    retry.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    fail = commands.add_parser("fail", help="fail jobs permanently")
    fail.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    fail.add_argument("--reason", required=True, help="stored as the jobs' last error")
    cancel = commands.add_parser(
        "cancel",
        help="cancel a job: a waiting one fails permanently now, a running one is told to "
        "abort and fails permanently when its handler ends",
    )
    cancel.add_argument("job_id", type=_job_id, metavar="ID")
    cancel.add_argument("--reason", help="stored in the last error as 'cancelled: REASON'")
    cancel.add_argument("--json", action="store_true", help="print the result as JSON")
    remove = commands.add_parser("remove", help="delete the jobs holding these job keys")
    remove.add_argument("keys", nargs="+", metavar="KEY")
    reschedule = commands.add_parser("reschedule", help="change when jobs run")
    reschedule.add_argument("job_ids", type=int, nargs="+", metavar="ID")
    reschedule.add_argument(
        "--at",
        required=True,
        metavar="TIME",
        help="'now', '+DURATION' (like +1h30m) or an ISO 8601 time (UTC without an offset)",
    )
    for sub in (retry, fail, remove, reschedule):
        sub.add_argument("--json", action="store_true", help="print the changed jobs as JSON")
    for sub in (listing, show, retry, fail, cancel, remove, reschedule):
        _connection_args(sub, sub=True)
    return parser


def _job_id(text: str) -> int:
    """A job id argument: a positive integer (argparse prints the error)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"a job id is a positive integer, got {text!r}")
    return value


def _report(
    verb: str,
    asked: Sequence[Any],
    changed: Sequence[Job],
    as_json: bool,
    key: Callable[[Job], Any],
) -> int:
    done = {key(job) for job in changed}
    missed = [item for item in asked if item not in done]
    if as_json:
        print(dumps({"changed": list(changed), "not_changed": missed}))
    else:
        print(f"{verb} {len(done)} of {len(asked)} job(s)" + (f": {_join(done)}" if done else ""))
        if missed:
            print(
                f"Not changed (running, or no such job): {_join(missed)}",
                file=sys.stderr,
            )
    return 1 if missed else 0


def _join(items: Any) -> str:
    return ", ".join(str(item) for item in sorted(items, key=str))


def jobs_main(argv: Sequence[str]) -> int:
    """Run ``kongtask jobs ...``; returns the exit code."""
    parser = _jobs_parser()
    args = parser.parse_args(list(argv))
    at = parse_time(args.at) if args.command == "reschedule" else None
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        if args.command == "list":
            infos = utils.list_jobs(
                task=args.task, queue=args.queue, state=args.state, limit=args.limit
            )
            print(dumps(infos) if args.json else render_jobs(infos))
            return 0
        if args.command == "show":
            info = utils.get_job(args.job_id)
            if info is None:
                print(f"kongtask: error: no job with id {args.job_id}", file=sys.stderr)
                return 1
            print(dumps(info) if args.json else render_job(info))
            return 0

        def by_id(job: Job) -> Any:
            return job.id

        if args.command == "retry":
            changed = utils.retry_jobs(args.job_ids)
            return _report("Retrying now", args.job_ids, changed, args.json, by_id)
        if args.command == "fail":
            changed = utils.permanently_fail_jobs(args.job_ids, args.reason)
            return _report("Failed permanently", args.job_ids, changed, args.json, by_id)
        if args.command == "cancel":
            result = utils.cancel_job(args.job_id, args.reason)
            if args.json:
                print(dumps(result))
            else:
                print(result.describe(), file=sys.stdout if result.outcome in _DONE else sys.stderr)
            return 0 if result.outcome in _DONE else 1
        if args.command == "reschedule":
            changed = utils.reschedule_jobs(args.job_ids, run_at=at)
            return _report(f"Rescheduled to {_when(at)}", args.job_ids, changed, args.json, by_id)
        removed = [job for job in (utils.remove_job(key) for key in args.keys) if job is not None]
        return _report("Removed", args.keys, removed, args.json, lambda job: job.key)
