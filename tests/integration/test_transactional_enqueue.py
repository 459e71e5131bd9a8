"""Enqueueing inside the application's own transaction, sync and async, on real PostgreSQL.

A job added on a borrowed connection exists only if that connection's
transaction commits; kongtask never commits, migrates on or closes it. A
committed job wakes a listening worker at once (the insert's NOTIFY is
delivered at commit), long before its poll would find it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import kongtask
from kongtask import ConfigurationError, InvalidJobError, JobSpec, Runner, WorkerUtils

from .worker_support import wait_until

# Far longer than any wait below: a job that runs was woken by its NOTIFY.
POLL_S = 120.0


class Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


def job_count(db: psycopg.Connection[Any]) -> int:
    row = db.execute("select count(*) from graphile_worker._private_jobs").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def app_conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The application's own connection, as a web request would hold it."""
    with psycopg.connect(db_url) as conn:
        yield conn


def test_rolled_back_enqueue_never_existed(
    app_conn: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    def request() -> None:
        with app_conn.transaction():
            app_conn.execute("create table orders (id int)")
            job = kongtask.add_job("send_receipt", {"order": 1}, connection=app_conn)
            assert job.task_identifier == "send_receipt"
            # Not yet visible to anyone else: it is part of the open transaction.
            assert job_count(db) == 0
            raise Rollback

    with pytest.raises(Rollback):
        request()
    assert job_count(db) == 0
    assert not app_conn.closed
    # The connection is still the caller's and still usable.
    assert app_conn.execute("select 1").fetchone() == (1,)


def test_committed_enqueue_is_claimed_at_once(
    db_url: str, app_conn: psycopg.Connection[Any]
) -> None:
    ran = threading.Event()
    seen: list[Any] = []

    def send_receipt(payload: Any, helpers: Any) -> None:
        seen.append(payload)
        ran.set()

    runner = Runner(
        tasks={"send_receipt": send_receipt},
        connection_string=db_url,
        poll_interval_s=POLL_S,
        install_signal_handlers=False,
    )
    with runner:
        wait_until(lambda: runner.listening is True, what="the worker to LISTEN")
        with app_conn.transaction():
            kongtask.add_job("send_receipt", {"order": 2}, connection=app_conn)
            kongtask.add_jobs([JobSpec("send_receipt", {"order": 3})], connection=app_conn)
            # Nothing runs before the caller commits.
            assert not ran.wait(0.5)
        assert ran.wait(20), "a committed job waited for the poll"
        wait_until(lambda: len(seen) == 2, what="both committed jobs to run")
    assert sorted(payload["order"] for payload in seen) == [2, 3]


def test_worker_utils_on_a_borrowed_connection(
    app_conn: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    def request() -> None:
        with app_conn.transaction(), WorkerUtils(app_conn) as utils:
            job = utils.add_job("audit", {"n": 1})
            utils.permanently_fail_jobs([job.id], "changed my mind")
            assert utils.get_job(job.id) is not None
            raise Rollback

    with pytest.raises(Rollback):
        request()
    assert job_count(db) == 0
    assert not app_conn.closed

    with WorkerUtils(connection=app_conn) as utils:
        job = utils.add_job("audit", {"n": 2})
    # WorkerUtils neither committed nor closed the connection: the caller does.
    assert not app_conn.closed
    assert app_conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert job_count(db) == 0
    app_conn.commit()
    assert job_count(db) == 1
    row = db.execute(
        "select payload from graphile_worker._private_jobs where id = %s", (job.id,)
    ).fetchone()
    assert row == ({"n": 2},)


def test_a_connection_with_its_own_row_factory(db_url: str, db: psycopg.Connection[Any]) -> None:
    with psycopg.connect(db_url, row_factory=dict_row, autocommit=True) as conn:
        job = kongtask.add_job("dicts", {"x": 1}, connection=conn)
        jobs = kongtask.add_jobs([{"identifier": "dicts", "payload": {"x": 2}}], connection=conn)
        with WorkerUtils(conn) as utils:
            assert utils.get_job(job.id) is not None
            assert [info.id for info in utils.list_jobs()] == [job.id, jobs[0].id]
            assert utils.status().totals.total == 2
        # The caller's row factory is back as it was.
        assert conn.execute("select 1 as one").fetchone() == {"one": 1}
    assert job.payload == {"x": 1}
    assert [j.payload for j in jobs] == [{"x": 2}]
    assert job_count(db) == 2


def test_async_enqueue_follows_the_transaction(db_url: str, db: psycopg.Connection[Any]) -> None:
    async def scenario() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            try:
                async with conn.transaction():
                    await kongtask.add_job_async("notify", {"n": 1}, connection=conn)
                    raise Rollback
            except Rollback:
                pass
            after_rollback = job_count(db)
            async with conn.transaction():
                job = await kongtask.add_job_async(
                    "notify", {"n": 2}, connection=conn, job_key="notify:2"
                )
                jobs = await kongtask.add_jobs_async(
                    [JobSpec("notify", {"n": 3}), JobSpec("notify", {"n": 4})], connection=conn
                )
                assert job.key == "notify:2"
                assert [j.payload["n"] for j in jobs] == [3, 4]
                # An async connection's open transaction is invisible to others too.
                assert job_count(db) == 0
            return after_rollback, job_count(db)

    assert asyncio.run(scenario()) == (0, 3)


def test_bad_connections_are_refused_by_name(db_url: str) -> None:
    with pytest.raises(ConfigurationError, match=r"must be a psycopg\.Connection") as info:
        kongtask.add_job("t", connection="postgresql://nowhere")  # type: ignore[arg-type]
    assert info.value.name == "connection"

    async def async_on_sync() -> None:
        with psycopg.connect(db_url) as conn:
            await kongtask.add_job_async("t", connection=conn)  # type: ignore[arg-type]

    with pytest.raises(ConfigurationError, match=r"psycopg\.AsyncConnection"):
        asyncio.run(async_on_sync())

    async def sync_on_async() -> None:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            kongtask.add_job("t", connection=conn)  # type: ignore[arg-type]

    with pytest.raises(ConfigurationError, match="add_job_async"):
        asyncio.run(sync_on_async())

    with psycopg.connect(db_url) as conn, pytest.raises(ConfigurationError, match="not both"):
        WorkerUtils(db_url, connection=conn)


def test_bad_job_leaves_the_callers_transaction_usable(
    app_conn: psycopg.Connection[Any], db: psycopg.Connection[Any]
) -> None:
    with app_conn.transaction():
        with pytest.raises(InvalidJobError, match="priority"):
            kongtask.add_job("t", connection=app_conn, priority="high")
        # Checked before the database was touched: the transaction is not aborted.
        kongtask.add_job("t", {"ok": True}, connection=app_conn)
    assert job_count(db) == 1


def test_sqlalchemy_session_connection(db_url: str, db: psycopg.Connection[Any]) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from sqlalchemy.orm import Session

    # The engine takes the test's conninfo through a creator (it may be a unix socket).
    engine = sqlalchemy.create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(db_url)
    )
    try:
        with Session(engine) as session:
            session.execute(sqlalchemy.text("select 1"))
            driver = session.connection().connection.driver_connection
            kongtask.add_job("from_orm", {"n": 1}, connection=driver)
            session.rollback()
        assert job_count(db) == 0
        with Session(engine) as session, session.begin():
            driver = session.connection().connection.driver_connection
            kongtask.add_job("from_orm", {"n": 2}, connection=driver)
        assert job_count(db) == 1
    finally:
        engine.dispose()
