"""The pools' per-minute task statistics, and the dashboard's chart drawn from them."""

from __future__ import annotations

import re
from typing import Any

import psycopg

from kongtask import Runner
from kongtask.ops.dashboard import DashboardServer
from tests.integration.ops_support import add
from tests.integration.test_dashboard_http import Client
from tests.integration.worker_support import wait_until

STATS = (
    "select task, sum(finished)::int, sum(failed)::int, sum(latency_count)::int, "
    "max(latency_max_s) from graphile_worker._kongtask_task_stats "
    "where minute > now() - interval '1 hour' group by task order by task"
)


WRITTEN = (
    "select coalesce(sum(finished + failed), 0)::int from graphile_worker._kongtask_task_stats "
    "where pool_id <> 'old-pool'"
)


def fails(payload: Any, helpers: Any) -> None:
    raise RuntimeError("no")


def test_pools_record_outcomes_by_task_and_the_chart_shows_them_from_the_first_load(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # A row past the kept window: the pool's write prunes it.
    db.execute(
        "insert into graphile_worker._kongtask_task_stats (minute, task, pool_id, finished) "
        "values (date_trunc('minute', now() - interval '25 hours'), 'ok', 'old-pool', 99)"
    )
    for _ in range(5):
        add(db, "ok")
    for _ in range(2):
        add(db, "bad", max_attempts=1)
    runner = Runner(
        tasks={"ok": lambda payload, helpers: None, "bad": fails},
        connection_string=db_url,
        install_signal_handlers=False,
        heartbeat_interval_s=0.2,
    )
    with runner:
        runner.join()
        # Written by a heartbeat while the pool runs (not only at its stop).
        wait_until(
            lambda: db.execute(WRITTEN).fetchone() == (7,),
            what="a heartbeat to write the statistics",
        )
    rows = db.execute(STATS).fetchall()
    assert [row[:4] for row in rows] == [("bad", 0, 2, 2), ("ok", 5, 0, 5)]
    assert all(row[4] is not None and row[4] >= 0 for row in rows)
    assert db.execute(
        "select count(*) from graphile_worker._kongtask_task_stats where pool_id = 'old-pool'"
    ).fetchone() == (0,)

    # A dashboard started after the jobs finished shows them at once.
    with DashboardServer(db_url, port=0) as server:
        status, _, page = Client(server.port).request("GET", "/")
    assert status == 200
    ok = re.search(r'<tr data-task="ok">.*?</tr>', page, re.S)
    assert ok and '<td class="n">5</td><td class="n">0</td>' in ok.group(0)
    bad = re.search(r'<tr data-task="bad">.*?</tr>', page, re.S)
    assert bad and '<td class="n">0</td><td class="n">2</td>' in bad.group(0)
    chart = page[page.index('<section id="chart">') : page.index('<section id="throughput">')]
    # A minute's bar per series (the outcomes may straddle a minute boundary).
    assert sum(map(int, re.findall(r"UTC: (\d+) finished</title>", chart))) == 5
    assert sum(map(int, re.findall(r"UTC: (\d+) failed</title>", chart))) == 2


def test_a_task_no_live_pool_serves_is_flagged(db_url: str, db: psycopg.Connection[Any]) -> None:
    for _ in range(3):
        add(db, "resize")
    add(db, "ok", run_at="2999-01-01T00:00:00Z")  # not due: not flagged
    runner = Runner(
        tasks={"ok": lambda payload, helpers: None},
        connection_string=db_url,
        install_signal_handlers=False,
    )
    with runner, DashboardServer(db_url, port=0) as server:
        client = Client(server.port)
        _, _, page = client.request("GET", "/")
        warnings = re.findall(
            r'<div class="warn" role="alert" data-unserved="(\w+)">(.*?)</div>', page
        )
        assert warnings == [("resize", "No live pool serves task <code>resize</code>: 3 ready.")]
        served = db.execute(
            "select tasks from graphile_worker._kongtask_pools where pool_id = %s",
            (runner.pool_id,),
        ).fetchone()
        assert served == (["ok"],)
        # A pool from before the task list (null) may serve anything: no warning.
        db.execute(
            "insert into graphile_worker._kongtask_pools (pool_id, hostname, pid, concurrency, "
            "version) values ('pool-older', 'h', 1, 1, 'old')"
        )
        _, _, page = client.request("GET", "/")
        assert 'class="warn"' not in page
