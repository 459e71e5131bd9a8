"""Bring a database schema to graphile-worker 0.17's revision 19, the dialect kongtask speaks.

The schema is shared with Node graphile-worker, so the bookkeeping follows its
rules exactly: one row per upstream migration id in ``<schema>.migrations``,
the insert into that table first (a concurrent Node migrator then collides on
the primary key and treats the work as done by someone else), a
``worker:migrate`` notification per id, and refusal to touch a database that a
newer, incompatible worker has already migrated.

The SQL lives in immutable numbered files in the ``kongtask.migrations``
package. A file ``NNNNNN_name.sql`` brings the schema to upstream revision
``NNNNNN`` from the revision of the file before it (``000019`` starts from an
empty schema and records ids 1..19). Each file refers to the schema through
the token ``:KONGTASK_SCHEMA``, which is replaced by a quoted identifier,
never by string formatting.

kongtask's own additions (tables graphile-worker does not have: pool
liveness, stored cron items, cron history, ...) live in files named
``kongtask_NNNN_name.sql`` in the same package and are recorded in their own
table, ``<schema>._kongtask_migrations``, so that the ``migrations`` table only
ever holds upstream ids and a Node worker never sees a difference. Every object
they create is named ``_kongtask*``. They are applied in the same locked
transaction as the upstream files, after them.

The statements of this module stay here rather than in ``kongtask/db/sql``:
they are the migration machinery itself (running the files, bootstrapping and
reading the bookkeeping tables), which must work before any schema exists.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg import pq, sql

from kongtask.db.conninfo import check_schema_name
from kongtask.errors import ConfigurationError, MigrationError
from kongtask.settings import DEFAULT_SCHEMA

__all__ = [
    "BREAKING_MIGRATIONS",
    "LATEST_MIGRATION",
    "MIN_SERVER_VERSION_NUM",
    "SCHEMA_TOKEN",
    "MigrationResult",
    "migrate",
]

logger = logging.getLogger(__name__)

LATEST_MIGRATION = 19
"""The highest graphile-worker migration id this version of kongtask knows."""

BREAKING_MIGRATIONS: frozenset[int] = frozenset({1, 3, 11, 13, 14, 16, 19})
"""Upstream migration ids flagged as breaking (recorded in ``migrations.breaking``)."""

MIN_SERVER_VERSION_NUM = 120000
"""PostgreSQL 12 is the oldest server graphile-worker 0.17 (and so kongtask) supports."""

SCHEMA_TOKEN = ":KONGTASK_SCHEMA"
"""Stands for the quoted schema identifier inside migration files."""


# Key class for pg_advisory_xact_lock(int, int): "kong" in ASCII, so the lock does
# not collide with an application's own single-key advisory locks.
_LOCK_CLASS = 0x6B6F6E67

# SQLSTATEs meaning "another migrator created this first" (graphile-worker's list).
_CLASH_SQLSTATES = frozenset({"23505", "42P06", "42P07", "42710"})

# How long to keep retrying after colliding with another (Node) migrator.
_CLASH_RETRY_DEADLINE_S = 30.0

_FILE_NAME = re.compile(r"^(\d{6})_[a-z0-9_]+\.sql$")
_EXTRA_FILE_NAME = re.compile(r"^kongtask_(\d{4})_[a-z0-9_]+\.sql$")

_REQUIRED_TABLES = (
    "_private_jobs",
    "_private_job_queues",
    "_private_tasks",
    "_private_known_crontabs",
)


@dataclass(frozen=True)
class MigrationResult:
    """What :func:`migrate` found and did.

    ``from_version`` is the highest migration id recorded before (0 for a new
    schema), ``to_version`` the highest afterwards, ``applied`` the ids this
    call recorded (empty when there was nothing to do).
    """

    schema: str
    from_version: int
    to_version: int
    applied: tuple[int, ...]
    extras_applied: tuple[int, ...] = ()

    @property
    def changed(self) -> bool:
        """True when this call applied at least one migration (upstream or kongtask's own)."""
        return bool(self.applied or self.extras_applied)


@dataclass(frozen=True)
class _MigrationFile:
    """One numbered SQL file: it covers ids ``first_id..last_id`` (inclusive)."""

    first_id: int
    last_id: int
    name: str
    text: str


@dataclass(frozen=True)
class _State:
    """What the database holds before migrating, read under the migration lock."""

    server_version_num: int
    schema_exists: bool
    table_exists: bool
    columns: frozenset[str]
    latest: int
    latest_breaking: int


class _Clash(Exception):
    """Another migrator got there first; start over after a short pause."""


def _check_server_version(server_version_num: int) -> None:
    """Refuse servers older than PostgreSQL 12 (generated columns are needed)."""
    if server_version_num < MIN_SERVER_VERSION_NUM:
        raise MigrationError(
            "kongtask requires PostgreSQL 12.0 or greater "
            f"(detected server_version_num = {server_version_num})"
        )


def _migration_files() -> list[_MigrationFile]:
    """Load the numbered SQL files shipped in ``kongtask.migrations``, in order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("kongtask.migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    files: list[_MigrationFile] = []
    previous = 0
    for last_id, name, text in found:
        if last_id <= previous:
            raise MigrationError(f"two migration files claim revision {last_id}: {name}")
        files.append(_MigrationFile(previous + 1, last_id, name, text))
        previous = last_id
    if previous != LATEST_MIGRATION:
        raise MigrationError(
            f"the shipped migration files end at revision {previous}, expected {LATEST_MIGRATION}"
        )
    return files


def _extra_files() -> list[tuple[int, str, str]]:
    """Load kongtask's own ``kongtask_NNNN_*.sql`` files as (id, name, text), in order."""
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("kongtask.migrations").iterdir():
        match = _EXTRA_FILE_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    ids = [number for number, _, _ in found]
    if ids != list(range(1, len(ids) + 1)):
        raise MigrationError(f"kongtask's own migration files are not numbered 1..n: {ids}")
    return found


def _apply_extras(cur: psycopg.Cursor[Any], schema: str) -> tuple[int, ...]:
    """Run kongtask's own files not yet recorded in ``_kongtask_migrations``; return their ids."""
    ident = sql.Identifier(schema)
    cur.execute("select to_regclass(format('%%I._kongtask_migrations', %s::text))", (schema,))
    row = cur.fetchone()
    if row is None or row[0] is None:
        cur.execute(
            sql.SQL(
                "create table {}._kongtask_migrations ("
                " id int primary key,"
                " name text not null,"
                " ts timestamptz not null default now())"
            ).format(ident)
        )
    cur.execute(sql.SQL("select id from {}._kongtask_migrations").format(ident))
    done = {row[0] for row in cur.fetchall()}
    applied: list[int] = []
    for number, name, text in _extra_files():
        if number in done:
            continue
        logger.debug("applying kongtask migration file %s to schema %r", name, schema)
        try:
            cur.execute(_render(text, schema))
        except psycopg.Error as error:
            raise MigrationError(
                f"kongtask migration {name} failed in schema {schema!r}: "
                f"{error.sqlstate} {error}".rstrip()
            ) from error
        cur.execute(
            sql.SQL("insert into {}._kongtask_migrations (id, name) values (%s, %s)").format(ident),
            (number, name),
        )
        applied.append(number)
    return tuple(applied)


def _render(text: str, schema: str) -> sql.Composed:
    """Turn migration text into SQL with every schema token replaced by a quoted identifier."""
    pieces = text.split(SCHEMA_TOKEN)
    parts: list[sql.Composable] = [sql.SQL(pieces[0])]
    for piece in pieces[1:]:
        parts.append(sql.Identifier(schema))
        parts.append(sql.SQL(piece))
    return sql.Composed(parts)


def _read_state(cur: psycopg.Cursor[Any], schema: str) -> _State:
    """Read the server version and the recorded migrations of ``schema``."""
    cur.execute(
        """
        select
          current_setting('server_version_num')::int,
          exists (select from pg_catalog.pg_namespace where nspname = %(schema)s),
          exists (
            select from pg_catalog.pg_class as c
              join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
             where n.nspname = %(schema)s and c.relname = 'migrations'
               and c.relkind in ('r', 'p')),
          array(
            select a.attname::text
              from pg_catalog.pg_attribute as a
              join pg_catalog.pg_class as c on c.oid = a.attrelid
              join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
             where n.nspname = %(schema)s and c.relname = 'migrations'
               and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped)
        """,
        {"schema": schema},
    )
    row = cur.fetchone()
    assert row is not None
    server_version_num, schema_exists, table_exists, column_names = row
    _check_server_version(server_version_num)
    if not table_exists:
        return _State(server_version_num, schema_exists, False, frozenset(), 0, 0)

    columns = frozenset(column_names)
    if "id" not in columns:
        raise MigrationError(
            f'schema "{schema}" has a "migrations" table without an "id" column; '
            "it was not made by graphile-worker or kongtask, so kongtask will not touch it "
            "(choose another schema or remove that table)"
        )
    breaking = (
        sql.SQL("max(id) filter (where breaking)")
        if "breaking" in columns
        else sql.SQL("null::int")
    )
    cur.execute(
        sql.SQL("select coalesce(max(id), 0), coalesce({}, 0) from {}.migrations").format(
            breaking, sql.Identifier(schema)
        )
    )
    latest_row = cur.fetchone()
    assert latest_row is not None
    latest, latest_breaking = latest_row
    return _State(server_version_num, schema_exists, True, columns, latest, latest_breaking)


def _missing_tables(cur: psycopg.Cursor[Any], schema: str) -> list[str]:
    """Tables of revision 19 that are absent from ``schema``."""
    cur.execute(
        """
        select t.name
          from unnest(%s::text[]) as t(name)
         where not exists (
           select from pg_catalog.pg_class as c
             join pg_catalog.pg_namespace as n on n.oid = c.relnamespace
            where n.nspname = %s and c.relname = t.name)
        """,
        (list(_REQUIRED_TABLES), schema),
    )
    return [name for (name,) in cur.fetchall()]


def _bootstrap(cur: psycopg.Cursor[Any], schema: str, state: _State) -> None:
    """Create the schema and the ``migrations`` table if they are not there yet."""
    ident = sql.Identifier(schema)
    if not state.schema_exists:
        cur.execute(sql.SQL("create schema if not exists {}").format(ident))
    if not state.table_exists:
        cur.execute(
            sql.SQL(
                "create table if not exists {}.migrations ("
                " id int primary key,"
                " ts timestamptz not null default now(),"
                " breaking boolean not null default false)"
            ).format(ident)
        )
    elif "breaking" not in state.columns:
        # Only reachable for an empty table made by a very old worker.
        cur.execute(
            sql.SQL(
                "alter table {}.migrations add column if not exists"
                " breaking boolean not null default false"
            ).format(ident)
        )


def _apply(cur: psycopg.Cursor[Any], schema: str, files: list[_MigrationFile]) -> tuple[int, ...]:
    """Record and run ``files`` (already in the open transaction); return the ids recorded."""
    ids = [i for f in files for i in range(f.first_id, f.last_id + 1)]
    # The insert comes first: a concurrent migrator blocks on, then collides with, these ids.
    try:
        cur.execute(
            sql.SQL(
                "insert into {}.migrations (id, breaking)"
                " select id, id = any(%s::int[]) from unnest(%s::int[]) as ids(id)"
            ).format(sql.Identifier(schema)),
            (sorted(BREAKING_MIGRATIONS), ids),
        )
    except psycopg.Error as error:
        if error.sqlstate in _CLASH_SQLSTATES:
            raise _Clash from error
        raise
    for migration in files:
        logger.debug("applying migration file %s to schema %r", migration.name, schema)
        try:
            cur.execute(_render(migration.text, schema))
        except psycopg.Error as error:
            raise MigrationError(
                f"migration {migration.name} failed in schema {schema!r}: "
                f"{error.sqlstate} {error}".rstrip()
                + (
                    " (the schema already holds objects that kongtask needs to create; "
                    "was it made by something else?)"
                    if error.sqlstate in _CLASH_SQLSTATES
                    else ""
                )
            ) from error
    for migration_id in ids:
        payload = json.dumps(
            {"migrationNumber": migration_id, "breaking": migration_id in BREAKING_MIGRATIONS},
            separators=(",", ":"),
        )
        cur.execute("select pg_notify('worker:migrate', %s)", (payload,))
    return tuple(ids)


def _attempt(conn: psycopg.Connection[Any], schema: str, last_seen: int | None) -> MigrationResult:
    """One locked pass: read the state, decide, and migrate (or refuse) in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        # Every statement must see migrators that committed while we waited for the lock.
        cur.execute("set transaction isolation level read committed")
        cur.execute("select pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, schema))
        state = _read_state(cur, schema)
        latest = state.latest

        if latest > LATEST_MIGRATION:
            if state.latest_breaking > LATEST_MIGRATION:
                raise MigrationError(
                    f"Database is using Graphile Worker schema revision {latest} which includes "
                    f"breaking migration {state.latest_breaking}, but the currently running "
                    f"worker only supports up to revision {LATEST_MIGRATION}. It would be unsafe "
                    "to continue; please ensure all versions of Graphile Worker are compatible."
                )
            logger.warning(
                "Database is using Graphile Worker schema revision %d, but the currently "
                "running worker only supports up to revision %d which may or may not be "
                "compatible. Please ensure all versions of Graphile Worker you're running are "
                "compatible, or use Worker Pro which will perform this check for you. "
                "Attempting to continue regardless.",
                latest,
                LATEST_MIGRATION,
            )
            return MigrationResult(schema, latest, latest, (), _apply_extras(cur, schema))

        files = [f for f in _migration_files() if f.last_id > latest]
        if files and files[0].first_id != latest + 1:
            if last_seen is None or last_seen != latest:
                # Maybe a Node migrator is part-way through its one-transaction-per-id run:
                # look again shortly, and only call the schema old once it stands still.
                raise _Clash
            raise MigrationError(
                f"Schema {schema!r} has an older graphile-worker schema (revision {latest}); "
                f"kongtask can only upgrade from revision {files[0].first_id - 1}. Run "
                "graphile-worker 0.17.x's migrations first (for example "
                f"`npx graphile-worker@0.17 --schema-only --schema {schema}`), then start "
                "kongtask again. Nothing was changed."
            )
        if not files:
            missing = _missing_tables(cur, schema)
            if missing:
                raise MigrationError(
                    f"Schema {schema!r} records migration {latest} but lacks the table(s) "
                    f"{', '.join(missing)}; it has been altered by hand. kongtask will not "
                    "guess how to repair it."
                )
            return MigrationResult(schema, latest, latest, (), _apply_extras(cur, schema))

        try:
            _bootstrap(cur, schema, state)
        except psycopg.Error as error:
            if error.sqlstate in _CLASH_SQLSTATES:
                raise _Clash from error
            raise
        applied = _apply(cur, schema, files)
        return MigrationResult(schema, latest, applied[-1], applied, _apply_extras(cur, schema))


# Our own generator: kongtask never moves the application's global random state.
_JITTER = random.Random()


def _retry_delays() -> Iterator[float]:
    """Pauses between attempts after a clash: 0.4-0.6 s each, until the deadline."""
    deadline = time.monotonic() + _CLASH_RETRY_DEADLINE_S
    while time.monotonic() < deadline:
        yield _JITTER.uniform(0.4, 0.6)


def migrate(conn: psycopg.Connection[Any], schema: str = DEFAULT_SCHEMA) -> MigrationResult:
    """Migrate ``schema`` to revision 19 (graphile-worker 0.17), or check that it already is.

    ``conn`` may be in autocommit mode or not, but must have no transaction in
    progress: the work is done and committed in transactions of its own, so a
    failure leaves the database exactly as it was. Safe to call from several
    processes at once (kongtask's or Node's). Raises :class:`MigrationError`
    when the schema is older than revision 19 or newer and breaking, and
    :class:`ConfigurationError` for an invalid schema name.
    """
    check_schema_name(schema)
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ConfigurationError(
            "migrate() needs a connection with no transaction in progress "
            f"(status {conn.info.transaction_status.name})",
            name="conn",
            value=conn,
        )
    last_seen: int | None = None
    delays = _retry_delays()
    while True:
        try:
            result = _attempt(conn, schema, last_seen)
        except _Clash:
            delay = next(delays, None)
            if delay is None:
                raise MigrationError(
                    f"gave up migrating schema {schema!r}: another migrator kept changing it "
                    f"for {_CLASH_RETRY_DEADLINE_S:.0f} s"
                ) from None
            last_seen = _peek_latest(conn, schema)
            logger.debug("schema %r may be changing under another migrator; looking again", schema)
            time.sleep(delay)
            continue
        if result.applied:
            logger.info(
                "migrated schema %r from revision %d to %d",
                schema,
                result.from_version,
                result.to_version,
            )
        else:
            logger.debug("schema %r is at revision %d; nothing to do", schema, result.to_version)
        return result


def _peek_latest(conn: psycopg.Connection[Any], schema: str) -> int:
    """The highest recorded migration id right now (0 if there is no table yet)."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("select to_regclass(format('%%I.migrations', %s::text)) is not null", (schema,))
        row = cur.fetchone()
        if row is None or not row[0]:
            return 0
        cur.execute(
            sql.SQL("select coalesce(max(id), 0) from {}.migrations").format(sql.Identifier(schema))
        )
        latest = cur.fetchone()
        return int(latest[0]) if latest else 0
