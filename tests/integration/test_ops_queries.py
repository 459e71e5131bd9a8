"""WorkerUtils' inspection queries against a database seeded with jobs in every state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from kongtask import InvalidJobError, WorkerUtils, parse_crontab
from kongtask.ops.status import JOB_STATES
from tests.integration.ops_support import (
    DEAD_POOL,
    LIVE_POOL,
    counts_by_sql,
    ids_by_sql,
    seed_every_state,
)


@pytest.fixture
def seeded(db_url: str, db: psycopg.Connection[Any]) -> dict[str, list[int]]:
    return seed_every_state(db)


def test_status_counts_match_sql(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    items = parse_crontab("0 3 * * * report ?id=nightly\n*/5 * * * * email ?id=digest\n")
    with WorkerUtils(db_url) as utils:
        report = utils.status(cron_items=items)
    expected = counts_by_sql(db)
    got = {
        (group.name, state): getattr(group, state)
        for group in report.tasks
        for state in JOB_STATES
        if getattr(group, state)
    }
    assert got == expected
    assert (
        report.totals.total
        == db.execute("select count(*) from graphile_worker._private_jobs").fetchone()[0]
    )  # type: ignore[index]
    assert {state: getattr(report.totals, state) for state in JOB_STATES} == {
        state: len(ids) for state, ids in seeded.items()
    }
    (reports,) = report.queues
    assert (reports.name, reports.ready, reports.running, reports.total) == ("reports", 1, 1, 2)
    assert report.running_by_pool == {DEAD_POOL: 1}
    assert [(q.queue_name, q.locked_by) for q in report.locked_queues] == [("reports", DEAD_POOL)]
    assert [(p.pool_id, p.hostname, p.pid, p.concurrency) for p in report.pools] == [
        (LIVE_POOL, "web-1", 4242, 4)
    ]
    cron = {c.identifier: c for c in report.cron}
    assert set(cron) == {"nightly", "digest"}
    assert cron["nightly"].last_execution == datetime(2026, 1, 1, 3, tzinfo=UTC)
    now = report.now
    assert cron["nightly"].next_firing is not None
    assert now < cron["nightly"].next_firing <= now + timedelta(days=1)
    assert cron["nightly"].next_firing.hour == 3
    assert cron["digest"].last_execution is None  # never fired: only in the crontab
    assert cron["digest"].next_firing is not None
    assert cron["digest"].next_firing.minute % 5 == 0


@pytest.mark.parametrize("state", JOB_STATES)
def test_list_jobs_by_state_matches_sql(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]], state: str
) -> None:
    with WorkerUtils(db_url) as utils:
        infos = utils.list_jobs(state=state)
    assert sorted(info.id for info in infos) == ids_by_sql(db, state) == sorted(seeded[state])
    assert {info.state for info in infos} == {state}


def test_list_jobs_filters_and_limit(db_url: str, seeded: dict[str, list[int]]) -> None:
    with WorkerUtils(db_url) as utils:
        reports = utils.list_jobs(queue="reports")
        emails = utils.list_jobs(task="email", state="ready")
        two = utils.list_jobs(limit=2)
        nothing = utils.list_jobs(task="no-such-task")
    assert {info.job.task_identifier for info in reports} == {"report"}
    assert {info.queue_name for info in reports} == {"reports"}
    assert len(reports) == 2
    assert len(emails) == 3
    assert len(two) == 2
    assert nothing == []


def test_bad_filters_name_the_argument(db_url: str) -> None:
    with WorkerUtils(db_url) as utils:
        with pytest.raises(InvalidJobError, match="unknown job state 'stuck'") as info:
            utils.list_jobs(state="stuck")
        assert info.value.field == "state"
        with pytest.raises(InvalidJobError, match="limit") as info:
            utils.list_jobs(limit=0)
        assert info.value.field == "limit"
        with pytest.raises(InvalidJobError, match="job ids"):
            utils.get_job("12")  # type: ignore[arg-type]
        with pytest.raises(InvalidJobError, match="job ids"):
            utils.retry_jobs([1, True])


def test_get_job_detail(db_url: str, seeded: dict[str, list[int]]) -> None:
    retrying = seeded["retrying"][0]
    with WorkerUtils(db_url) as utils:
        info = utils.get_job(retrying)
        missing = utils.get_job(10**12)
    assert info is not None and missing is None
    assert info.state == "retrying"
    assert info.job.last_error == "SMTP timeout"
    assert (info.job.attempts, info.job.max_attempts, info.extra["attempts_left"]) == (2, 5, 3)
    assert 3500 < info.extra["due_in_s"] <= 3600
    assert info.extra["locked_for_s"] is None


def test_retry_runs_failed_and_retrying_jobs_now(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    failed = seeded["failed"][0]
    retrying = seeded["retrying"][0]
    (running,) = seeded["running"]
    db.execute('listen "jobs:insert"')
    with WorkerUtils(db_url) as utils:
        changed = utils.retry_jobs([failed, retrying, running])
    assert sorted(job.id for job in changed) == sorted([failed, retrying])
    rows = {
        row[0]: row[1:]
        for row in db.execute(
            "select id, attempts, max_attempts, run_at <= now(), is_available "
            "from graphile_worker._private_jobs where id = any(%s)",
            ([failed, retrying, running],),
        )
    }
    assert rows[failed] == (3, 4, True, True)  # one more attempt, history kept
    assert rows[retrying] == (2, 5, True, True)
    assert rows[running][3] is False  # the running job was left alone
    notifies = list(db.notifies(timeout=5, stop_after=1))
    assert notifies and notifies[0].channel == "jobs:insert"
    assert '"count":2' in notifies[0].payload


def test_retry_of_nothing_sends_no_notification(
    db_url: str, db: psycopg.Connection[Any], seeded: dict[str, list[int]]
) -> None:
    db.execute('listen "jobs:insert"')
    with WorkerUtils(db_url) as utils:
        assert utils.retry_jobs(seeded["running"]) == []
        assert utils.retry_jobs([10**12]) == []
        # A marker sent afterwards: notifications arrive in commit order, so
        # the first one we get is the marker unless a retry sent one.
        with utils.connection() as conn:
            conn.execute("select pg_notify('jobs:insert', 'marker')")
    (first,) = db.notifies(timeout=10, stop_after=1)
    assert first.payload == "marker"


def test_status_includes_stored_cron_items(db_url: str) -> None:
    with WorkerUtils(db_url) as utils:
        utils.add_cron_item("*/10 * * * * cleanup ?id=tidy")
        report = utils.status()
        with_file = utils.status(cron_items=parse_crontab("0 4 * * * report ?id=tidy\n"))
    (tidy,) = report.cron
    assert (tidy.identifier, tidy.task) == ("tidy", "cleanup")
    assert tidy.next_firing is not None and tidy.next_firing.minute % 10 == 0
    # A node's own crontab item of the same identifier is the one it schedules.
    (mine,) = with_file.cron
    assert (mine.identifier, mine.task) == ("tidy", "report")
