"""The base of the actors that talk to the database: one pooled connection each.

The connection is taken from the Runner's pool when first needed and kept;
a statement that fails with a transient error is retried after a jittered
delay, on a fresh connection if the old one broke. Any other exception inside
a message handler is reported to the Runner (which shuts down loudly): the
error policy of these actors is :attr:`ErrorPolicy.FATAL`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, NamedTuple, TypeVar

import psycopg
from psycopg_pool import PoolClosed

from kongtask.jobs.context import WorkerContext
from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.probing import DatabaseWait
from kongtask.runtime.retry import is_connection_error, is_transient, retry_delay_s

__all__ = ["DbActor", "Ran"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_POOL_TIMEOUT_S = 30.0


class Ran(NamedTuple, Generic[T]):
    """What :meth:`DbActor.run_noting_retries` gives: the statement's result, and
    whether it needed more than one try (a try that committed before its
    connection broke leaves the retry nothing to do)."""

    value: T
    retried: bool


class DbActor(Actor):
    """An actor owning one pooled connection; subclasses implement ``handle``."""

    error_policy = ErrorPolicy.FATAL
    #: The action name reported with a fatal error (``claim``, ``complete``, …).
    action = "database"
    #: How many times a transient failure is retried before it counts as fatal.
    max_attempts = 100

    def __init__(self, ctx: WorkerContext) -> None:
        super().__init__()
        self.ctx = ctx
        self._conn: psycopg.Connection[Any] | None = None
        # Marks run()'s statements and retries, so a liveness probe left
        # unanswered meanwhile sees a database wait, not a stuck actor.
        self._database_wait = DatabaseWait.of(self)

    def fatal(self, message: Any, error: Exception) -> None:
        logger.exception("%s actor of %s failed", self.action, self.ctx.pool_id)
        self.ctx.fatal(self.action, error)

    def on_failure(
        self,
        exception_type: type[BaseException] | None,
        exception_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._drop_connection(broken=True)
        if exception_value is not None:
            self.ctx.fatal(self.action, exception_value)

    def on_stop(self) -> None:
        self._drop_connection(broken=False)

    def run(self, statement: Callable[[psycopg.Connection[Any]], T], what: str) -> T:
        """Run ``statement(conn)``, retrying transient failures with back-off."""
        with self._database_wait():
            return self._run(statement, what).value

    def run_noting_retries(
        self, statement: Callable[[psycopg.Connection[Any]], T], what: str
    ) -> Ran[T]:
        """As :meth:`run`, and say whether the statement needed more than one try."""
        with self._database_wait():
            return self._run(statement, what)

    def _run(self, statement: Callable[[psycopg.Connection[Any]], T], what: str) -> Ran[T]:
        attempt = 0
        while True:
            try:
                conn = self._connection()
                return Ran(statement(conn), attempt > 0)
            except Exception as exc:
                if not is_transient(exc) or attempt + 1 >= self.max_attempts:
                    raise
                # A closed pool never opens again: retrying would only keep this thread
                # alive, logging, after its Runner has gone.
                if self.stopping(exc):
                    raise
                if is_connection_error(exc) or (self._conn is not None and self._conn.broken):
                    self._drop_connection(broken=True)
                delay = retry_delay_s(exc, attempt)
                logger.warning(
                    "%s failed (%s: %s); retrying in %.0fms (attempt %d)",
                    what,
                    type(exc).__name__,
                    str(exc).strip() or "no message",
                    delay * 1000,
                    attempt + 1,
                )
                self.ctx.give_up.wait(delay)
                attempt += 1

    def stopping(self, exc: BaseException) -> bool:
        """Whether ``exc`` only says that the pool is going away (its connection pool is
        closed, or the Runner gave up): a statement cut short by a stop, not an error."""
        return self.ctx.give_up.is_set() or isinstance(exc, PoolClosed)

    def _connection(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            if conn is not None:
                self._drop_connection(broken=True)
            conn = self._conn = self.ctx.pool.getconn(timeout=_POOL_TIMEOUT_S)
        return conn

    def _drop_connection(self, *, broken: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if broken and not conn.closed:
            conn.close()
        try:
            self.ctx.pool.putconn(conn)
        except Exception:
            logger.debug("Could not return a connection to the pool", exc_info=True)
