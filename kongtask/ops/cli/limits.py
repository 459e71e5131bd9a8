"""``kongtask limits set|clear|list``, ``kongtask pause|resume`` and ``kongtask pauses``.

Fleet-wide limits and pauses from the shell: a thin layer over
``WorkerUtils.set_limit()``, ``clear_limit()``, ``list_limits()``, ``pause()``,
``resume()`` and ``list_pauses()``. Every kongtask pool on the schema applies a
change within about two seconds; a Node graphile-worker ignores them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from kongtask.jobs.limits import LimitInfo, PauseInfo
from kongtask.ops.cli.arguments import ArgumentParser
from kongtask.ops.cli.jobs import render_limit_table, render_pause_table
from kongtask.ops.status import dumps
from kongtask.worker_utils import WorkerUtils

__all__ = ["limits_main", "pause_main"]

T = TypeVar("T")


def _connection_options(parser: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # Accepted before and after the subcommand; the subcommand's own only when given.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument(
        "-c", "--connection", metavar="URL", help="PostgreSQL connection string", default=default
    )
    parser.add_argument(
        "-s", "--schema", metavar="NAME", help="schema holding the queue", default=default
    )


def _key_options(parser: argparse.ArgumentParser, *, flag: bool = True) -> None:
    parser.add_argument("task", metavar="TASK", nargs="?", help="a task identifier")
    parser.add_argument("--queue", metavar="NAME", help="a named queue instead of TASK")
    if flag:
        parser.add_argument("--flag", metavar="VALUE", help="a job flag value instead of TASK")


def _listing(rows: Sequence[T], as_json: bool, render: Callable[[Sequence[T]], list[str]]) -> int:
    """Print a listing as JSON or as the table ``render`` makes; exit code 0."""
    print(dumps(rows) if as_json else "\n".join(render(rows)))
    return 0


def _describe(kind: str, key: str) -> str:
    return f"{kind} {key!r}"


def _limits_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask limits",
        description="Fleet-wide concurrency and rate limits (kongtask pools only).",
    )
    _connection_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    set_ = commands.add_parser("set", help="limit a task, --queue or --flag")
    _key_options(set_)
    set_.add_argument("--concurrency", type=int, metavar="N", help="at most N jobs at once")
    set_.add_argument("--rate", metavar="N/s", help="at most N starts per s, m or h (e.g. 10/s)")
    clear = commands.add_parser("clear", help="remove the limit on a task, --queue or --flag")
    _key_options(clear)
    listing = commands.add_parser("list", help="list the limits and how many run now")
    listing.add_argument("--json", action="store_true", help="print JSON")
    for command in (set_, clear, listing):
        _connection_options(command, sub=True)
    return parser


def limits_main(argv: Sequence[str]) -> int:
    """Run ``kongtask limits ...``; returns the exit code."""
    args = _limits_parser().parse_args(list(argv))
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        if args.command == "list":
            return _listing(utils.list_limits(), args.json, render_limit_table)
        keys = {"queue": args.queue, "flag": args.flag}
        if args.command == "set":
            limit: LimitInfo = utils.set_limit(
                args.task, **keys, concurrency=args.concurrency, rate=args.rate
            )
            parts = []
            if limit.concurrency is not None:
                parts.append(f"concurrency {limit.concurrency}")
            if limit.rate is not None:
                parts.append(f"rate {limit.rate}")
            print(f"limited {_describe(limit.key_kind, limit.key)}: {', '.join(parts)}")
            return 0
        if not utils.clear_limit(args.task, **keys):
            print("kongtask: no such limit", file=sys.stderr)
            return 1
        print("cleared")
        return 0


def _pause_parser(command: str) -> argparse.ArgumentParser:
    what = {
        "pause": "Pause a task or --queue on every kongtask pool (jobs stay queued).",
        "resume": "Resume a paused task or --queue.",
        "pauses": "List the paused tasks and queues, with who paused them and when.",
    }[command]
    parser = ArgumentParser(prog=f"kongtask {command}", description=what)
    _connection_options(parser)
    if command == "pauses":
        parser.add_argument("--json", action="store_true", help="print JSON")
    else:
        _key_options(parser, flag=False)
    if command == "pause":
        parser.add_argument("--by", metavar="NAME", help="who pauses (default user@host/pid)")
    return parser


def pause_main(command: str, argv: Sequence[str]) -> int:
    """Run ``kongtask pause``, ``resume`` or ``pauses``; returns the exit code."""
    args = _pause_parser(command).parse_args(list(argv))
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        if command == "pauses":
            return _listing(utils.list_pauses(), args.json, render_pause_table)
        if command == "pause":
            paused: PauseInfo = utils.pause(args.task, queue=args.queue, by=args.by)
            print(
                f"paused {_describe(paused.key_kind, paused.key)} "
                f"(by {paused.paused_by} since {paused.paused_at.isoformat()})"
            )
            return 0
        if not utils.resume(args.task, queue=args.queue):
            print("kongtask: it was not paused", file=sys.stderr)
            return 1
        print("resumed")
        return 0
