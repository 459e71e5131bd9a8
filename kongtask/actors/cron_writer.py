"""The cron scheduler's database side: registers identifiers and writes firings.

One actor, one statement at a time, each on a pooled connection. It never
decides anything: it does what the matcher asks and tells it how that went,
so the matcher alone owns the timeline (and never waits on this actor's
mailbox synchronously).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import pykka
from psycopg.rows import dict_row

from kongtask.cron.schedule import KnownCrontab
from kongtask.sql import Queries

__all__ = [
    "CronWriter",
    "Register",
    "Registered",
    "Schedule",
    "Scheduled",
    "WriteFailed",
]

logger = logging.getLogger(__name__)

ConnectionFactory = Callable[[], AbstractContextManager[psycopg.Connection[Any]]]


@dataclass(frozen=True, slots=True)
class Register:
    """Record these identifiers as known (``known_since = now``) and report the old ones."""

    identifiers: tuple[str, ...]
    now: datetime
    generation: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Registered:
    """Identifiers that were known before this registration, with their rows."""

    known: dict[str, KnownCrontab]
    generation: int


@dataclass(frozen=True, slots=True)
class Schedule:
    """Add the jobs of these firings, each a minute and the job specs due then.

    Only firings newer than their identifier's ``last_execution`` are added;
    the rest were scheduled already (by another instance, or before a clock
    went back).
    """

    firings: tuple[tuple[datetime, tuple[dict[str, Any], ...]], ...]
    backfilled: bool
    generation: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The firings are written; ``scheduled`` lists the (identifier, minute) pairs
    this instance added jobs for."""

    scheduled: tuple[tuple[str, datetime], ...]
    generation: int


@dataclass(frozen=True, slots=True)
class WriteFailed:
    """A statement failed; the matcher retries with back-off."""

    stage: str
    error: BaseException
    generation: int


class CronWriter(pykka.ThreadingActor):
    """Runs the cron statements (see ``kongtask.sql``) for one Runner."""

    use_daemon_thread = True

    def __init__(self, connect: ConnectionFactory, queries: Queries) -> None:
        super().__init__()
        self._connect = connect
        self._queries = queries

    def on_receive(self, message: Any) -> Any:
        try:
            if isinstance(message, Register):
                known = self._register(message.identifiers, message.now)
                message.reply_to.tell(Registered(known, message.generation))
            elif isinstance(message, Schedule):
                scheduled = self._schedule(message.firings)
                message.reply_to.tell(Scheduled(scheduled, message.generation))
        except Exception as exc:  # reported, never allowed to kill the actor
            stage = "register" if isinstance(message, Register) else "schedule"
            logger.debug("cron %s failed: %r", stage, exc)
            try:
                message.reply_to.tell(WriteFailed(stage, exc, message.generation))
            except pykka.ActorDeadError:
                pass
        return None

    def _register(self, identifiers: Sequence[str], now: datetime) -> dict[str, KnownCrontab]:
        params = {"identifiers": list(identifiers), "now": now}
        with self._connect() as conn, conn.cursor(row_factory=dict_row) as cursor:
            rows = cursor.execute(self._queries.register_crontabs, params).fetchall()
        return {
            row["identifier"]: KnownCrontab(
                row["identifier"], row["known_since"], row["last_execution"]
            )
            for row in rows
        }

    def _schedule(
        self, firings: Sequence[tuple[datetime, Sequence[dict[str, Any]]]]
    ) -> tuple[tuple[str, datetime], ...]:
        flat = [(ts, spec) for ts, specs in firings for spec in specs]
        if not flat:
            return ()
        identifiers = [spec["identifier"] for _, spec in flat]
        queries = self._queries
        with self._connect() as conn, conn.transaction(), conn.cursor() as cursor:
            cursor.execute(
                queries.cron_ensure_known,
                {"identifiers": sorted(set(identifiers)), "ts": min(ts for ts, _ in flat)},
            )
            cursor.execute(
                queries.cron_claim_firings,
                {"identifiers": identifiers, "timestamps": [ts for ts, _ in flat]},
            )
            chosen = [flat[ordinality - 1] for (ordinality,) in cursor.fetchall()]
            plain = [_job_row(ts, spec) for ts, spec in chosen if spec["job_key"] is None]
            keyed = [_job_row(ts, spec) for ts, spec in chosen if spec["job_key"] is not None]
            if plain:
                cursor.execute(queries.cron_add_jobs, {"specs": json.dumps(plain)})
            if keyed:
                cursor.execute(queries.cron_add_keyed_jobs, {"specs": json.dumps(keyed)})
        return tuple((spec["identifier"], ts) for ts, spec in chosen)


def _job_row(ts: datetime, spec: dict[str, Any]) -> dict[str, Any]:
    """One job in the shape of the schema's ``job_spec`` (``identifier`` is the task)."""
    return {
        "identifier": spec["task"],
        "task": spec["task"],
        "payload": spec["payload"],
        "queue_name": spec["queue_name"],
        "run_at": ts.isoformat(),
        "max_attempts": spec["max_attempts"],
        "job_key": spec["job_key"],
        "priority": spec["priority"],
        "job_key_mode": spec["job_key_mode"],
        "flags": None,
    }
