"""The ``kongtask`` command: run a worker, migrate, check crontabs, administer.

``kongtask [flags]`` runs a worker with graphile-worker's flags. Command
groups sit beside it: ``kongtask crontab check|next FILE``,
``kongtask cron add|update|remove|list|history|run``, ``kongtask admin ...``,
``kongtask status``, ``kongtask jobs ...`` and ``kongtask dashboard``. Every
failure ends with a one-line message on stderr and a non-zero exit code, never
a traceback, for errors we anticipate.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, cast

import psycopg

from kongtask._version import __version__
from kongtask.errors import ConfigurationError, KongtaskError
from kongtask.ops.cli.arguments import ArgumentParser, positive_seconds
from kongtask.ops.logs import LOG_FORMATS
from kongtask.ops.logs import configure as configure_logs
from kongtask.settings import VACUUM_DEAD_ROWS, ConnectionSettings

__all__ = ["main"]

logger = logging.getLogger("kongtask.ops.cli.main")

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


def _dead_rows(text: str) -> int:
    """``--vacuum-after-dead-rows``: 0 (never) or at least 1,000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects an integer, got {text!r}") from None
    low, high = VACUUM_DEAD_ROWS
    if value != 0 and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be 0 (never) or from {low} to {high}, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(
            f"must be a port number (0-65535; 0: any free port), got {value}"
        )
    return value


def _worker_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="kongtask",
        description=(
            "Run a kongtask worker: a PostgreSQL job queue and cron scheduler that shares "
            "its database with graphile-worker. Other commands: 'kongtask crontab --help', "
            "'kongtask cron --help', 'kongtask admin --help', 'kongtask status --help', "
            "'kongtask jobs --help', 'kongtask dashboard --help', 'kongtask limits --help', "
            "'kongtask pause --help', 'kongtask resume --help', 'kongtask pauses --help'."
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
        "--no-size-claims",
        action="store_true",
        help="fill the local buffer on every claim instead of sizing claims from the "
        "idle slots and the handlers' measured run time",
    )
    parser.add_argument(
        "--vacuum-after-dead-rows",
        type=_dead_rows,
        default=None,
        metavar="N",
        help="vacuum the jobs table from the worker once it holds N dead rows, autovacuum "
        "having fallen behind (default 50000; 0: never, leave it to autovacuum)",
    )
    parser.add_argument(
        "--no-prepared-statements",
        action="store_true",
        help="don't use prepared statements (for pgBouncer in transaction mode)",
    )
    parser.add_argument(
        "--pgbouncer",
        action="store_true",
        help="the connection goes through pgbouncer in transaction pooling: no prepared "
        "statements, and LISTEN only on --listen-connection (else poll, with a warning)",
    )
    parser.add_argument(
        "--listen-connection",
        metavar="URL",
        help="a direct PostgreSQL connection for LISTEN (when -c goes through pgbouncer)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=positive_seconds("--connect-timeout"),
        default=None,
        metavar="SECONDS",
        help="give up opening a database connection after this long (default 10)",
    )
    parser.add_argument(
        "--statement-timeout",
        type=positive_seconds("--statement-timeout"),
        default=None,
        metavar="SECONDS",
        help="close a connection whose answer to one of kongtask's own statements takes "
        "longer than this, and retry on a new one (default 30)",
    )
    parser.add_argument(
        "--timeout",
        type=positive_seconds("--timeout"),
        default=None,
        metavar="SECONDS",
        help="fail an attempt that runs longer than this (its abort event is set and it "
        "retries; a task's own timeout_s wins); default: no timeout",
    )
    parser.add_argument(
        "--crontab", metavar="FILE", help="crontab file (default: ./crontab if present)"
    )
    parser.add_argument(
        "--no-crontab",
        action="store_true",
        help="run no cron scheduler in this worker (overrides --crontab and ./crontab)",
    )
    parser.add_argument(
        "--processes",
        type=_positive_int("--processes"),
        default=None,
        metavar="N",
        help="run N worker processes under a supervisor that restarts any that dies; only "
        "process 0 runs the crontab; each runs -j jobs at a time (see README)",
    )
    parser.add_argument(
        "--cleanup",
        metavar="TASKS",
        help="run cleanup tasks (comma separated: GC_TASK_IDENTIFIERS, GC_JOB_QUEUES, "
        "DELETE_PERMAFAILED_JOBS), then exit",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics and the /healthz and /readyz probes on this port "
        "(0: any free port, logged at start; needs the 'metrics' extra)",
    )
    parser.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="log lines as timestamped text or as JSON lines (default text; "
        "also $KONGTASK_LOG_FORMAT); works with every command",
    )
    parser.add_argument("--version", action="version", version=f"kongtask {__version__}")
    return parser


def _configure_logging(fmt: str = "text") -> None:
    debug = bool(os.environ.get("GRAPHILE_LOGGER_DEBUG") or os.environ.get("KONGTASK_DEBUG"))
    configure_logs(fmt, level=logging.DEBUG if debug else logging.INFO)


def _pop_log_format(args: list[str]) -> tuple[str, list[str]]:
    """Take ``--log-format X`` out of the arguments (any command accepts it)."""
    fmt = os.environ.get("KONGTASK_LOG_FORMAT") or "text"
    rest: list[str] = []
    items = iter(args)
    for arg in items:
        if arg == "--log-format":
            fmt = next(items, "")
        elif arg.startswith("--log-format="):
            fmt = arg.partition("=")[2]
        else:
            rest.append(arg)
    return fmt, rest


#: Runner options set by worker flags: an error about one of them names the flag.
_FLAG_OF_OPTION = {"metrics_port": "--metrics-port", "metrics_host": "--metrics-host"}


def _in_flag_terms(exc: KongtaskError) -> str:
    """The error's message, naming the flag the user typed rather than the Runner option."""
    message = str(exc)
    name = getattr(exc, "name", None)
    if isinstance(name, str) and name in _FLAG_OF_OPTION and message.startswith(f"{name} "):
        return _FLAG_OF_OPTION[name] + message[len(name) :]
    return message


def _connection_settings(args: argparse.Namespace) -> ConnectionSettings:
    """The timeouts and pgbouncer mode the flags ask for (kongtask's defaults otherwise)."""
    options: dict[str, Any] = {"pgbouncer": args.pgbouncer}
    if args.connect_timeout is not None:
        options["connect_timeout_s"] = args.connect_timeout
    if args.statement_timeout is not None:
        options["statement_timeout_s"] = args.statement_timeout
    return ConnectionSettings(**options)


def _schema_only(args: argparse.Namespace) -> int:
    from kongtask.worker_utils import WorkerUtils

    with WorkerUtils(
        args.connection, schema=args.schema, connection_settings=_connection_settings(args)
    ):
        pass
    print("Schema updated")
    return EXIT_OK


def _cleanup(args: argparse.Namespace, task_identifiers: Sequence[str]) -> int:
    from kongtask.worker_utils import WorkerUtils

    tasks = [name.strip() for name in args.cleanup.split(",") if name.strip()]
    with WorkerUtils(
        args.connection, schema=args.schema, connection_settings=_connection_settings(args)
    ) as utils:
        removed = utils.cleanup(tasks, task_identifiers_to_keep=task_identifiers)
    for name, count in removed.items():
        print(f"{name}: removed {count} row(s)")
    return EXIT_OK


def _without_processes(args_list: Sequence[str]) -> list[str]:
    """The worker flags as typed, less ``--processes N``: each child's command line."""
    rest: list[str] = []
    items = iter(args_list)
    for arg in items:
        if arg == "--processes":
            next(items, None)
        elif not arg.startswith("--processes="):
            rest.append(arg)
    return rest


def _run_processes(args: argparse.Namespace, crontab_file: str | None) -> int:
    """``--processes N``: supervise N workers started with the same flags.

    The tasks were loaded and the crontab is parsed here first, so a mistake is
    reported once, before any process starts, rather than by N restarting children.
    """
    from kongtask.cron.source import CrontabSource
    from kongtask.db.conninfo import resolve_connection_string
    from kongtask.runtime.processes import run_processes

    if resolve_connection_string(args.connection) is None:
        raise ConfigurationError(
            "--processes needs a database to share (-c URL, DATABASE_URL or PGDATABASE): "
            "the embedded server belongs to one process",
            name="--processes",
        )
    if crontab_file is not None:
        source = CrontabSource.of(crontab_file=crontab_file)
        if source is not None:
            source.load()
    if args.metrics_port and args.metrics_port + args.processes - 1 > 65535:
        raise ConfigurationError(
            f"--metrics-port {args.metrics_port} with --processes {args.processes}: process i "
            "serves on PORT + i, which passes 65535",
            name="--metrics-port",
        )
    return run_processes(args.processes, _without_processes(args.worker_argv))


def _supervised() -> int:
    """This worker's index under a ``--processes`` supervisor (0 when on its own).

    A supervised worker drains when its supervisor disappears, so that no worker
    outlives a supervisor killed with SIGKILL.
    """
    from kongtask.runtime.processes import PROCESS_INDEX_ENV, SUPERVISOR_PID_ENV

    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit():
        threading.Thread(
            target=_watch_supervisor,
            args=(int(supervisor),),
            name="kongtask-supervisor-watch",
            daemon=True,
        ).start()
    index = os.environ.get(PROCESS_INDEX_ENV, "")
    return int(index) if index.isdigit() else 0


def _watch_supervisor(pid: int) -> None:
    """SIGTERM this process (a graceful drain) once its parent is no longer ``pid``."""
    gone = threading.Event()
    while os.getppid() == pid:
        gone.wait(1.0)
    logger.warning("The supervisor (pid %d) is gone; stopping this worker", pid)
    os.kill(os.getpid(), signal.SIGTERM)


def _run_worker(args: argparse.Namespace) -> int:
    from kongtask.jobs.task_loader import default_tasks_path, load_tasks, load_worker_tasks
    from kongtask.runner import RunnerOptions, run, run_once

    if args.cleanup:
        tasks_path = args.tasks or default_tasks_path()
        return _cleanup(args, list(load_tasks(tasks_path)) if tasks_path is not None else [])
    # Before anything connects: without tasks there is nothing to run.
    tasks = load_worker_tasks(args.tasks)
    crontab_file = args.crontab
    if crontab_file is None and Path("crontab").is_file():
        crontab_file = "crontab"
    if args.no_crontab:
        crontab_file = None
    if args.processes is not None:
        return _run_processes(args, crontab_file)
    process_index = _supervised()
    options: RunnerOptions = {
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
    if args.no_size_claims:
        options["size_claims"] = False
    if args.vacuum_after_dead_rows is not None:
        options["vacuum_after_dead_rows"] = args.vacuum_after_dead_rows or None
    if args.metrics_port is not None:
        # Under a supervisor, process i serves on PORT + i (0 stays "any free port").
        options["metrics_port"] = args.metrics_port + process_index if args.metrics_port else 0
        options["metrics_host"] = args.metrics_host
    if args.pgbouncer:
        options["pgbouncer"] = True
    if args.listen_connection is not None:
        options["listen_connection_string"] = args.listen_connection
    if args.connect_timeout is not None:
        options["connect_timeout_s"] = args.connect_timeout
    if args.statement_timeout is not None:
        options["statement_timeout_s"] = args.statement_timeout
    if args.timeout is not None:
        options["timeout_s"] = args.timeout
    if crontab_file is not None:
        options["crontab_file"] = crontab_file  # --once checks it without scheduling
    if args.once:
        run_once(**options)
        return EXIT_OK
    options["install_signal_handlers"] = True
    runner = run(**options)
    # Wait in short slices so the main thread keeps running signal handlers.
    while not runner.wait(timeout=0.5):
        pass
    return EXIT_OK


#: Command groups beside the worker: ``kongtask GROUP ...``.
GROUPS = (
    "crontab",
    "cron",
    "admin",
    "status",
    "jobs",
    "dashboard",
    "limits",
    "pause",
    "resume",
    "pauses",
)


def _dispatch_group(name: str, argv: Sequence[str]) -> int:
    if name in ("status", "jobs"):
        from kongtask.ops.cli.jobs import jobs_main, status_main

        return status_main(argv) if name == "status" else jobs_main(argv)
    if name in ("limits", "pause", "resume", "pauses"):
        from kongtask.ops.cli.limits import limits_main, pause_main

        return limits_main(argv) if name == "limits" else pause_main(name, argv)
    if name == "dashboard":
        try:
            from kongtask.ops.dashboard.cli import main as dashboard_main
        except ImportError as exc:
            raise ConfigurationError(
                f"the dashboard needs the 'dashboard' extra ({exc.name} is missing): "
                "pip install 'kongtask[dashboard]'"
            ) from exc
        return dashboard_main(argv)
    if name == "crontab":
        from kongtask.ops.cli.crontab import main as crontab_main

        return crontab_main(argv)
    if name == "cron":
        from kongtask.ops.cli.cron import main as cron_main

        return cron_main(argv)
    from kongtask.ops.cli.admin import main as admin_main

    return admin_main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kongtask`` console script; returns the exit code.

    Everything it prints goes through :class:`kongtask.db.conninfo.RedactingStream`,
    which knows the passwords of the command line and the environment.
    """
    from kongtask.db.conninfo import RedactingStream, connection_secrets

    args_list = list(sys.argv[1:] if argv is None else argv)
    secrets = connection_secrets(args_list)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout = cast(TextIO, RedactingStream(stdout, secrets))
    sys.stderr = cast(TextIO, RedactingStream(stderr, secrets))
    try:
        return _main(args_list)
    finally:
        sys.stdout, sys.stderr = stdout, stderr


def _main(args_list: list[str]) -> int:
    worker_argv = list(args_list)  # as typed (--log-format too), for --processes children
    log_format, args_list = _pop_log_format(args_list)
    try:
        _configure_logging(log_format)
        if args_list and args_list[0] in GROUPS:
            return _dispatch_group(args_list[0], args_list[1:])
        parser = _worker_parser()
        args = parser.parse_args(args_list)
        args.worker_argv = worker_argv
        if args.once and args.schema_only:
            parser.error("Cannot specify both --once and --schema-only")
        if args.schema_only and args.cleanup:
            parser.error("Cannot specify both --cleanup and --schema-only")
        if args.processes is not None and (args.schema_only or args.cleanup):
            parser.error("--processes runs workers: not with --schema-only or --cleanup")
        if args.schema_only:
            return _schema_only(args)
        return _run_worker(args)
    except KongtaskError as exc:
        print(f"kongtask: error: {_in_flag_terms(exc)}", file=sys.stderr)
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
    except Exception as exc:  # unforeseen: one line (the traceback with KONGTASK_DEBUG)
        logger.debug("Unexpected error", exc_info=True)
        print(f"kongtask: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
