"""Concurrent limited claims (shared while the room is ample, exclusive near the limit)
never lock more jobs of a key than its limit, against real PostgreSQL."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from kongtask import JobSpec, WorkerUtils
from kongtask.db.statements import Queries
from kongtask.jobs.limits import (
    SHARED_CLAIM_MAX,
    LimitSet,
    claim_limited,
    claim_limited_shared,
)

POOLS = ("pool-0a", "pool-0b", "pool-0c")
QUERIES = Queries("graphile_worker")


def _set_up(
    db_url: str, db: psycopg.Connection[Any], limit: int, jobs: int, pools: tuple[str, ...]
) -> tuple[LimitSet, dict[int, str]]:
    """A concurrency ``limit`` on task ``bulk`` with ``jobs`` of it waiting, and
    ``pools`` registered; returns the pools' view of the limits and the task ids."""
    with WorkerUtils(db_url) as utils:
        utils.set_limit("bulk", concurrency=limit)
        utils.add_jobs([JobSpec("bulk", {"n": n}) for n in range(jobs)])
    for pool in pools:
        db.execute(
            "insert into graphile_worker._kongtask_pools (pool_id, hostname, pid, concurrency, "
            "version) values (%s, 'test', 1, 4, 'test')",
            (pool,),
        )
    snapshot = LimitSet.from_rows(db.execute(QUERIES.limit_snapshot).fetchall())
    task_ids = dict(db.execute("select id, identifier from graphile_worker._private_tasks"))
    return snapshot, task_ids


def _locked(db: psycopg.Connection[Any], holder: str = "%") -> int:
    """How many jobs are locked by holders named like ``holder``."""
    row = db.execute(
        "select count(*) from graphile_worker._private_jobs where locked_by like %s", (holder,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_concurrent_claims_fill_a_limit_exactly_and_never_past_it(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Ample room at first (for every pool's first, exclusive, batch of 40 and many
    # shared ones), then not.
    limit = len(POOLS) * (4 * SHARED_CLAIM_MAX + 40) + 20
    snapshot, task_ids = _set_up(db_url, db, limit, limit + 200, POOLS)
    modes: list[bool] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(POOLS))

    def pool(pool_id: str) -> None:
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                roomy, empty = False, 0
                start.wait(10)
                while empty < 3:
                    rows, plan = claim_limited(
                        conn,
                        QUERIES,
                        snapshot,
                        lambda cursor: cursor.fetchall(),
                        task_ids=task_ids,
                        want=40,
                        now=None,
                        forbidden_flags=None,
                        pool_id=pool_id,
                        shared=roomy,
                    )
                    roomy = plan.shared_ok
                    modes.append(plan.shared)
                    empty = empty + 1 if not rows else 0
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=pool, args=(pool_id,)) for pool_id in POOLS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    locked = db.execute(
        "select locked_by, count(*) from graphile_worker._private_jobs "
        "where locked_by is not null group by locked_by"
    ).fetchall()
    # Filled to the limit exactly, by more than one pool, and no further.
    assert sum(count for _, count in locked) == limit
    assert len(locked) > 1
    # Both ways were taken: shared claims while the room was ample, exclusive near the limit.
    assert True in modes and False in modes
    with WorkerUtils(db_url) as utils:
        assert [info.running for info in utils.list_limits()] == [limit]


def _two_shared_claims(db_url: str, db: psycopg.Connection[Any], held: int) -> list[Any]:
    """Two pools run shared claims side by side (both in flight before either
    commits), with ``held`` jobs of the limited task already locked elsewhere.
    Returns both answers (None: refused)."""
    limit = 2 * SHARED_CLAIM_MAX + 10
    snapshot, task_ids = _set_up(db_url, db, limit, 200, POOLS[:2])
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'elsewhere', locked_at = now() "
        "where id in (select id from graphile_worker._private_jobs order by id limit %s)",
        (held,),
    )
    params = {
        "task_ids": list(task_ids),
        "excluded_queues": [],
        "forbidden_flags": None,
        "now": None,
    }
    conns = [psycopg.connect(db_url) for _ in range(2)]
    try:
        answers = [
            claim_limited_shared(
                conn, QUERIES, snapshot, _rows, params, task_ids=task_ids, want=40, pool_id=pool
            )
            for conn, pool in zip(conns, POOLS[:2], strict=True)
        ]
        for conn in conns:
            conn.commit()
    finally:
        for conn in conns:
            conn.close()
    assert _locked(db) <= limit
    return answers


def _rows(cursor: psycopg.Cursor[Any]) -> list[Any]:
    return cursor.fetchall()


def test_shared_claims_go_ahead_only_with_room_for_every_pools_batch(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Room for exactly 2 x SHARED_CLAIM_MAX: both claim side by side, filling the limit.
    answers = _two_shared_claims(db_url, db, held=10)
    assert [len(answer) for answer in answers] == [SHARED_CLAIM_MAX, SHARED_CLAIM_MAX]
    assert _locked(db, "pool-%") == 2 * SHARED_CLAIM_MAX


def test_shared_claims_give_way_one_short_of_that_room(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    answers = _two_shared_claims(db_url, db, held=11)
    assert answers == [None, None]
    assert _locked(db, "pool-%") == 0


def test_a_shared_claim_that_waited_for_an_exclusive_one_gives_way(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # An exclusive claim finds too little room for a shared one and takes most
    # of it (no key left waiting); meanwhile 20 jobs held elsewhere finish, and
    # a shared claim starts and waits for the rows. Counting from its snapshot
    # (20 fewer held, the exclusive claim's 50 jobs not yet committed) it would
    # see room for both pools' shared batches and claim past the limit.
    limit = 2 * SHARED_CLAIM_MAX + 40
    snapshot, task_ids = _set_up(db_url, db, limit, 300, POOLS[:2])
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'elsewhere', locked_at = now() "
        "where id in (select id from graphile_worker._private_jobs order by id limit 50)"
    )
    exclusive = psycopg.connect(db_url, autocommit=True)
    answer: list[Any] = []
    errors: list[BaseException] = []
    try:
        with exclusive.transaction():
            rows, plan = claim_limited(
                exclusive,
                QUERIES,
                snapshot,
                _rows,
                task_ids=task_ids,
                want=50,
                now=None,
                forbidden_flags=None,
                pool_id=POOLS[0],
                shared=False,
            )
            assert len(rows) == 50 and not plan.shared_ok
            db.execute(
                "update graphile_worker._private_jobs set locked_by = null, locked_at = null "
                "where id in (select id from graphile_worker._private_jobs "
                "where locked_by = 'elsewhere' order by id limit 20)"
            )

            def shared_claim() -> None:
                try:
                    with psycopg.connect(db_url, autocommit=True) as conn:
                        params = {
                            "task_ids": list(task_ids),
                            "excluded_queues": [],
                            "forbidden_flags": None,
                            "now": None,
                        }
                        answer.append(
                            claim_limited_shared(
                                conn,
                                QUERIES,
                                snapshot,
                                _rows,
                                params,
                                task_ids=task_ids,
                                want=40,
                                pool_id=POOLS[1],
                            )
                        )
                except BaseException as exc:  # reported by the test below
                    errors.append(exc)

            waiter = threading.Thread(target=shared_claim)
            waiter.start()
            deadline = time.monotonic() + 10
            while not _waiting_for_a_lock(db):
                assert time.monotonic() < deadline, "the shared claim never waited for the rows"
                time.sleep(0.01)
        waiter.join(10)
    finally:
        exclusive.close()
    assert not errors, errors
    assert answer == [None]
    assert _locked(db) == 30 + 50


def _waiting_for_a_lock(db: psycopg.Connection[Any]) -> bool:
    row = db.execute(
        "select count(*) from pg_stat_activity where wait_event_type = 'Lock' "
        "and datname = current_database()"
    ).fetchone()
    return row is not None and row[0] > 0


def test_the_first_limit_adds_the_index_of_locked_jobs(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # A schema without limits does not pay for the index on every claim.
    query = (
        "select count(*) from pg_indexes where schemaname = 'graphile_worker' "
        "and indexname = '_kongtask_jobs_locked_idx'"
    )
    with WorkerUtils(db_url) as utils:
        utils.migrate()
        assert db.execute(query).fetchone() == (0,)
        utils.set_limit("bulk", concurrency=3)
        utils.set_limit("other", concurrency=2)
        assert db.execute(query).fetchone() == (1,)
        utils.clear_limit("bulk")
        utils.clear_limit("other")
    row = db.execute(
        "select pg_get_indexdef(indexrelid) from pg_index "
        "where indexrelid = 'graphile_worker._kongtask_jobs_locked_idx'::regclass"
    ).fetchone()
    assert row is not None and "WHERE (locked_at IS NOT NULL)" in row[0]
