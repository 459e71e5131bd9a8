"""The statement deadline: kongtask's own statements are cut off, handlers' own queries are not."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from kongtask.db.connecting import DeadlineExceeded, connect
from kongtask.runner import Runner
from kongtask.settings import ConnectionSettings
from tests.faults.ledger import scalar, wait_until


def test_a_statement_past_its_deadline_is_cancelled_and_its_connection_closed(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    conn = connect(db_url, ConnectionSettings(statement_timeout_s=1), application_name="kt-slow")
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="did not answer within 1 s"):
        conn.execute("select pg_sleep(30)")
    assert time.monotonic() - started < 1 + 2.5
    assert conn.closed and conn.broken
    # The server stopped the statement too (cancelled, then the session closed).
    wait_until(
        lambda: (
            scalar(
                db,
                "select count(*) from pg_stat_activity where application_name = 'kt-slow' "
                "and state = 'active'",
            )
            == 0
        ),
        timeout_s=10,
        what="the server to drop the timed-out statement",
    )


def test_a_handlers_own_queries_have_no_kongtask_deadline(db_url: str) -> None:
    results: list[Any] = []
    done = threading.Event()

    def slow(payload: Any, helpers: Any) -> None:
        results.append(helpers.query("select pg_sleep(2.5) is null as slept"))
        with helpers.with_connection() as conn:
            results.append(conn.execute("select pg_sleep(1.5) is null").fetchone())
        done.set()

    runner = Runner(
        tasks={"slow": slow},
        connection_string=db_url,
        statement_timeout_s=1.0,
        install_signal_handlers=False,
    )
    with runner:
        runner.add_job("slow")
        assert done.wait(15)
        runner.join(30)
    assert results == [[{"slept": False}], (False,)]
