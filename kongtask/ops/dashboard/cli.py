"""``kongtask dashboard``: serve the web dashboard until interrupted."""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from kongtask.ops.cli.arguments import ArgumentParser
from kongtask.ops.cli.jobs import load_cron_items
from kongtask.ops.dashboard.app import source_lines
from kongtask.ops.dashboard.server import DashboardServer

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask dashboard",
        description="Serve the web dashboard (uvicorn; needs kongtask[dashboard]): jobs with "
        "search and bulk actions, running jobs, cron, pools and crashes.",
    )
    parser.add_argument("-c", "--connection", metavar="URL", help="PostgreSQL connection string")
    parser.add_argument("-s", "--schema", metavar="NAME", help="schema holding the queue")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="H",
        help="address to listen on (default 127.0.0.1; any other needs --token)",
    )
    parser.add_argument("--port", type=int, default=8000, metavar="N", help="default 8000")
    parser.add_argument(
        "--token",
        metavar="T",
        default=os.environ.get("KONGTASK_DASHBOARD_TOKEN"),
        help="require this token (at least 8 characters; open /?token=T once); "
        "default $KONGTASK_DASHBOARD_TOKEN",
    )
    parser.add_argument(
        "--crontab", metavar="FILE", help="crontab whose items to show (default: ./crontab)"
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the dashboard; returns the exit code once interrupted."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    items = load_cron_items(args.crontab)
    crontab = args.crontab or ("crontab" if items else None)
    lines = source_lines(Path(crontab).read_text("utf-8"), items) if crontab else {}
    server = DashboardServer(
        args.connection,
        schema=args.schema,
        host=args.host,
        port=args.port,
        token=args.token,
        cron_items=items,
        cron_lines=lines,
    )
    with server:
        print(f"kongtask dashboard on {server.url}", flush=True)
        stop = threading.Event()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0
