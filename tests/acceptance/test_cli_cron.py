"""``kongtask cron add|list|history|remove`` in a subprocess, against real PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

from kongtask import WorkerUtils


def cron(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kongtask", "cron", "-c", db_url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_add_list_history_remove(db_url: str, db: Any) -> None:
    added = cron(db_url, "add", "0 4 * * * daily-report ?max=3 {format: 'pdf'}")
    assert added.returncode == 0, added.stderr
    assert (
        added.stdout.strip() == 'added daily-report: 0 4 * * * daily-report ?max=3 {"format":"pdf"}'
    )
    again = cron(db_url, "add", "0 5 * * * daily-report")
    assert again.returncode == 1 and "exists already" in again.stderr
    bad = cron(db_url, "add", "0 4 * * * x ?jobKey=a%00b")
    assert bad.returncode == 1 and "NUL character" in bad.stderr
    listed = cron(db_url, "list")
    assert listed.stdout.splitlines() == [
        'daily-report\t0 4 * * * daily-report ?max=3 {"format":"pdf"}',
        "1 stored item(s)",
    ]
    db.execute(
        "insert into graphile_worker._kongtask_cron_history"
        " (identifier, task, scheduled_at, outcome, job_id, node, duration_s)"
        " values ('daily-report', 'daily-report', %s, 'success', 7, 'host-a', 0.25)",
        (datetime(2024, 1, 1, 4, tzinfo=UTC),),
    )
    history = cron(db_url, "history", "daily-report")
    assert history.stdout.splitlines() == [
        "2024-01-01T04:00:00Z  daily-report  success  job 7  0.250s  on time  node host-a"
    ]
    assert cron(db_url, "remove", "daily-report").returncode == 0
    assert cron(db_url, "remove", "daily-report").returncode == 1
    with WorkerUtils(db_url) as utils:
        assert utils.list_cron_items() == []
        (run,) = utils.cron_history("daily-report")
        assert run.outcome == "success" and run.job_id == 7
