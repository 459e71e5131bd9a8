"""kongtask: a PostgreSQL job queue and distributed cron scheduler for Python.

It speaks graphile-worker's database dialect, so kongtask workers and Node.js
graphile-worker workers can share one database, one queue and one crontab.
"""

import logging

from ._version import __version__
from .errors import (
    ConfigurationError,
    CrontabError,
    EmbeddedServerError,
    InvalidJobError,
    KongtaskError,
    MigrationError,
    TaskLoadError,
)
from .job import Job
from .job_spec import JobSpec
from .worker_utils import CLEANUP_TASKS, WorkerUtils, add_job

__all__ = [
    "CLEANUP_TASKS",
    "ConfigurationError",
    "CrontabError",
    "EmbeddedServerError",
    "InvalidJobError",
    "Job",
    "JobSpec",
    "KongtaskError",
    "MigrationError",
    "TaskLoadError",
    "WorkerUtils",
    "__version__",
    "add_job",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
