"""kongtask's own cron tables: stored cron items and the firing history.

Plain functions over a connection, shared by :class:`kongtask.Scheduler`,
:class:`kongtask.WorkerUtils` and the ``kongtask cron`` commands, returning typed
records. Stored items are kept as crontab lines, so they obey exactly the rules of
a crontab file (and a line a Node worker could not read is still fine: Node never
reads these tables).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from kongtask.cron.parser import parse_cron_item, parse_crontab
from kongtask.cron.render import render_cron_item
from kongtask.cron.types import CronItem, ParsedCronItem
from kongtask.db.statements import Queries
from kongtask.errors import ConfigurationError, CrontabError

__all__ = [
    "CronRun",
    "StoredCronItem",
    "add_stored_item",
    "cron_history",
    "list_stored_items",
    "parse_stored_item",
    "prune_history",
    "remove_stored_item",
    "to_parsed_item",
    "update_stored_item",
]

logger = logging.getLogger("kongtask.cron")

ItemLike = ParsedCronItem | CronItem | Mapping[str, Any] | str


@dataclass(frozen=True, slots=True)
class StoredCronItem:
    """A cron item kept in ``_kongtask_cron_items``: its crontab line and parsed form."""

    identifier: str
    line: str
    item: ParsedCronItem
    created_at: datetime
    updated_at: datetime

    @property
    def task(self) -> str:
        """The task the item's jobs run."""
        return self.item.task


@dataclass(frozen=True, slots=True)
class CronRun:
    """One firing in the history: what was scheduled when, by which node, and how it went.

    ``outcome`` is ``"scheduled"`` (written, not yet finished by a kongtask worker),
    ``"skipped"`` (``rule`` names why), ``"success"``, ``"failure"`` (an attempt
    failed; it will be retried) or ``"permanent_failure"``. ``duration_s``,
    ``attempts`` and ``error`` come from the kongtask worker that ran the job; for a
    firing skipped because its condition did not answer, ``error`` says why
    (``"timed out after 5 s"``, ``"raised ..."``, ``"its condition is still running ..."``).
    """

    id: int
    identifier: str
    task: str
    scheduled_at: datetime
    backfilled: bool
    outcome: str
    rule: str | None
    job_id: int | None
    node: str
    written_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    attempts: int | None
    error: str | None


def to_parsed_item(item: ItemLike) -> ParsedCronItem:
    """A parsed item from a crontab line, a ``CronItem``, a mapping or a parsed item."""
    if isinstance(item, ParsedCronItem):
        return item
    if isinstance(item, str):
        items = parse_crontab(item)
        if len(items) != 1:
            raise CrontabError(f"expected exactly one crontab line, got {len(items)} item(s)")
        return items[0]
    return parse_cron_item(item, "cron item")


def _line_of(item: ParsedCronItem) -> str:
    if item.condition is not None:
        raise ConfigurationError(
            f"cron item {item.identifier!r} has a condition callable, which cannot be stored;"
            " give it to Scheduler(cron_items=...) instead",
            name="item",
        )
    return render_cron_item(item)


def parse_stored_item(identifier: str, line: str) -> ParsedCronItem:
    """Parse a stored line (raises ``CrontabError`` if it no longer parses)."""
    (parsed,) = parse_crontab(line)
    if parsed.identifier != identifier:
        raise CrontabError(f"stored cron item {identifier!r} has a line for {parsed.identifier!r}")
    return _as_stored(parsed)


def _as_stored(item: ParsedCronItem) -> ParsedCronItem:
    from dataclasses import replace

    return replace(item, origin="stored", source_line=None)


def list_stored_items(conn: psycopg.Connection[Any], queries: Queries) -> list[StoredCronItem]:
    """Every stored item that still parses (others are logged and left out)."""
    found: list[StoredCronItem] = []
    with conn.cursor(row_factory=dict_row) as cursor:
        for row in cursor.execute(queries.cron_items).fetchall():
            try:
                parsed = parse_stored_item(row["identifier"], row["line"])
            except CrontabError as exc:
                logger.error("Stored cron item %r is invalid: %s", row["identifier"], exc)
                continue
            found.append(
                StoredCronItem(
                    row["identifier"], row["line"], parsed, row["created_at"], row["updated_at"]
                )
            )
    return found


def _change(
    conn: psycopg.Connection[Any], queries: Queries, statement: sql.Composed, params: dict[str, Any]
) -> bool:
    params = {**params, "schema": queries.schema}
    with conn.cursor() as cursor:
        return cursor.execute(statement, params).fetchone() is not None


def add_stored_item(
    conn: psycopg.Connection[Any], queries: Queries, item: ItemLike
) -> StoredCronItem:
    """Store a new item; ``ConfigurationError`` if its identifier is stored already."""
    parsed = to_parsed_item(item)
    line = _line_of(parsed)
    if not _change(
        conn, queries, queries.cron_item_add, {"identifier": parsed.identifier, "line": line}
    ):
        raise ConfigurationError(
            f"a stored cron item with identifier {parsed.identifier!r} exists already;"
            " use update_cron_item to change it",
            name="identifier",
            value=parsed.identifier,
        )
    return _fetch(conn, queries, parsed.identifier)


def update_stored_item(
    conn: psycopg.Connection[Any], queries: Queries, item: ItemLike
) -> StoredCronItem:
    """Replace a stored item (by identifier); ``ConfigurationError`` if there is none."""
    parsed = to_parsed_item(item)
    line = _line_of(parsed)
    if not _change(
        conn, queries, queries.cron_item_update, {"identifier": parsed.identifier, "line": line}
    ):
        raise ConfigurationError(
            f"no stored cron item has identifier {parsed.identifier!r}",
            name="identifier",
            value=parsed.identifier,
        )
    return _fetch(conn, queries, parsed.identifier)


def remove_stored_item(conn: psycopg.Connection[Any], queries: Queries, identifier: str) -> bool:
    """Remove a stored item; False if there was none with that identifier."""
    if not isinstance(identifier, str) or not identifier:
        raise ConfigurationError(
            "identifier must be a non-empty string", name="identifier", value=identifier
        )
    return _change(conn, queries, queries.cron_item_remove, {"identifier": identifier})


def _fetch(conn: psycopg.Connection[Any], queries: Queries, identifier: str) -> StoredCronItem:
    for stored in list_stored_items(conn, queries):
        if stored.identifier == identifier:
            return stored
    raise CrontabError(f"stored cron item {identifier!r} vanished")  # pragma: no cover


def cron_history(
    conn: psycopg.Connection[Any],
    queries: Queries,
    *,
    identifier: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[CronRun]:
    """The recorded firings, newest first (``since`` inclusive, ``until`` exclusive)."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and (not isinstance(value, datetime) or value.utcoffset() is None):
            raise ConfigurationError(
                f"{name} must be a timezone-aware datetime", name=name, value=value
            )
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError("limit must be a positive integer", name="limit", value=limit)
    params = {"identifier": identifier, "since": since, "until": until, "limit": limit}
    with conn.cursor(row_factory=dict_row) as cursor:
        rows = cursor.execute(queries.cron_history, params).fetchall()
    return [CronRun(**row) for row in rows]


def prune_history(conn: psycopg.Connection[Any], queries: Queries, before: datetime) -> int:
    """Delete history rows (and gaps) older than ``before``; returns how many rows went."""
    with conn.cursor() as cursor:
        row = cursor.execute(queries.cron_prune_history, {"before": before}).fetchone()
    return int(row[0]) if row else 0
