"""Log output for the command line: timestamped text or JSON lines.

``configure(fmt)`` installs one handler on stderr for kongtask's loggers, for
psycopg's (pool warnings, lost connections) and for Python warnings, so
everything an operator sees has the same shape. ``text`` lines start with
an ISO 8601 UTC timestamp; ``json`` writes one object a line with ``ts``,
``level``, ``logger``, ``message`` and, where the record knows them,
``job_id``, ``task``, ``attempt``, ``max_attempts``, ``queue_id``,
``worker_id`` and ``pool``. Libraries embedding kongtask keep their own
logging setup: nothing here runs unless the CLI (or the host) calls it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import IO, Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "configure", "job_fields"]

#: The values ``--log-format`` takes.
LOG_FORMATS = ("text", "json")

#: The loggers the CLI's handler serves (besides kongtask's own).
_FOREIGN_LOGGERS = ("psycopg", "py.warnings")

# Fields a record may carry (as ``extra``) that the JSON format copies out.
_CONTEXT_FIELDS = (
    "job_id",
    "task",
    "attempt",
    "max_attempts",
    "queue_id",
    "queue",
    "worker_id",
    "pool",
)

# The worker's per-job lines ("Completed task 12 (send_email, ...)" and
# "Failed task 12 (send_email, 3.1ms, attempt 2 of 5) ..."): their first
# arguments are the job id and the task, then for failures the attempt.
_JOB_LINE = re.compile(r"^(Completed|Failed) task %s \(%s")
_POOL_IN_THREAD = re.compile(r"((?:ot)?pool-[0-9a-f]+)")


def job_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The job context of a record: from its ``extra``, or the worker's job lines' arguments."""
    fields: dict[str, Any] = {}
    for name in _CONTEXT_FIELDS:
        value = getattr(record, name, None)
        if value is not None:
            fields[name] = value
    task_identifier = getattr(record, "task_identifier", None)
    if "task" not in fields and task_identifier is not None:
        fields["task"] = task_identifier
    args = record.args
    if (
        isinstance(record.msg, str)
        and isinstance(args, tuple)
        and len(args) >= 2
        and _JOB_LINE.match(record.msg)
    ):
        fields.setdefault("job_id", args[0])
        fields.setdefault("task", args[1])
        if record.msg.startswith("Failed") and len(args) >= 5:
            fields.setdefault("attempt", args[3])
            fields.setdefault("max_attempts", args[4])
    if "pool" not in fields:
        pool = _POOL_IN_THREAD.search(record.threadName or "")
        if pool:
            fields["pool"] = pool.group(1)
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z [kongtask.worker] INFO: message`` (then any traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} [{record.name}] {record.levelname}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a traceback goes in ``exception``, never a second line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(job_fields(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def configure(
    fmt: str = "text", *, level: int = logging.INFO, stream: IO[str] | None = None
) -> logging.Handler:
    """Send kongtask's, psycopg's and Python's warnings' records to ``stream`` in ``fmt``.

    Raises ``ConfigurationError`` for an unknown format. Returns the handler.
    """
    if fmt not in LOG_FORMATS:
        from kongtask.errors import ConfigurationError

        raise ConfigurationError(
            f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}",
            name="--log-format",
            value=fmt,
        )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("kongtask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.captureWarnings(True)
    for name in _FOREIGN_LOGGERS:
        foreign = logging.getLogger(name)
        foreign.handlers[:] = [handler]
        foreign.setLevel(logging.WARNING)
        foreign.propagate = False
    return handler
