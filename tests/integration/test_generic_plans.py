"""The claimer and completer plan their statements once, generically, on their own connections."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest

from kongtask.db.connecting import open_pool
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor
from kongtask.settings import ConnectionSettings


class _Planner(DbActor):
    generic_plans = True

    def handle(self, message: Any) -> Any:
        return None


def _mode(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("show plan_cache_mode").fetchone()
    assert row is not None
    return str(row[0])


@pytest.mark.parametrize("prepared", [True, False])
def test_a_generic_planner_sets_and_resets_its_connection(db_url: str, prepared: bool) -> None:
    pool = open_pool(
        db_url,
        ConnectionSettings(),
        name="kt-test-plans",
        min_size=1,
        max_size=1,
        deadline_s=None,
        prepared_statements=prepared,
    )
    try:
        ctx = SimpleNamespace(pool=pool, pool_id="pool-test", give_up=threading.Event())
        actor = _Planner(cast(WorkerContext, ctx))
        conn = actor.run(lambda conn: conn, "Taking the connection")
        # Without prepared statements (pgbouncer) there is no plan to keep: left alone.
        assert _mode(conn) == ("force_generic_plan" if prepared else "auto")
        actor.on_stop()  # gives the connection back to the pool
        with pool.connection(timeout=5) as again:
            assert again is conn  # the pool's only connection
            assert _mode(again) == "auto"
    finally:
        pool.close()


def test_a_handlers_connection_keeps_the_servers_choice(db_url: str) -> None:
    """The claimer's setting stays on the claimer's connection: handlers borrowing from the
    same pool get PostgreSQL's default."""
    from kongtask.runner import Runner

    modes: list[str] = []

    def probe(payload: Any, helpers: Any) -> None:
        with helpers.with_connection() as conn:
            modes.append(_mode(conn))

    with Runner(
        tasks={"probe": probe},
        connection_string=db_url,
        install_signal_handlers=False,
        max_pool_size=3,
    ) as runner:
        for n in range(12):
            runner.add_job("probe", {"n": n})
        runner.join(30)
    assert modes == ["auto"] * 12
