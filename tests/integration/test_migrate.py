"""kongtask.db.migrate against a real PostgreSQL: install, idempotence, refusals, concurrency.

Every test gets a brand-new, empty database (``mig_<hex>``) so that migrations
run from nothing; the shared migrated-template fixtures are not used here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kongtask.db.migrate import (
    BREAKING_MIGRATIONS,
    LATEST_MIGRATION,
    MigrationResult,
    _check_server_version,
    _extra_files,
    migrate,
)
from kongtask.errors import ConfigurationError, MigrationError
from tests.conftest import DatabaseFactory, load_catalog_tool

ODD_SCHEMA = 'My "odd" schema'
ALL_IDS = tuple(range(1, LATEST_MIGRATION + 1))


catalog_tool = load_catalog_tool()


@pytest.fixture
def mig_new_database(databases: DatabaseFactory) -> Callable[[], str]:
    """A factory of empty databases on the test server (dropped after the session)."""
    return lambda: databases.create(prefix="mig")


@pytest.fixture
def mig_url(mig_new_database: Callable[[], str]) -> str:
    """One empty database for the test."""
    return mig_new_database()


@pytest.fixture
def mig_conn(mig_url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the test's empty database."""
    with psycopg.connect(mig_url, autocommit=True) as conn:
        yield conn


def _migration_rows(conn: psycopg.Connection[Any], schema: str) -> list[tuple[Any, ...]]:
    return conn.execute(
        sql.SQL("select id, ts, breaking from {}.migrations order by id").format(
            sql.Identifier(schema)
        )
    ).fetchall()


def _snapshot(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """Every schema (except the system ones) with its catalog and migrations rows, ts included."""
    schemas = [
        name
        for (name,) in conn.execute(
            "select nspname from pg_namespace where nspname not like 'pg\\_%' "
            "and nspname not in ('information_schema') order by nspname"
        ).fetchall()
    ]
    snapshot: dict[str, Any] = {}
    for schema in schemas:
        snapshot[schema] = catalog_tool.dump_catalog(conn, schema)
        if snapshot[schema]["migrations"] is not None:
            snapshot[schema]["migration_ts"] = [
                str(row[1]) for row in _migration_rows(conn, schema)
            ]
    return snapshot


EXTRA_IDS = tuple(number for number, _name, _text in _extra_files())


def test_kongtask_extras_are_recorded_apart_and_applied_once(
    mig_conn: psycopg.Connection[Any],
) -> None:
    migrate(mig_conn)
    with mig_conn.cursor() as cur:
        cur.execute("select id, name from graphile_worker._kongtask_migrations order by id")
        recorded = cur.fetchall()
        cur.execute("select max(id) from graphile_worker.migrations")
        upstream = cur.fetchone()
    assert [number for number, _ in recorded] == list(EXTRA_IDS)
    assert all(name.startswith("kongtask_") for _, name in recorded)
    assert upstream == (LATEST_MIGRATION,)
    assert migrate(mig_conn).extras_applied == ()


def _expected_rows() -> list[tuple[int, bool]]:
    return [(i, i in BREAKING_MIGRATIONS) for i in ALL_IDS]


def test_fresh_install_creates_revision_19(mig_conn: psycopg.Connection[Any]) -> None:
    result = migrate(mig_conn)

    assert result == MigrationResult("graphile_worker", 0, LATEST_MIGRATION, ALL_IDS, EXTRA_IDS)
    assert result.changed
    rows = [(i, b) for i, _ts, b in _migration_rows(mig_conn, "graphile_worker")]
    assert rows == _expected_rows()
    catalog = catalog_tool.dump_catalog(mig_conn, "graphile_worker")
    for table in (
        "_private_jobs",
        "_private_job_queues",
        "_private_tasks",
        "_private_known_crontabs",
    ):
        assert catalog["relations"][table]["row_security"] is True, table
    assert catalog["relations"]["migrations"]["row_security"] is False
    assert catalog["triggers"] == []
    added = mig_conn.execute(
        "select id from graphile_worker.add_job('hello', '{\"a\": 1}', 'q1')"
    ).fetchone()
    assert added is not None
    job = mig_conn.execute(
        "select task_identifier, queue_name, attempts, max_attempts from graphile_worker.jobs"
        " where id = %s",
        added,
    ).fetchone()
    assert job == ("hello", "q1", 0, 25)


def test_second_migrate_changes_nothing(mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    before = _snapshot(mig_conn)

    again = migrate(mig_conn)

    assert again == MigrationResult("graphile_worker", LATEST_MIGRATION, LATEST_MIGRATION, ())
    assert not again.changed
    assert not again.changed
    assert _snapshot(mig_conn) == before


def test_non_autocommit_connection_is_committed(mig_url: str) -> None:
    with psycopg.connect(mig_url) as conn:
        assert not conn.autocommit
        result = migrate(conn, "gw_plain")
        assert result.applied == ALL_IDS
    with psycopg.connect(mig_url, autocommit=True) as other:
        assert len(_migration_rows(other, "gw_plain")) == LATEST_MIGRATION


def test_connection_inside_a_transaction_is_refused(mig_url: str) -> None:
    with psycopg.connect(mig_url) as conn:
        conn.execute("select 1")
        with pytest.raises(ConfigurationError) as caught:
            migrate(conn)
        assert caught.value.name == "conn"
        conn.rollback()
        assert conn.execute("select to_regnamespace('graphile_worker')").fetchone() == (None,)


def test_odd_schema_name_works_including_function_bodies(
    mig_conn: psycopg.Connection[Any],
) -> None:
    result = migrate(mig_conn, ODD_SCHEMA)
    assert result.applied == ALL_IDS
    assert mig_conn.execute("select to_regnamespace('graphile_worker')").fetchone() == (None,)

    schema = sql.Identifier(ODD_SCHEMA)
    first = mig_conn.execute(
        sql.SQL("select id from {}.add_job('odd', job_key => 'k', payload => '[1]')").format(schema)
    ).fetchone()
    assert first is not None
    mig_conn.execute(
        sql.SQL("select {}.add_job('odd', job_key => 'k', payload => '[2]')").format(schema)
    )
    payload = mig_conn.execute(
        sql.SQL("select payload::text from {}._private_jobs").format(schema)
    ).fetchall()
    assert [json.loads(p) for (p,) in payload] == [[1, 2]]
    mig_conn.execute(
        sql.SQL("select {}.reschedule_jobs(array[%s]::bigint[], priority => 3)").format(schema),
        (first[0],),
    )
    mig_conn.execute(sql.SQL("select {}.force_unlock_workers(array['w'])").format(schema))
    mig_conn.execute(
        sql.SQL("select {}.permanently_fail_jobs(array[%s]::bigint[])").format(schema),
        (first[0],),
    )
    removed = mig_conn.execute(sql.SQL("select ({}.remove_job('k')).id").format(schema)).fetchone()
    assert removed == (first[0],)
    assert mig_conn.execute(
        sql.SQL("select count(*) from {}.complete_jobs(array[%s]::bigint[])").format(schema),
        (first[0],),
    ).fetchone() == (0,)
    assert migrate(mig_conn, ODD_SCHEMA).applied == ()


def test_concurrent_migrators_agree(mig_url: str) -> None:
    count = 4
    barrier = threading.Barrier(count, timeout=30)
    results: list[MigrationResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            with psycopg.connect(mig_url, autocommit=True) as conn:
                barrier.wait()
                result = migrate(conn)
            with lock:
                results.append(result)
        except BaseException as error:  # reported by the main thread
            with lock:
                errors.append(error)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    assert errors == []
    assert sorted(r.applied for r in results) == [(), (), (), ALL_IDS]
    assert all(r.to_version == LATEST_MIGRATION for r in results)
    with psycopg.connect(mig_url, autocommit=True) as conn:
        rows = [(i, b) for i, _ts, b in _migration_rows(conn, "graphile_worker")]
    assert rows == _expected_rows()


def test_newer_breaking_schema_is_refused_unchanged(mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    mig_conn.execute("insert into graphile_worker.migrations (id, breaking) values (20, false)")
    mig_conn.execute("insert into graphile_worker.migrations (id, breaking) values (21, true)")
    mig_conn.execute("insert into graphile_worker.migrations (id, breaking) values (22, false)")
    before = _snapshot(mig_conn)

    with pytest.raises(MigrationError) as caught:
        migrate(mig_conn)

    assert str(caught.value) == (
        "Database is using Graphile Worker schema revision 22 which includes breaking "
        "migration 21, but the currently running worker only supports up to revision 19. "
        "It would be unsafe to continue; please ensure all versions of Graphile Worker are "
        "compatible."
    )
    assert _snapshot(mig_conn) == before


def test_newer_non_breaking_schema_warns_and_continues(
    mig_conn: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    migrate(mig_conn)
    mig_conn.execute("insert into graphile_worker.migrations (id, breaking) values (20, false)")
    before = _snapshot(mig_conn)

    with caplog.at_level(logging.WARNING, logger="kongtask.db.migrate"):
        result = migrate(mig_conn)

    assert result == MigrationResult("graphile_worker", 20, 20, ())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "revision 20" in warnings[0].getMessage()
    assert "Attempting to continue regardless" in warnings[0].getMessage()
    assert _snapshot(mig_conn) == before


def test_older_graphile_worker_schema_is_refused_unchanged(
    mig_conn: psycopg.Connection[Any],
) -> None:
    # What graphile-worker 0.16 leaves behind, as far as the bookkeeping goes.
    mig_conn.execute("create schema graphile_worker")
    mig_conn.execute(
        "create table graphile_worker.migrations (id int primary key,"
        " ts timestamptz not null default now(), breaking boolean not null default false)"
    )
    mig_conn.execute(
        "insert into graphile_worker.migrations (id, breaking)"
        " select i, i = any(%s) from generate_series(1, 18) as i",
        (sorted(BREAKING_MIGRATIONS),),
    )
    mig_conn.execute("create table graphile_worker._private_jobs (id bigint primary key)")
    before = _snapshot(mig_conn)

    with pytest.raises(MigrationError) as caught:
        migrate(mig_conn)

    message = str(caught.value)
    assert "older graphile-worker schema (revision 18)" in message
    assert "npx graphile-worker@0.17 --schema-only" in message
    assert _snapshot(mig_conn) == before


def test_unrecognised_objects_in_empty_bookkeeping_are_refused_unchanged(
    mig_conn: psycopg.Connection[Any],
) -> None:
    # The migrations table is there (as a DBA may pre-create it) but so is a foreign table
    # with one of our names: installing would have to overwrite it, so nothing happens.
    mig_conn.execute("create schema graphile_worker")
    mig_conn.execute(
        "create table graphile_worker.migrations (id int primary key,"
        " ts timestamptz not null default now(), breaking boolean not null default false)"
    )
    mig_conn.execute("create table graphile_worker._private_jobs (something text)")
    before = _snapshot(mig_conn)

    with pytest.raises(MigrationError, match="already holds objects"):
        migrate(mig_conn)

    assert _snapshot(mig_conn) == before


def test_precreated_schema_and_migrations_table_are_used(
    mig_conn: psycopg.Connection[Any],
) -> None:
    mig_conn.execute("create schema graphile_worker")
    mig_conn.execute(
        "create table graphile_worker.migrations (id int primary key,"
        " ts timestamptz not null default now(), breaking boolean not null default false)"
    )
    assert migrate(mig_conn).applied == ALL_IDS


def test_revision_19_without_its_tables_is_refused(mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    mig_conn.execute("drop table graphile_worker._private_known_crontabs")
    with pytest.raises(MigrationError, match="_private_known_crontabs"):
        migrate(mig_conn)


def test_foreign_migrations_table_is_refused(mig_conn: psycopg.Connection[Any]) -> None:
    mig_conn.execute("create schema graphile_worker")
    mig_conn.execute("create table graphile_worker.migrations (version text)")
    before = _snapshot(mig_conn)
    with pytest.raises(MigrationError, match='without an "id" column'):
        migrate(mig_conn)
    assert _snapshot(mig_conn) == before


def test_worker_migrate_notifications(mig_url: str, mig_conn: psycopg.Connection[Any]) -> None:
    with psycopg.connect(mig_url, autocommit=True) as listener:
        listener.execute('listen "worker:migrate"')
        migrate(mig_conn)
        payloads: list[str] = []
        deadline = time.monotonic() + 10
        while len(payloads) < LATEST_MIGRATION and time.monotonic() < deadline:
            for notify in listener.notifies(timeout=deadline - time.monotonic()):
                assert notify.channel == "worker:migrate"
                payloads.append(notify.payload)
                if len(payloads) == LATEST_MIGRATION:
                    break
    assert payloads == [
        f'{{"migrationNumber":{i},"breaking":{"true" if i in BREAKING_MIGRATIONS else "false"}}}'
        for i in ALL_IDS
    ]


@pytest.mark.parametrize(
    "schema",
    ["", "x" * 64, "é" * 32, "nul\x00byte", None, 42],
    ids=["empty", "64-bytes", "64-utf8-bytes", "nul", "none", "int"],
)
def test_bad_schema_names_are_rejected_before_touching_the_database(
    mig_url: str, schema: Any
) -> None:
    conn = psycopg.connect(mig_url, autocommit=True)
    conn.close()  # any use of the connection would fail with OperationalError
    with pytest.raises(ConfigurationError) as caught:
        migrate(conn, schema)
    assert caught.value.name == "schema"
    assert caught.value.value == schema


def test_longest_schema_name_is_accepted(mig_conn: psycopg.Connection[Any]) -> None:
    name = "s" * 63
    assert migrate(mig_conn, name).applied == ALL_IDS


def test_servers_older_than_12_are_refused() -> None:
    with pytest.raises(MigrationError, match=r"PostgreSQL 12\.0 or greater.*110022"):
        _check_server_version(110022)
    _check_server_version(120000)


# -- the functions' semantics (the same walk is run against Node's functions in
#    tests/acceptance/test_schema_parity.py) -----------------------------------------


def _job(conn: psycopg.Connection[Any], key: str) -> dict[str, Any]:
    row = conn.execute(
        "select revision, payload, run_at, attempts, key from graphile_worker._private_jobs"
        " where key = %s",
        (key,),
    ).fetchone()
    assert row is not None
    return dict(zip(("revision", "payload", "run_at", "attempts", "key"), row, strict=True))


def test_job_key_modes_walk(mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    base = datetime.fromisoformat("2200-01-01T00:00:00+00:00")
    add = (
        "select graphile_worker.add_job('walk', %s::json, run_at => %s,"
        " job_key => 'UNIQUE', job_key_mode => %s)"
    )
    mig_conn.execute(add, ('{"a":1}', base, "replace"))
    assert _job(mig_conn, "UNIQUE")["revision"] == 0
    mig_conn.execute(add, ('{"a":2}', base + timedelta(seconds=1), "preserve_run_at"))
    job = _job(mig_conn, "UNIQUE")
    assert (job["revision"], job["payload"], job["run_at"]) == (1, {"a": 2}, base)
    mig_conn.execute(add, ('{"a":3}', base + timedelta(seconds=2), "unsafe_dedupe"))
    job = _job(mig_conn, "UNIQUE")
    assert (job["revision"], job["payload"], job["run_at"]) == (2, {"a": 2}, base)
    mig_conn.execute(add, ('{"a":4}', base + timedelta(seconds=3), "replace"))
    job = _job(mig_conn, "UNIQUE")
    assert (job["revision"], job["payload"], job["run_at"]) == (
        3,
        {"a": 4},
        base + timedelta(seconds=3),
    )
    assert mig_conn.execute("select count(*) from graphile_worker.jobs").fetchone() == (1,)

    with pytest.raises(psycopg.Error) as caught:
        mig_conn.execute(add, ("{}", base, "bogus"))
    assert caught.value.sqlstate == "GWBKM"


def test_locked_keyed_job_is_detached_and_replaced(mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    first = mig_conn.execute(
        "select id from graphile_worker.add_job('t', job_key => 'k', max_attempts => 5)"
    ).fetchone()
    assert first is not None
    mig_conn.execute(
        "update graphile_worker._private_jobs set locked_at = now(), locked_by = 'pool-x'"
    )
    second = mig_conn.execute(
        "select id from graphile_worker.add_job('t', job_key => 'k')"
    ).fetchone()
    assert second is not None and second != first
    rows = mig_conn.execute(
        "select id, key, attempts, max_attempts from graphile_worker._private_jobs order by id"
    ).fetchall()
    assert rows == [(first[0], None, 5, 5), (second[0], "k", 0, 25)]


def test_jobs_insert_notification_payloads(mig_url: str, mig_conn: psycopg.Connection[Any]) -> None:
    migrate(mig_conn)
    with psycopg.connect(mig_url, autocommit=True) as listener:
        listener.execute('listen "jobs:insert"')
        mig_conn.execute(
            "select graphile_worker.add_jobs(array["
            "('a', null, null, null, null, null, null, null)::graphile_worker.job_spec,"
            "('b', null, null, null, null, 'kb', null, null)::graphile_worker.job_spec])"
        )
        mig_conn.execute("select graphile_worker.remove_job('kb')")
        payloads: list[dict[str, Any]] = []
        deadline = time.monotonic() + 10
        while len(payloads) < 2 and time.monotonic() < deadline:
            for notify in listener.notifies(timeout=deadline - time.monotonic()):
                payloads.append(json.loads(notify.payload))
                if len(payloads) == 2:
                    break
    assert [p["count"] for p in payloads] == [2, -1]
    assert all(set(p) == {"r", "count"} and isinstance(p["r"], float) for p in payloads)
