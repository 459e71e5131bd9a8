"""``kongtask status`` and ``kongtask jobs ...`` in a subprocess, checked against SQL."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

import kongtask
from tests.acceptance.test_cli_basics import kongtask as run_cli
from tests.conftest import to_uri
from tests.integration.ops_support import (
    DEAD_POOL,
    LIVE_POOL,
    add,
    counts_by_sql,
    ids_by_sql,
    seed_every_state,
)


@pytest.fixture
def seeded(db: psycopg.Connection[Any]) -> dict[str, list[int]]:
    return seed_every_state(db)


def test_status_on_a_live_worker_matches_sql(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]], tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    # The second item's task is the running worker's, but it is due only on 29 February:
    # an item due every minute could fire while the test runs and add a running job.
    crontab.write_text("0 3 * * * report ?id=nightly\n0 4 29 2 * slow ?id=leap_day\n")
    started = threading.Event()
    release = threading.Event()

    def slow(payload: Any, helpers: Any) -> None:
        started.set()
        release.wait(30)

    runner = kongtask.run(
        tasks={"slow": slow},
        connection_string=db_url,
        crontab_file=str(crontab),
        install_signal_handlers=False,
    )
    try:
        runner.add_job("slow")
        assert started.wait(30)
        result = run_cli("status", "--json", "-c", to_uri(db_url), "--crontab", str(crontab))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        expected = counts_by_sql(db)
        got = {
            (group["name"], state): group[state]
            for group in report["tasks"]
            for state in ("ready", "scheduled", "running", "retrying", "failed")
            if group[state]
        }
        assert got == expected
        assert got[("slow", "running")] == 1
        assert report["running_by_pool"] == {DEAD_POOL: 1, runner.pool_id: 1}
        # The seeded live pool and the running worker's own liveness record.
        assert {p["pool_id"] for p in report["pools"]} == {LIVE_POOL, runner.pool_id}
        assert {c["identifier"] for c in report["cron"]} == {"nightly", "leap_day"}
        text = run_cli("status", "-c", to_uri(db_url), "--crontab", str(crontab))
        assert text.returncode == 0, text.stderr
        assert "reports by " + DEAD_POOL in text.stdout
        assert "leap_day" in text.stdout
    finally:
        release.set()
        runner.stop(30)


def test_jobs_list_failed_matches_sql(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    result = run_cli("jobs", "-c", to_uri(db_url), "list", "--state", "failed", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert sorted(job["id"] for job in listed) == ids_by_sql(db, "failed")
    assert {job["last_error"] for job in listed} == {"bad address", "mailbox full"}
    text = run_cli("jobs", "list", "--state", "failed", "-c", to_uri(db_url))
    assert text.returncode == 0, text.stderr
    assert "mailbox full" in text.stdout and "3/3" in text.stdout


def test_jobs_show_retry_fail_remove_reschedule(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    url = to_uri(db_url)
    failed = seeded["failed"][0]
    shown = run_cli("jobs", "-c", url, "show", str(failed))
    assert shown.returncode == 0, shown.stderr
    assert "state:         failed" in shown.stdout and "bad address" in shown.stdout

    retried = run_cli("jobs", "-c", url, "retry", str(failed), str(seeded["running"][0]))
    assert retried.returncode == 1  # the running job could not be retried, and we say so
    assert f"Not changed (running, or no such job): {seeded['running'][0]}" in retried.stderr
    assert failed in ids_by_sql(db, "retrying")

    ready = seeded["ready"][0]
    fail = run_cli("jobs", "-c", url, "fail", str(ready), "--reason", "operator said no")
    assert fail.returncode == 0, fail.stderr
    row = db.execute(
        "select attempts = max_attempts, last_error from graphile_worker._private_jobs "
        "where id = %s",
        (ready,),
    ).fetchone()
    assert row == (True, "operator said no")

    later = run_cli("jobs", "-c", url, "reschedule", str(seeded["ready"][1]), "--at", "+2h")
    assert later.returncode == 0, later.stderr
    assert seeded["ready"][1] in ids_by_sql(db, "scheduled")

    keyed = db.execute(
        "select id from graphile_worker.add_job('email', job_key => 'welcome:7')"
    ).fetchone()
    assert keyed is not None
    removed = run_cli("jobs", "-c", url, "remove", "welcome:7", "welcome:missing")
    assert removed.returncode == 1
    assert "Removed 1 of 2 job(s): welcome:7" in removed.stdout
    gone = db.execute(
        "select count(*) from graphile_worker._private_jobs where id = %s", (keyed[0],)
    ).fetchone()
    assert gone == (0,)


def test_jobs_errors_are_one_line_and_change_nothing(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    url = to_uri(db_url)
    job = add(db, "email")
    before = db.execute("select run_at from graphile_worker._private_jobs").fetchall()
    bad_time = run_cli("jobs", "-c", url, "reschedule", str(job), "--at", "tomorrow-ish")
    assert bad_time.returncode == 1
    assert "--at expects 'now', '+DURATION'" in bad_time.stderr
    assert "Traceback" not in bad_time.stderr
    missing = run_cli("jobs", "-c", url, "show", "999999")
    assert missing.returncode == 1
    assert "no job with id 999999" in missing.stderr
    bad_state = run_cli("jobs", "-c", url, "list", "--state", "stuck")
    assert bad_state.returncode == 2
    assert "invalid choice: 'stuck'" in bad_state.stderr
    assert db.execute("select run_at from graphile_worker._private_jobs").fetchall() == before


def test_json_logs_and_giving_up_line(db_url: str, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text(
        "def flaky(payload, helpers):\n"
        "    helpers.logger.info('trying')\n"
        "    raise RuntimeError('no luck')\n"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        job = add(conn, "flaky", max_attempts=1)
    result = run_cli("-c", to_uri(db_url), "--tasks", str(tasks), "--once", "--log-format", "json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    assert all(line["ts"].endswith("Z") and "T" in line["ts"] for line in lines)
    handler_line = next(line for line in lines if line["message"].endswith("trying"))
    assert (handler_line["job_id"], handler_line["task"]) == (job, "flaky")
    failed = next(line for line in lines if line["message"].startswith("Failed task"))
    assert (failed["job_id"], failed["task"], failed["attempt"]) == (job, "flaky", 1)
    assert failed["level"] == "ERROR"
    gave_up = next(line for line in lines if line["message"].startswith("Giving up on job"))
    assert gave_up["message"] == f"Giving up on job {job} (flaky) after 1 attempt(s): no luck"
    assert gave_up["pool"].startswith("otpool-")
    assert (gave_up["job_id"], gave_up["attempt"], gave_up["max_attempts"]) == (job, 1, 1)


def test_text_logs_carry_a_timestamp(db_url: str, tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text("def ok(payload, helpers):\n    pass\n")
    result = run_cli("-c", to_uri(db_url), "--tasks", str(tasks), "--once")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines
    import re

    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[kongtask[.\w]*\] [A-Z]+: ")
    assert all(stamp.match(line) for line in lines), lines
    bad = run_cli("--log-format", "xml", "--schema-only", "-c", to_uri(db_url))
    assert bad.returncode == 1
    assert "--log-format must be one of text, json, got 'xml'" in bad.stderr


def test_worker_serves_metrics_and_probes(db_url: str, tmp_path: Path) -> None:
    import re
    import signal
    import subprocess
    import sys
    import urllib.request

    tasks = tmp_path / "tasks.py"
    tasks.write_text("def ok(payload, helpers):\n    pass\n")
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(3):
            add(conn, "ok")
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks", str(tasks)),
            *("--metrics-port", "0", "--log-format", "json"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        url = None
        for line in process.stderr:  # ends when the worker exits (it would fail the test)
            found = re.search(r"Serving /metrics, /healthz and /readyz on (http://\S+?)\"", line)
            if found:
                url = found.group(1)
                break
        assert url, "the worker never said where it serves its metrics"
        with urllib.request.urlopen(url + "/healthz", timeout=10) as response:
            assert response.status == 200
            assert json.loads(response.read())["status"] == "ok"
        with urllib.request.urlopen(url + "/readyz", timeout=10) as response:
            assert response.status == 200
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert b"# TYPE kongtask_jobs_started_total counter" in response.read()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        if process.stderr is not None:
            process.stderr.close()
    assert process.returncode == 0
