"""``kongtask crontab check|next FILE``: validate a crontab and preview its firings.

``check`` also names the lines that use kongtask's extensions (nicknames, names,
stepped ranges, ``tz``, the rules), which a Node graphile-worker would refuse.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from kongtask.cron import next_fire_times
from kongtask.cron.source import CrontabSource
from kongtask.errors import CrontabError
from kongtask.ops.cli.arguments import ArgumentParser

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask crontab", description="Validate a crontab file or preview its firings."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate FILE; prints one line per item")
    check.add_argument("file", metavar="FILE")
    upcoming = commands.add_parser("next", help="print each item's next N firing times")
    upcoming.add_argument("file", metavar="FILE")
    upcoming.add_argument(
        "-n", type=int, default=5, metavar="N", help="how many firings per item (default 5)"
    )
    return parser


def main(argv: Sequence[str], *, now: datetime | None = None) -> int:
    """Run the crontab command group; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    if args.command == "next" and not 1 <= args.n <= 1000:
        parser.error(f"-n must be between 1 and 1000, got {args.n}")
    try:
        items = CrontabSource(file=Path(args.file)).load()
    except CrontabError as exc:
        where = f" (line {exc.line}" + (f", column {exc.column}" if exc.column else "") + ")"
        print(f"kongtask: invalid crontab{where if exc.line else ''}: {exc}", file=sys.stderr)
        return 1
    if args.command == "check":
        node_refuses: list[str] = []
        for item in items:
            zone = f" tz={item.options.tz}" if item.options.tz else ""
            line = f"line {item.source_line}: " if item.source_line else ""
            note = ""
            if item.extensions:
                note = f"  [kongtask only: {', '.join(item.extensions)}]"
                node_refuses.append(str(item.source_line))
            print(f"{line}{item.identifier} -> task {item.task}{zone}{note}")
        print(f"OK: {len(items)} item(s)")
        if node_refuses:
            print(
                "A Node graphile-worker would refuse line(s) "
                f"{', '.join(node_refuses)} (kongtask extensions)"
            )
        return 0
    start = now or datetime.now(UTC)
    for item in items:
        tz_name = item.options.tz
        tz = ZoneInfo(tz_name) if tz_name else None
        print(f"{item.identifier} ({item.task}{f', tz {tz_name}' if tz_name else ''}):")
        for when in next_fire_times(item, start, args.n):
            utc = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
            local = f"  ({when.astimezone(tz).strftime('%Y-%m-%d %H:%M %Z')})" if tz else ""
            print(f"  {utc}{local}")
    return 0
