"""Which database errors are worth retrying, and how long to wait between tries.

Serialization failures and deadlocks clear up within milliseconds; a lost
connection or a server that is starting up takes seconds. Either way the
statement is retried after a jittered, growing delay instead of crashing the
worker (graphile-worker's ``withRetries`` has the same classes).
"""

from __future__ import annotations

import psycopg
from psycopg import errors

from kongtask.runtime.backoff import backoff_s

__all__ = ["is_connection_error", "is_transient", "retry_delay_s"]

_QUICK = (errors.SerializationFailure, errors.DeadlockDetected)


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can cure: 40001, 40P01, 57P03, a lost connection."""
    return isinstance(exc, _QUICK) or is_connection_error(exc)


def is_connection_error(exc: BaseException) -> bool:
    """True when the connection itself is gone (or the server refuses connections for now)."""
    if isinstance(exc, errors.CannotConnectNow | errors.AdminShutdown | errors.CrashShutdown):
        return True
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) and not isinstance(
        exc, errors.QueryCanceled
    )


def retry_delay_s(exc: BaseException, attempt: int) -> float:
    """The wait before retry ``attempt`` (0-based), jittered by a factor of 0.5 to 1.5."""
    if isinstance(exc, _QUICK):
        low, high = 0.05, 5.0
    else:
        low, high = 0.2, 30.0
    return backoff_s(attempt, base_s=low, factor=1.5, cap_s=high)
