"""Concurrent limited claims (shared while the room is ample, exclusive near the limit)
never lock more jobs of a key than its limit, against real PostgreSQL."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from kongtask import JobSpec, WorkerUtils
from kongtask.db.statements import Queries
from kongtask.jobs.limits import SHARED_CLAIM_MAX, LimitSet, claim_limited, plan_limited_claim

POOLS = ("pool-0a", "pool-0b", "pool-0c")


def test_concurrent_claims_fill_a_limit_exactly_and_never_past_it(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    limit = len(POOLS) * SHARED_CLAIM_MAX + 20  # ample room at first, then not
    with WorkerUtils(db_url) as utils:
        utils.set_limit("bulk", concurrency=limit)
        utils.add_jobs([JobSpec("bulk", {"n": n}) for n in range(400)])
    for pool in POOLS:
        db.execute(
            "insert into graphile_worker._kongtask_pools (pool_id, hostname, pid, concurrency, "
            "version) values (%s, 'test', 1, 4, 'test')",
            (pool,),
        )
    queries = Queries("graphile_worker")
    snapshot = LimitSet.from_rows(db.execute(queries.limit_snapshot).fetchall())
    task_ids = dict(db.execute("select id, identifier from graphile_worker._private_tasks"))
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
                        queries,
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


def _two_shared_plans(db_url: str, db: psycopg.Connection[Any], held: int) -> list[Any]:
    """Two pools plan shared claims side by side (both planned before either claims),
    with ``held`` jobs of the limited task already locked elsewhere; then each claims
    and commits. Returns both plans."""
    limit = 2 * SHARED_CLAIM_MAX + 10
    with WorkerUtils(db_url) as utils:
        utils.set_limit("bulk", concurrency=limit)
        utils.add_jobs([JobSpec("bulk", {"n": n}) for n in range(200)])
    db.execute(
        "update graphile_worker._private_jobs set locked_by = 'elsewhere', locked_at = now() "
        "where id in (select id from graphile_worker._private_jobs order by id limit %s)",
        (held,),
    )
    for pool in POOLS[:2]:
        db.execute(
            "insert into graphile_worker._kongtask_pools (pool_id, hostname, pid, concurrency, "
            "version) values (%s, 'test', 1, 4, 'test')",
            (pool,),
        )
    queries = Queries("graphile_worker")
    snapshot = LimitSet.from_rows(db.execute(queries.limit_snapshot).fetchall())
    task_ids = dict(db.execute("select id, identifier from graphile_worker._private_tasks"))
    conns = [psycopg.connect(db_url, autocommit=True) for _ in range(2)]
    try:
        transactions = [conn.transaction() for conn in conns]
        plans = []
        for conn, transaction in zip(conns, transactions, strict=True):
            transaction.__enter__()
            plans.append(
                plan_limited_claim(
                    conn,
                    queries,
                    snapshot,
                    task_ids=task_ids,
                    want=40,
                    now=None,
                    forbidden_flags=None,
                    shared=True,
                )
            )
        for conn, transaction, plan, pool in zip(
            conns, transactions, plans, POOLS[:2], strict=True
        ):
            if plan.runnable is not None:
                conn.execute(queries.claim_limited_runnable, {**plan.runnable, "pool_id": pool})
            transaction.__exit__(None, None, None)
    finally:
        for conn in conns:
            conn.close()
    locked = db.execute(
        "select count(*) from graphile_worker._private_jobs where locked_by is not null"
    ).fetchone()
    assert locked is not None and locked[0] <= limit
    return plans


def test_shared_claims_go_ahead_only_with_room_for_every_pools_batch(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Room for exactly 2 x SHARED_CLAIM_MAX: both claim side by side, filling the limit.
    plans = _two_shared_plans(db_url, db, held=10)
    assert [plan.again_exclusive for plan in plans] == [False, False]
    assert all(plan.runnable is not None for plan in plans)
    assert db.execute(
        "select count(*) from graphile_worker._private_jobs where locked_by like 'pool-%%'"
    ).fetchone() == (2 * SHARED_CLAIM_MAX,)


def test_shared_claims_give_way_one_short_of_that_room(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    plans = _two_shared_plans(db_url, db, held=11)
    assert [plan.again_exclusive for plan in plans] == [True, True]
    assert db.execute(
        "select count(*) from graphile_worker._private_jobs where locked_by like 'pool-%%'"
    ).fetchone() == (0,)
