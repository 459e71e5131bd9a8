"""``kongtask cron add|update|remove|list|history|run``: cron items and history at run time.

Items added here are stored in the database (kongtask's ``_kongtask_cron_items``)
and scheduled by every kongtask cron node on the schema within seconds; ``run``
starts a cron node on its own (a :class:`kongtask.Scheduler`, no job worker).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime

from kongtask.db.timestamps import format_utc
from kongtask.ops.cli.arguments import ArgumentParser
from kongtask.worker_utils import WorkerUtils

__all__ = ["main"]


def _iso(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}") from exc
    if when.utcoffset() is None:
        raise argparse.ArgumentTypeError(f"give a time zone (e.g. Z): {text!r}")
    return when


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask cron", description="Manage stored cron items and read the cron history."
    )
    parser.add_argument("-c", "--connection", metavar="URL", help="PostgreSQL connection string")
    parser.add_argument("-s", "--schema", metavar="NAME", help="schema holding the queue")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = commands.add_parser("add", help="store a cron item given as one crontab line")
    add.add_argument("line", metavar="LINE", help="e.g. '0 4 * * * daily-report ?max=3'")
    update = commands.add_parser("update", help="replace the stored item with LINE's identifier")
    update.add_argument("line", metavar="LINE")
    remove = commands.add_parser("remove", help="remove a stored item")
    remove.add_argument("identifier", metavar="ID")
    commands.add_parser("list", help="list the stored items")
    history = commands.add_parser("history", help="recorded firings, newest first")
    history.add_argument("identifier", metavar="ID", nargs="?")
    history.add_argument("--since", type=_iso, metavar="TIME", help="ISO-8601, inclusive")
    history.add_argument("--until", type=_iso, metavar="TIME", help="ISO-8601, exclusive")
    history.add_argument("-n", "--limit", type=int, default=20, metavar="N", help="default 20")
    run = commands.add_parser("run", help="run a cron node (a Scheduler) until SIGINT/SIGTERM")
    run.add_argument("--crontab", metavar="FILE", help="a crontab file (SIGHUP re-reads it)")
    run.add_argument(
        "--no-backfill", action="store_true", help="never backfill on this node (see README)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the cron command group; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.command == "run":
        return _run(args)
    if args.command == "history" and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        if args.command == "add":
            stored = utils.add_cron_item(args.line)
            print(f"added {stored.identifier}: {stored.line}")
        elif args.command == "update":
            stored = utils.update_cron_item(args.line)
            print(f"updated {stored.identifier}: {stored.line}")
        elif args.command == "remove":
            if not utils.remove_cron_item(args.identifier):
                print(f"kongtask: no stored cron item {args.identifier!r}", file=sys.stderr)
                return 1
            print(f"removed {args.identifier}")
        elif args.command == "list":
            items = utils.list_cron_items()
            for stored in items:
                print(f"{stored.identifier}\t{stored.line}")
            print(f"{len(items)} stored item(s)")
        else:
            runs = utils.cron_history(args.identifier, args.since, args.until, args.limit)
            for run in runs:
                parts = [
                    format_utc(run.scheduled_at, "%Y-%m-%dT%H:%M:%SZ"),
                    run.identifier,
                    run.outcome + (f" ({run.rule})" if run.rule else ""),
                    f"job {run.job_id}" if run.job_id is not None else "no job",
                    f"{run.duration_s:.3f}s" if run.duration_s is not None else "-",
                    "backfilled" if run.backfilled else "on time",
                    f"node {run.node}",
                ]
                if run.error:
                    parts.append(f"error: {run.error.splitlines()[0][:200]}")
                print("  ".join(parts))
            if not runs:
                print("no recorded firings")
    return 0


def _run(args: argparse.Namespace) -> int:
    from kongtask.scheduler import Scheduler

    scheduler = Scheduler(
        connection_string=args.connection,
        schema=args.schema,
        crontab_file=args.crontab,
        backfill_on_start=not args.no_backfill,
        install_signal_handlers=True,
    )
    scheduler.start()
    print(f"kongtask cron node {scheduler.node_name} running; Ctrl-C stops it", flush=True)
    while not scheduler.wait(0.5):  # short waits keep the main thread handling signals
        pass
    return 0
