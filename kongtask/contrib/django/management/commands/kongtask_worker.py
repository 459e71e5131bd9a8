"""``manage.py kongtask_worker``: a kongtask worker running this project's Django tasks."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from kongtask.contrib.django._compat import task_backends
from kongtask.contrib.django.backend import KongtaskBackend
from kongtask.contrib.django.connection import conninfo_for
from kongtask.contrib.django.worker import discover_tasks, task_map
from kongtask.errors import KongtaskError
from kongtask.runner import Runner


class Command(BaseCommand):  # type: ignore[misc]
    """Run the Django tasks of every installed app's ``tasks`` module from kongtask's queue."""

    help = (
        "Run a kongtask worker for the Django tasks of the installed apps "
        "(the database and schema come from the kongtask task backend's OPTIONS)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--backend",
            default="default",
            help="the TASKS alias of a KongtaskBackend (default: default)",
        )
        parser.add_argument(
            "--once", action="store_true", help="run the jobs that are due now, then exit"
        )
        parser.add_argument(
            "-j", "--concurrency", type=int, default=1, help="jobs run at once (default 1)"
        )
        parser.add_argument(
            "--poll-interval",
            type=float,
            default=2.0,
            help="seconds between checks for jobs when no notification came (default 2)",
        )
        parser.add_argument("--crontab", help="a crontab file to schedule (graphile format)")

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["backend"]
        try:
            backend = task_backends[alias]
        except Exception as exc:
            raise CommandError(f"--backend: no task backend {alias!r} in TASKS ({exc})") from exc
        if not isinstance(backend, KongtaskBackend):
            raise CommandError(
                f"--backend: TASKS[{alias!r}] is {type(backend).__name__}, not KongtaskBackend"
            )
        tasks = {
            identifier: task
            for identifier, task in discover_tasks().items()
            if task.backend == alias
        }
        if not tasks:
            raise CommandError(
                f"no Django tasks for backend {alias!r} were found in the installed apps' "
                "tasks modules"
            )
        try:
            runner = Runner(
                tasks=task_map(tasks, alias),
                connection_string=conninfo_for(backend.database),
                schema=backend.schema,
                concurrency=options["concurrency"],
                poll_interval_s=options["poll_interval"],
                crontab_file=options["crontab"],
                once=options["once"],
                install_signal_handlers=True,
            )
            self.stdout.write(
                f"kongtask worker: {len(tasks)} task(s) on database {backend.database!r}, "
                f"schema {backend.schema!r}"
            )
            runner.start()
            runner.wait()
        except KongtaskError as exc:
            raise CommandError(str(exc)) from exc
