"""The ``kongtask`` command: run a worker, migrate, check crontabs, administer.

``kongtask [flags]`` runs a worker with graphile-worker's flags. Command
groups sit beside it: ``kongtask crontab check|next FILE``,
``kongtask cron add|update|remove|list|history|run`` and ``kongtask admin ...``.
Every failure ends with a one-line message on stderr and a non-zero exit code,
never a traceback, for errors we anticipate.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg

from ._version import __version__
from .errors import KongtaskError

__all__ = ["main"]

logger = logging.getLogger("kongtask.cli")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} expects an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be at least 1, got {value}")
        return value

    return parse


def _worker_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kongtask",
        description=(
            "Run a kongtask worker: a PostgreSQL job queue and cron scheduler that shares "
            "its database with graphile-worker. Other commands: 'kongtask crontab --help', "
            "'kongtask cron --help', 'kongtask admin --help'."
        ),
        allow_abbrev=False,
    )
    parser.add_argument(
        "-c",
        "--connection",
        metavar="URL",
        help="PostgreSQL connection string (default: $DATABASE_URL, then PG* variables "
        "when PGDATABASE is set, then the embedded server)",
    )
    parser.add_argument(
        "-s",
        "--schema",
        metavar="NAME",
        help="schema holding the queue (default: $GRAPHILE_WORKER_SCHEMA or graphile_worker)",
    )
    parser.add_argument("--schema-only", action="store_true", help="migrate the schema, then exit")
    parser.add_argument("--once", action="store_true", help="run every job runnable now, then exit")
    parser.add_argument(
        "--tasks",
        metavar="PATH",
        help="task handlers: a .py file, a dotted module, or a folder of .py files "
        "(default: ./tasks if present)",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=_positive_int("--jobs"),
        default=None,
        metavar="N",
        help="number of jobs to run concurrently (default 1)",
    )
    parser.add_argument(
        "--poll-interval",
        type=_positive_int("--poll-interval"),
        default=None,
        metavar="MS",
        help="how long to wait between polls for jobs when LISTEN is quiet (default 2000)",
    )
    parser.add_argument(
        "-m",
        "--max-pool-size",
        type=_positive_int("--max-pool-size"),
        default=None,
        metavar="N",
        help="maximum number of database connections (default 10)",
    )
    parser.add_argument(
        "--local-queue-size",
        type=_positive_int("--local-queue-size"),
        default=None,
        metavar="N",
        help="how many jobs to claim ahead into the local buffer (default max(4 x jobs, 16))",
    )
    parser.add_argument(
        "--no-prepared-statements",
        action="store_true",
        help="don't use prepared statements (for pgBouncer in transaction mode)",
    )
    parser.add_argument(
        "--crontab", metavar="FILE", help="crontab file (default: ./crontab if present)"
    )
    parser.add_argument(
        "--cleanup",
        metavar="TASKS",
        help="run cleanup tasks (comma separated: GC_TASK_IDENTIFIERS, GC_JOB_QUEUES, "
        "DELETE_PERMAFAILED_JOBS), then exit",
    )
    parser.add_argument("--version", action="version", version=f"kongtask {__version__}")
    return parser


def _configure_logging() -> None:
    debug = bool(os.environ.get("GRAPHILE_LOGGER_DEBUG") or os.environ.get("KONGTASK_DEBUG"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
    root = logging.getLogger("kongtask")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def _schema_only(args: argparse.Namespace) -> int:
    from .worker_utils import WorkerUtils

    with WorkerUtils(args.connection, schema=args.schema):
        pass
    print("Schema updated")
    return EXIT_OK


def _cleanup(args: argparse.Namespace, task_identifiers: Sequence[str]) -> int:
    from .worker_utils import WorkerUtils

    tasks = [name.strip() for name in args.cleanup.split(",") if name.strip()]
    with WorkerUtils(args.connection, schema=args.schema) as utils:
        removed = utils.cleanup(tasks, task_identifiers_to_keep=task_identifiers)
    for name, count in removed.items():
        print(f"{name}: removed {count} row(s)")
    return EXIT_OK


def _run_worker(args: argparse.Namespace) -> int:
    from .runner import run, run_once
    from .task_loader import default_tasks_path, load_tasks

    tasks_path = args.tasks or default_tasks_path()
    tasks = load_tasks(tasks_path) if tasks_path is not None else {}
    if args.cleanup:
        return _cleanup(args, list(tasks))
    crontab_file = args.crontab
    if crontab_file is None and Path("crontab").is_file():
        crontab_file = "crontab"
    options: dict[str, object] = {
        "tasks": tasks,
        "connection_string": args.connection,
        "schema": args.schema,
        "prepared_statements": not args.no_prepared_statements,
    }
    if args.jobs is not None:
        options["concurrency"] = args.jobs
    if args.poll_interval is not None:
        options["poll_interval_s"] = args.poll_interval / 1000
    if args.max_pool_size is not None:
        options["max_pool_size"] = args.max_pool_size
    if args.local_queue_size is not None:
        options["local_queue_size"] = args.local_queue_size
    if args.once:
        run_once(**options)
        return EXIT_OK
    if crontab_file is not None:
        options["crontab_file"] = crontab_file
    if not tasks and crontab_file is None:
        logger.warning("No tasks found (use --tasks PATH); the worker has nothing to run")
    runner = run(install_signal_handlers=True, **options)
    # Wait in short slices so the main thread keeps running signal handlers.
    while not runner.wait(timeout=0.5):
        pass
    return EXIT_OK


def _dispatch_group(name: str, argv: Sequence[str]) -> int:
    if name == "crontab":
        from .cli_crontab import main as crontab_main

        return crontab_main(argv)
    if name == "cron":
        from .cli_cron import main as cron_main

        return cron_main(argv)
    from .cli_admin import main as admin_main

    return admin_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kongtask`` console script; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    _configure_logging()
    try:
        if args_list and args_list[0] in ("crontab", "admin", "cron"):
            return _dispatch_group(args_list[0], args_list[1:])
        parser = _worker_parser()
        args = parser.parse_args(args_list)
        if args.once and args.schema_only:
            parser.error("Cannot specify both --once and --schema-only")
        if args.schema_only and args.cleanup:
            parser.error("Cannot specify both --cleanup and --schema-only")
        if args.schema_only:
            return _schema_only(args)
        return _run_worker(args)
    except KongtaskError as exc:
        print(f"kongtask: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.OperationalError as exc:
        message = str(exc).strip().replace("\n", " ")
        print(f"kongtask: error: database connection failed: {message}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as exc:
        print(f"kongtask: error: database error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
