"""kongtask: a PostgreSQL job queue and distributed cron scheduler for Python.

It speaks graphile-worker's database dialect, so kongtask workers and Node.js
graphile-worker workers can share one database, one queue and one crontab.
"""

import logging
from typing import TYPE_CHECKING

from kongtask import _lazy, events
from kongtask._version import __version__

if TYPE_CHECKING:
    from kongtask.cron import (
        CronItem,
        CronItemOptions,
        Firing,
        ParsedCronItem,
        digest,
        fire_times,
        matches,
        next_fire_times,
        parse_cron_item,
        parse_cron_items,
        parse_crontab,
        parse_options,
        validate_pattern,
    )
    from kongtask.cron.service.store import (
        CronRun,
        StoredCronItem,
    )
    from kongtask.db.conninfo import (
        RedactingFilter,
        redact,
    )
    from kongtask.db.migrate import (
        LATEST_MIGRATION,
        MigrationResult,
        migrate,
    )
    from kongtask.declared import (
        Task,
        task,
    )
    from kongtask.errors import (
        ConfigurationError,
        CrontabError,
        EmbeddedServerError,
        InvalidJobError,
        JobCancelledError,
        JobTimeoutError,
        KongtaskError,
        MigrationError,
        TaskLoadError,
    )
    from kongtask.helpers import (
        AsyncHelpers,
        Helpers,
    )
    from kongtask.job import Job
    from kongtask.job_spec import JobSpec
    from kongtask.jobs.cancel import CancelResult
    from kongtask.protocols import (
        Clock,
        TaskHandler,
    )
    from kongtask.runner import (
        Runner,
        RunnerOptions,
        run,
        run_once,
    )
    from kongtask.runtime.processes import (
        ProcessSupervisor,
        run_processes,
    )
    from kongtask.scheduler import Scheduler
    from kongtask.settings import (
        ConnectionSettings,
        OpsSettings,
        WorkerSettings,
    )
    from kongtask.worker_utils import (
        CLEANUP_TASKS,
        WorkerUtils,
        add_job,
        add_job_async,
        add_jobs,
        add_jobs_async,
        cancel_job,
        cancel_job_async,
    )

__all__ = [
    "CLEANUP_TASKS",
    "LATEST_MIGRATION",
    "AsyncHelpers",
    "CancelResult",
    "Clock",
    "ConfigurationError",
    "ConnectionSettings",
    "CronItem",
    "CronItemOptions",
    "CronRun",
    "CrontabError",
    "EmbeddedServerError",
    "Firing",
    "Helpers",
    "InvalidJobError",
    "Job",
    "JobCancelledError",
    "JobSpec",
    "JobTimeoutError",
    "KongtaskError",
    "MigrationError",
    "MigrationResult",
    "OpsSettings",
    "ParsedCronItem",
    "ProcessSupervisor",
    "RedactingFilter",
    "Runner",
    "RunnerOptions",
    "Scheduler",
    "StoredCronItem",
    "Task",
    "TaskHandler",
    "TaskLoadError",
    "WorkerSettings",
    "WorkerUtils",
    "__version__",
    "add_job",
    "add_job_async",
    "add_jobs",
    "add_jobs_async",
    "cancel_job",
    "cancel_job_async",
    "digest",
    "events",
    "fire_times",
    "matches",
    "migrate",
    "next_fire_times",
    "parse_cron_item",
    "parse_cron_items",
    "parse_crontab",
    "parse_options",
    "redact",
    "run",
    "run_once",
    "run_processes",
    "task",
    "validate_pattern",
]

# Each public name is imported when first read (see kongtask._lazy): a worker
# without a crontab never imports the cron stack, and starts sooner.
__getattr__, __dir__ = _lazy.exports(
    __name__,
    {
        "kongtask.cron": (
            "CronItem",
            "CronItemOptions",
            "Firing",
            "ParsedCronItem",
            "digest",
            "fire_times",
            "matches",
            "next_fire_times",
            "parse_cron_item",
            "parse_cron_items",
            "parse_crontab",
            "parse_options",
            "validate_pattern",
        ),
        "kongtask.cron.service.store": ("CronRun", "StoredCronItem"),
        "kongtask.db.conninfo": ("RedactingFilter", "redact"),
        "kongtask.db.migrate": ("LATEST_MIGRATION", "MigrationResult", "migrate"),
        "kongtask.declared": ("Task", "task"),
        "kongtask.errors": (
            "ConfigurationError",
            "CrontabError",
            "EmbeddedServerError",
            "InvalidJobError",
            "JobCancelledError",
            "JobTimeoutError",
            "KongtaskError",
            "MigrationError",
            "TaskLoadError",
        ),
        "kongtask.helpers": ("AsyncHelpers", "Helpers"),
        "kongtask.job": ("Job",),
        "kongtask.job_spec": ("JobSpec",),
        "kongtask.jobs.cancel": ("CancelResult",),
        "kongtask.protocols": ("Clock", "TaskHandler"),
        "kongtask.runner": ("Runner", "RunnerOptions", "run", "run_once"),
        "kongtask.runtime.processes": ("ProcessSupervisor", "run_processes"),
        "kongtask.scheduler": ("Scheduler",),
        "kongtask.settings": ("ConnectionSettings", "OpsSettings", "WorkerSettings"),
        "kongtask.worker_utils": (
            "CLEANUP_TASKS",
            "WorkerUtils",
            "add_job",
            "add_job_async",
            "add_jobs",
            "add_jobs_async",
            "cancel_job",
            "cancel_job_async",
        ),
    },
)

logging.getLogger(__name__).addHandler(logging.NullHandler())
