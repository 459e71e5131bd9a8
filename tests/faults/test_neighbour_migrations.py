"""A neighbour's migration never stops a worker; a real breaking change to its own schema does.

``worker:migrate`` notices name no schema: migrating any schema of the
database sends them to every listener. A worker checks its own schema's
``migrations`` table before it believes a breaking one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask import WorkerUtils
from kongtask.runner import Runner
from tests.conftest import to_uri
from tests.integration.worker_support import EventLog, recording

from .ledger import WorkerProcess, wait_until

pytestmark = pytest.mark.faults

OTHER = "other_schema"
# graphile-worker's breaking ids among 1..19: a fresh schema sends one notice each.
BREAKING_NOTICES = 7


def _migrate_notices(log: EventLog, breaking: bool = True) -> int:
    count = 0
    for payload in log.payloads("pool:listen:notification"):
        if payload["channel"] == "worker:migrate":
            count += json.loads(payload["payload"]).get("breaking") is breaking
    return count


def _marker_seen(log: EventLog, marker: str) -> bool:
    return any(
        payload["channel"] == "jobs:insert" and marker in payload["payload"]
        for payload in log.payloads("pool:listen:notification")
    )


def _settle(db: psycopg.Connection[Any], log: EventLog, marker: str) -> None:
    """Wait until the listener has handled every notice sent before this call.

    Notices reach a listener in order and it handles them one at a time, so once
    it reports this later one, its decisions about the earlier ones are made.
    """
    db.execute("select pg_notify('jobs:insert', %s)", (json.dumps({"count": 0, "m": marker}),))
    wait_until(lambda: _marker_seen(log, marker), timeout_s=30, what=f"notice {marker}")


def test_second_runner_on_another_schema_leaves_the_first_running(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    done: list[str] = []
    first = Runner(
        tasks={"t": lambda payload, helpers: done.append(payload["who"])},
        connection_string=db_url,
        install_signal_handlers=False,
    )
    with recording(first) as log, first:
        log.wait_for("pool:listen:success")
        second = Runner(
            tasks={"t": lambda payload, helpers: done.append("second " + payload["who"])},
            connection_string=db_url,
            schema=OTHER,
            install_signal_handlers=False,
        )
        with second:  # migrates a fresh schema: 19 notices, 7 breaking
            _settle(db, log, "after-second")
            assert _migrate_notices(log) == BREAKING_NOTICES
            assert first.running and second.running
            first.add_job("t", {"who": "first"})
            second.add_job("t", {"who": "other"})
            first.join(30)
            second.join(30)
        assert first.running
    assert sorted(done) == ["first", "second other"]
    assert log.count("pool:gracefulShutdown") == 1  # only the stop at the end
    assert log.payloads("pool:gracefulShutdown")[0]["message"].startswith(
        "Worker pool is shutting down gracefully"
    )


def test_schema_only_on_another_schema_leaves_a_cli_worker_running(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text("def t(payload, helpers):\n    pass\n")
    worker = WorkerProcess.cli(
        db_url, tasks, tmp_path / "worker.log", jobs=1, env={"KONGTASK_DEBUG": "1"}
    )
    try:
        pool_id = worker.wait_ready()
        wait_until(
            lambda: (
                db.execute(
                    # The listener's last LISTEN: worker:migrate comes before it.
                    "select count(*) from pg_stat_activity where application_name = %s "
                    "and query = 'LISTEN \"kongtask:limits\"'",
                    (pool_id,),
                ).fetchone()
                == (1,)
            ),
            timeout_s=30,
            what="the worker's LISTEN connection",
        )
        migrated = subprocess.run(
            [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--schema-only", "-s", OTHER],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert (migrated.returncode, migrated.stdout.strip()) == (0, "Schema updated"), migrated
        wait_until(
            lambda: worker.log().count("Ignoring a breaking migration notice") == BREAKING_NOTICES,
            timeout_s=30,
            what="the worker to check all seven breaking notices",
        )
        assert worker.proc.poll() is None, worker.log()
        with WorkerUtils(db_url) as utils:
            job = utils.add_job("t", {})
        wait_until(
            lambda: (
                db.execute(
                    "select count(*) from graphile_worker._private_jobs where id = %s", (job.id,)
                ).fetchone()
                == (0,)
            ),
            timeout_s=30,
            what="the job added afterwards to run",
        )
        assert worker.proc.poll() is None, worker.log()
        assert "shutting down" not in worker.log()
    finally:
        worker.close()
    assert worker.proc.returncode == 0


def test_breaking_migration_of_its_own_schema_still_stops_it(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    runner = Runner(
        tasks={"t": lambda payload, helpers: None},
        connection_string=db_url,
        install_signal_handlers=False,
    )
    with recording(runner) as log, runner:
        log.wait_for("pool:listen:success")
        # A notice claiming breaking while the table says otherwise is ignored ...
        db.execute("insert into graphile_worker.migrations (id, breaking) values (20, false)")
        db.execute(
            """select pg_notify('worker:migrate', '{"migrationNumber":20,"breaking":true}')"""
        )
        _settle(db, log, "after-false-alarm")
        assert _migrate_notices(log) == 1
        assert runner.running
        # ... a breaking migration newer than kongtask knows, recorded in its own schema, is not.
        db.execute("insert into graphile_worker.migrations (id, breaking) values (21, true)")
        db.execute(
            """select pg_notify('worker:migrate', '{"migrationNumber":21,"breaking":true}')"""
        )
        assert runner.wait(timeout=30), "the runner did not stop"
    shutdowns = log.payloads("pool:gracefulShutdown")
    assert [payload["message"] for payload in shutdowns] == [
        "A breaking migration was applied to the database"
    ]
