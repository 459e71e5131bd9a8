"""The worker's own upkeep: it vacuums a jobs table whose dead rows autovacuum left behind."""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from kongtask.runner import Runner
from tests.faults.ledger import dead_and_vacuums, leave_dead_rows, scalar, wait_until


def _runner(db_url: str, **options: Any) -> Runner:
    options.setdefault("install_signal_handlers", False)
    return Runner(tasks={"t": lambda payload, helpers: None}, connection_string=db_url, **options)


def test_a_worker_vacuums_a_table_autovacuum_left_full_of_dead_rows(
    db_url: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    leave_dead_rows(db, 3_000)
    with (
        caplog.at_level(logging.INFO, logger="kongtask.jobs.upkeep"),
        _runner(db_url, vacuum_after_dead_rows=1_000) as runner,
    ):
        # Checked as the pool registers: the vacuum runs beside the claims.
        wait_until(lambda: dead_and_vacuums(db)[1] >= 1, timeout_s=30, what="a vacuum of the table")
        runner.add_jobs([{"identifier": "t", "payload": {"n": n}} for n in range(20)])
        runner.join(30)
    assert dead_and_vacuums(db)[0] < 1_000
    messages = [record.getMessage() for record in caplog.records]
    assert any(
        "Vacuuming the jobs table: 3000 dead rows beside 0 live ones" in m for m in messages
    ), messages
    assert any(m.startswith("Vacuumed the jobs table in ") for m in messages), messages
    assert scalar(db, "select count(*) from graphile_worker._private_jobs") == 0


def test_no_vacuum_below_the_threshold_or_with_upkeep_off(
    db_url: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    leave_dead_rows(db, 3_000)
    for options in ({"vacuum_after_dead_rows": 5_000}, {"vacuum_after_dead_rows": None}):
        with caplog.at_level(logging.INFO, logger="kongtask.jobs.upkeep"):
            runner = _runner(db_url, heartbeat_interval_s=0.2, **options).start()
            try:
                # The start-up check and a few heartbeats' checks have come and gone.
                first = scalar(db, "select last_seen from graphile_worker._kongtask_pools")
                wait_until(
                    lambda first=first: (
                        scalar(db, "select max(last_seen) from graphile_worker._kongtask_pools")
                        > first
                    ),
                    timeout_s=10,
                    what="a heartbeat",
                )
                assert not [t for t in threading.enumerate() if t.name.startswith("kongtask-vac")]
            finally:
                assert runner.stop(30)
        assert dead_and_vacuums(db) == (3_000, 0), options
        assert not [r for r in caplog.records if r.name == "kongtask.jobs.upkeep"], options


def test_a_role_that_does_not_own_the_table_is_told_once(
    db_url: str, db: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    role = f"kt_upkeep_{secrets.token_hex(4)}"
    ident = sql.Identifier(role)
    db.execute(sql.SQL("create role {} login bypassrls").format(ident))
    try:
        db.execute(sql.SQL("grant usage, create on schema graphile_worker to {}").format(ident))
        # Every right a worker uses, but not MAINTAIN (PostgreSQL 17 and later), which
        # would let the role vacuum the table.
        for rights, kind in (
            ("select, insert, update, delete", "tables"),
            ("all", "sequences"),
            ("all", "functions"),
        ):
            db.execute(
                sql.SQL("grant {} on all {} in schema graphile_worker to {}").format(
                    sql.SQL(rights), sql.SQL(kind), ident
                )
            )
        leave_dead_rows(db, 3_000)
        as_role = make_conninfo(db_url, user=role)
        with (
            caplog.at_level(logging.INFO, logger="kongtask.jobs.upkeep"),
            _runner(as_role, vacuum_after_dead_rows=1_000) as runner,
        ):
            wait_until(
                lambda: any("was not vacuumed" in r.getMessage() for r in caplog.records),
                timeout_s=30,
                what="the warning",
            )
            runner.add_job("t")
            runner.join(30)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "leaving it to autovacuum" in warnings[0].getMessage()
        assert dead_and_vacuums(db)[1] == 0
    finally:
        db.execute(sql.SQL("drop owned by {}").format(ident))
        db.execute(sql.SQL("drop role {}").format(ident))
