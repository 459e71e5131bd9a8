"""``kongtask admin ...``: operator commands on a live queue."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .worker_utils import WorkerUtils

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kongtask admin", description="Administer the queue.")
    parser.add_argument("-c", "--connection", metavar="URL", help="PostgreSQL connection string")
    parser.add_argument("-s", "--schema", metavar="NAME", help="schema holding the queue")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    unlock = commands.add_parser(
        "force-unlock",
        help="release the jobs and queues locked by these pool ids (workers known to be dead)",
    )
    unlock.add_argument("pool_ids", nargs="+", metavar="POOL_ID")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run the admin command group; returns the exit code."""
    args = _parser().parse_args(list(argv))
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        if args.command == "force-unlock":
            utils.force_unlock_workers(args.pool_ids)
            print(f"Unlocked jobs and queues held by {len(args.pool_ids)} pool id(s)")
    return 0
