"""``kongtask admin ...``: operator commands on a live queue.

``force-unlock POOL_ID...`` releases what the named pools hold (the operator
knows they are dead). ``unlock-dead`` finds such pools itself from the
liveness records (``_kongtask_pools``): every kongtask pool heartbeats there,
so a kongtask pool id that holds locks but has no record, or one whose
heartbeat is older than the bound, belongs to a worker that died (SIGKILL, a
lost host) without giving its jobs back. ``pg_stat_activity`` is never asked:
behind pgbouncer it shows whichever client's ``application_name`` came last.
Live pools release dead ones by themselves within the same bound; this
command is for a fleet with no live pool, or for the impatient.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from kongtask.db.statements import Queries
from kongtask.ops.cli.arguments import ArgumentParser, positive_seconds
from kongtask.settings import ConnectionSettings
from kongtask.worker_utils import WorkerUtils

__all__ = ["DeadPool", "find_dead_pools", "main"]

_WARNING = (
    "Only kongtask pools keep liveness records; a Node graphile-worker's pool ids "
    "never do, so they are ignored unless you pass --include-foreign, and then every "
    "one of them looks dead. Use --include-foreign on kongtask-only fleets, or check "
    "the list before passing --yes."
)

#: A kongtask pool whose heartbeat is older than this is dead (the worker default).
DEFAULT_DEAD_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class DeadPool:
    """A lock holder with no live session: its id and what it still holds."""

    pool_id: str
    jobs: int
    queues: int
    locked_since: Any


def find_dead_pools(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    include_foreign: bool = False,
    dead_after_s: float = DEFAULT_DEAD_AFTER_S,
) -> list[DeadPool]:
    """Lock holders that are not live kongtask pools, by their liveness records.

    A kongtask pool is live while its heartbeat is younger than
    ``dead_after_s`` seconds (database time). Callers should re-check before
    acting (``unlock-dead`` does the check and the unlock in one transaction).
    """
    params = {"any_holder": include_foreign, "dead_after_s": dead_after_s}
    rows = conn.execute(Queries(schema).dead_pools, params).fetchall()
    return [DeadPool(row[0], row[1], row[2], row[3]) for row in rows]


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="kongtask admin", description="Administer the queue.")
    parser.add_argument("-c", "--connection", metavar="URL", help="PostgreSQL connection string")
    parser.add_argument("-s", "--schema", metavar="NAME", help="schema holding the queue")
    parser.add_argument(
        "--connect-timeout",
        type=positive_seconds("--connect-timeout"),
        default=None,
        metavar="SECONDS",
        help="give up opening the database connection after this long (default 10)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    unlock = commands.add_parser(
        "force-unlock",
        help="release the jobs and queues locked by these pool ids (workers known to be dead)",
    )
    unlock.add_argument("pool_ids", nargs="+", metavar="POOL_ID")
    dead = commands.add_parser(
        "unlock-dead",
        help="list kongtask pool ids that hold locks but have no live heartbeat; "
        "release their jobs and queues with --yes",
        description="Find lock holders with no live liveness record. " + _WARNING,
    )
    dead.add_argument(
        "--dead-after",
        type=positive_seconds("--dead-after"),
        default=DEFAULT_DEAD_AFTER_S,
        metavar="SECONDS",
        help="a pool whose last heartbeat is older than this is dead (default 60, the "
        "workers' pool_dead_after_s)",
    )
    dead.add_argument(
        "--yes", action="store_true", help="unlock them (without it, only list the candidates)"
    )
    dead.add_argument(
        "--include-foreign",
        action="store_true",
        help="also consider lock holders whose ids kongtask did not generate (Node pools)",
    )
    return parser


def _unlock_dead(utils: WorkerUtils, args: argparse.Namespace) -> int:
    schema = utils.schema
    with utils.connection() as conn:
        candidates = find_dead_pools(
            conn, schema, include_foreign=args.include_foreign, dead_after_s=args.dead_after
        )
        if not candidates:
            print("No dead pools hold locks")
            return 0
        for pool in candidates:
            print(
                f"{pool.pool_id}: {pool.jobs} job(s), {pool.queues} queue(s), "
                f"locked since {pool.locked_since}"
            )
        if not args.yes:
            print(f"{len(candidates)} dead pool id(s); run again with --yes to unlock them")
            print(f"Note: {_WARNING}", file=sys.stderr)
            return 0
        # Re-check inside the transaction that unlocks, so a pool that came
        # back in between (a reconnect) keeps its jobs.
        with conn.transaction():
            again = find_dead_pools(
                conn, schema, include_foreign=args.include_foreign, dead_after_s=args.dead_after
            )
            wanted = {pool.pool_id for pool in candidates}
            ids = [pool.pool_id for pool in again if pool.pool_id in wanted]
            if ids:
                conn.execute(Queries(schema).force_unlock_workers, {"worker_ids": ids})
    print(f"Unlocked jobs and queues held by {len(ids)} dead pool id(s)")
    return 0


def main(argv: Sequence[str]) -> int:
    """Run the admin command group; returns the exit code."""
    args = _parser().parse_args(list(argv))
    settings = ConnectionSettings(
        connect_timeout_s=args.connect_timeout or ConnectionSettings().connect_timeout_s
    )
    with WorkerUtils(args.connection, schema=args.schema, connection_settings=settings) as utils:
        if args.command == "force-unlock":
            utils.force_unlock_workers(args.pool_ids)
            print(f"Unlocked jobs and queues held by {len(args.pool_ids)} pool id(s)")
        elif args.command == "unlock-dead":
            return _unlock_dead(utils, args)
    return 0
