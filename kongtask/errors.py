"""The error tree: every error kongtask raises on purpose is a ``KongtaskError``.

The tree is shallow on purpose; each error carries the offending value as an
attribute as well as in its message, so callers can react without parsing text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigurationError",
    "CrontabError",
    "EmbeddedServerError",
    "InvalidJobError",
    "JobCancelledError",
    "JobTimeoutError",
    "KongtaskError",
    "MigrationError",
    "TaskLoadError",
]


class KongtaskError(Exception):
    """Root of every error kongtask raises deliberately."""


class ConfigurationError(KongtaskError, ValueError):
    """A setting (argument, flag or environment variable) has a bad value.

    ``name`` is the parameter or flag at fault and ``value`` what was given.
    """

    def __init__(self, message: str, *, name: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.name = name
        self.value = value


class InvalidJobError(KongtaskError, ValueError):
    """Arguments for a job (``add_job`` and friends) are invalid; nothing was written.

    ``field`` names the argument at fault and ``value`` what was given.
    """

    def __init__(self, message: str, *, field: str | None = None, value: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


class MigrationError(KongtaskError):
    """The database schema cannot be brought to (or used at) the version we speak."""


class EmbeddedServerError(KongtaskError):
    """The embedded PostgreSQL could not be started, or is not installed."""


class TaskLoadError(KongtaskError):
    """Task handlers could not be loaded from the given file, module or folder."""


class CrontabError(KongtaskError, ValueError):
    """A crontab line, option or programmatic cron item is invalid.

    ``line`` is 1-based and counts comment and blank lines; ``column`` is
    1-based where the fault has a position within the line. Both are ``None``
    for errors that have no place in a file (a programmatic item, say).
    """

    def __init__(
        self,
        message: str,
        *,
        line: int | None = None,
        column: int | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.line = line
        self.column = column
        self.source = source


class JobTimeoutError(KongtaskError, TimeoutError):
    """A job's attempt ran past its timeout; the attempt failed with this message.

    ``timeout_s`` is the limit that passed. The job retries as after any failure.
    """

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"timed out after {timeout_s:g} s")
        self.timeout_s = timeout_s


class JobCancelledError(KongtaskError):
    """A job was cancelled (``WorkerUtils.cancel_job``) while it ran; it fails for good.

    ``reason`` is the one given to the cancel, if any.
    """

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(cancel_message(reason))
        self.reason = reason


def cancel_message(reason: str | None) -> str:
    """The ``last_error`` of a cancelled job: ``cancelled`` or ``cancelled: <reason>``."""
    return "cancelled" if not reason else f"cancelled: {reason}"
