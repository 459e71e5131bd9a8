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
    """Add the jobs of the firings at ``ts`` whose identifiers have not run at ``ts`` yet."""

    ts: datetime
    specs: tuple[dict[str, Any], ...]
    backfilled: bool
    generation: int
    reply_to: pykka.ActorRef[Any]


@dataclass(frozen=True, slots=True)
class Scheduled:
    """The firings at ``ts`` are written; ``job_ids`` maps identifier to the new job id
    for the identifiers this instance scheduled (others were already done elsewhere)."""

    ts: datetime
    job_ids: dict[str, int]
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
                job_ids = self._schedule(message.ts, message.specs)
                message.reply_to.tell(Scheduled(message.ts, job_ids, message.generation))
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

    def _schedule(self, ts: datetime, specs: Sequence[dict[str, Any]]) -> dict[str, int]:
        params = {"specs": json.dumps(list(specs)), "ts": ts}
        with self._connect() as conn, conn.cursor() as cursor:
            rows = cursor.execute(self._queries.schedule_cron_jobs, params).fetchall()
        return {identifier: job_id for job_id, identifier in rows}
