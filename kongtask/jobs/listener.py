"""The listener: a dedicated connection waiting on ``LISTEN`` for new work.

``jobs:insert`` tells the claimer ``InsertNotified`` (new jobs to claim now,
not at the next poll: the notice goes straight from this thread to the
claimer's mailbox, and one that arrives while a claim runs is acted on right
after it); a breaking ``worker:migrate`` means a newer worker changed the schema
under us, so the Runner shuts down gracefully with a warning; ``kongtask:cancel``
goes to the job service, which aborts the job if this pool holds it;
``kongtask:limits`` makes the claimer read limits and pauses again (or, for a
finished limited job, claim again). A lost
connection is re-established after a jittered back-off
(``min(60 s, 50 ms·e^attempts)``, as graphile-worker), and the claimer is
told once it is back, since notifications sent meanwhile were missed.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any

import psycopg

from kongtask import events
from kongtask.db.connecting import connect
from kongtask.db.migrate import LATEST_MIGRATION
from kongtask.jobs.cancel import CANCEL_CHANNEL
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.limits import LIMITS_CHANNEL
from kongtask.runtime.backoff import backoff_s
from kongtask.runtime.parts import Part, ThreadsPart

__all__ = ["Listener"]

logger = logging.getLogger(__name__)

# How long a breaking-migration check waits for a pooled connection.
_CHECK_TIMEOUT_S = 10.0


class Listener:
    """Runs on its own daemon thread; :meth:`stop` closes the connection to end it."""

    def __init__(
        self,
        ctx: WorkerContext,
        nudge: Callable[[], None],
        *,
        conninfo: str | None = None,
        on_cancel: Callable[[dict[str, Any]], None] | None = None,
        on_limits: Callable[[], None] | None = None,
    ) -> None:
        self._ctx = ctx
        #: Where to LISTEN: a direct connection when the pool goes through pgbouncer.
        self._conninfo = ctx.conninfo if conninfo is None else conninfo
        self._nudge = nudge
        #: Told each ``kongtask:cancel`` notice (decoded); it checks whom it names.
        self._on_cancel = on_cancel
        #: Told when limits or pauses of this schema changed (``kongtask:limits``).
        self._on_limits = on_limits
        self._stopped = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"kongtask-listen-{ctx.pool_id}", daemon=True
        )
        self.connected = threading.Event()

    def part(self) -> Part:
        """The listening thread as a part: healthy while it runs (reconnecting included)."""
        return ThreadsPart("listener", lambda: [("listen", self._thread)])

    def start(self) -> None:
        """Start listening in the background (emits the first ``pool:listen:connecting``)."""
        self._ctx.bus.emit(events.pool_listen_connecting, pool_id=self._ctx.pool_id, attempts=0)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop listening: closing the connection interrupts the wait for notifications."""
        self._stopped.set()
        with self._lock:
            conn = self._conn
        if conn is not None:
            try:
                conn.close()
            except Exception:
                logger.debug("Closing the LISTEN connection failed", exc_info=True)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        ctx = self._ctx
        attempts = 0
        while not self._stopped.is_set():
            if attempts:
                ctx.bus.emit(events.pool_listen_connecting, pool_id=ctx.pool_id, attempts=attempts)
            try:
                conn = connect(self._conninfo, ctx.settings.connection)
                with self._lock:
                    self._conn = conn
                if self._stopped.is_set():
                    conn.close()
                    break
                conn.execute(ctx.queries.listen_jobs_insert)
                conn.execute(ctx.queries.listen_worker_migrate)
                if self._on_cancel is not None:
                    conn.execute(ctx.queries.listen_cancel)
                if self._on_limits is not None:
                    conn.execute(ctx.queries.listen_limits)
                attempts = 0
                self.connected.set()
                ctx.bus.emit(events.pool_listen_success, pool_id=ctx.pool_id)
                self._nudge()  # notifications may have been missed
                while not self._stopped.is_set():
                    for notify in conn.notifies(timeout=ctx.settings.heartbeat_interval_s):
                        self._handle(notify.channel, notify.payload)
                    # Quiet for a while: check that the path still answers, since a
                    # half-open connection would otherwise wait here for ever.
                    conn.execute(ctx.queries.listener_check)
            except Exception as exc:
                if self._stopped.is_set():
                    break
                self.connected.clear()
                ctx.bus.emit(events.pool_listen_error, pool_id=ctx.pool_id, error=exc)
                delay = math.ceil(
                    1000 * backoff_s(attempts, base_s=0.05, factor=math.e, cap_s=60.0)
                )
                logger.error("Error with notify listener (trying again in %dms): %s", delay, exc)
                attempts += 1
                self._stopped.wait(delay / 1000)
            finally:
                with self._lock:
                    conn_, self._conn = self._conn, None
                if conn_ is not None and not conn_.closed:
                    conn_.close()
        self.connected.clear()
        ctx.bus.emit(events.pool_listen_release, pool_id=ctx.pool_id)

    def _handle(self, channel: str, payload: str) -> None:
        ctx = self._ctx
        # A cancel still matters while running jobs drain; nothing else does.
        if ctx.stopping and channel != CANCEL_CHANNEL:
            return
        ctx.bus.emit(
            events.pool_listen_notification, pool_id=ctx.pool_id, channel=channel, payload=payload
        )
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        if channel == "jobs:insert":
            count = data.get("count", 1)
            if not isinstance(count, int | float) or count > 0:
                self._nudge()
        elif channel == "worker:migrate" and data.get("breaking") is True:
            self._breaking_migration(data.get("migrationNumber"))
        elif channel == CANCEL_CHANNEL and self._on_cancel is not None:
            self._on_cancel(data)
        elif channel == LIMITS_CHANNEL and self._on_limits is not None:
            if data.get("schema") != ctx.settings.schema:
                return
            if data.get("what") == "released":
                self._nudge()  # a limited job finished somewhere: room may be free
            else:
                self._on_limits()

    def _breaking_migration(self, number: object) -> None:
        """Shut down only if our own schema now holds a breaking migration we do not know.

        The notice names no schema (graphile-worker sends the same one), so
        migrating any other schema of the database (``kongtask --schema-only -s
        other``, a second Runner, Node installing its schema) sends it too; the
        schema's own ``migrations`` table says whether it concerns us. When that
        table cannot be read, the notice is believed: stopping is recoverable,
        running on an incompatible schema may not be.
        """
        ctx = self._ctx
        schema = ctx.settings.schema
        try:
            with ctx.pool.connection(timeout=_CHECK_TIMEOUT_S) as conn:
                row = conn.execute(ctx.queries.migration_state).fetchone()
        except Exception as exc:
            logger.warning(
                "Could not read schema %r's migrations after a breaking migration notice "
                "(%s: %s); believing the notice",
                schema,
                type(exc).__name__,
                str(exc).strip(),
            )
            row = None
        if row is not None:
            latest, latest_breaking = row
            if latest_breaking <= LATEST_MIGRATION:
                logger.debug(
                    "Ignoring a breaking migration notice (revision %s): schema %r is at "
                    "revision %d, with no breaking migration newer than %d (another schema "
                    "was migrated)",
                    number,
                    schema,
                    latest,
                    LATEST_MIGRATION,
                )
                return
            number = latest_breaking
        logger.warning(
            "Graphile Worker detected breaking migration to database schema revision "
            "'%s'; it would be unsafe to continue, so shutting down...",
            number,
        )
        ctx.request_shutdown("A breaking migration was applied to the database")
