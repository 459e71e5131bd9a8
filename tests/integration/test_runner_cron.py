"""A Runner with a crontab: cron firings become jobs that the same Runner runs."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask import ConfigurationError, CrontabError
from kongtask.testing import ManualClock

START = datetime(2021, 1, 1, 3, 59, 30, tzinfo=UTC)


def test_cron_jobs_run_on_the_same_runner(db_url: str) -> None:
    ran: list[dict[str, Any]] = []
    done = threading.Event()

    def report(payload: dict[str, Any], helpers: Any) -> None:
        ran.append(payload)
        done.set()

    clock = ManualClock(START)
    with kongtask.run(
        tasks={"report": report},
        connection_string=db_url,
        crontab="0 4 * * * report {kind: 'daily'}",
        clock=clock,
        install_signal_handlers=False,
    ) as runner:
        clock.wait_for_timers(2)  # the lock sweep and the cron minute
        clock.advance(31)
        assert done.wait(10), "the cron job never ran"
        runner.join()
    assert ran == [
        {"kind": "daily", "_cron": {"ts": "2021-01-01T04:00:00.000Z", "backfilled": False}}
    ]


def test_reload_crontab_from_the_runner(db_url: str, tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("0 4 * * * report\n")
    runner = kongtask.run(
        tasks={"report": lambda payload, helpers: None},
        connection_string=db_url,
        crontab_file=crontab,
        clock=ManualClock(START),
        install_signal_handlers=False,
    )
    try:
        crontab.write_text("0 4 * * * report\n0 5 * * * other\n")
        assert runner.reload_crontab() is True
        crontab.write_text("not a crontab\n")
        assert runner.reload_crontab() is False
    finally:
        runner.stop()


def test_bad_crontab_fails_the_start_and_touches_nothing(empty_db_url: str) -> None:
    with pytest.raises(CrontabError) as info:
        kongtask.run(
            tasks={"t": lambda payload, helpers: None},
            connection_string=empty_db_url,
            crontab="# ok\n0 4 * * * t\n* 24 * * * other\n",
            install_signal_handlers=False,
        )
    assert info.value.line == 3
    assert "Too large value '24' in hours range in line 3 of crontab" in str(info.value)
    with psycopg.connect(empty_db_url) as conn:
        schemas = conn.execute(
            "select count(*) from pg_namespace where nspname = 'graphile_worker'"
        ).fetchone()
    assert schemas == (0,), "the database was migrated although the crontab was bad"


def test_crontab_arguments_are_exclusive() -> None:
    with pytest.raises(ConfigurationError) as info:
        kongtask.Runner(
            tasks={"t": lambda payload, helpers: None}, crontab="", crontab_file="crontab"
        )
    assert info.value.name == "crontab_file"


def test_runner_without_crontab_has_nothing_to_reload(db_url: str) -> None:
    with (
        kongtask.run(
            tasks={"t": lambda payload, helpers: None},
            connection_string=db_url,
            install_signal_handlers=False,
            clock=ManualClock(START),
        ) as runner,
        pytest.raises(kongtask.KongtaskError, match="no crontab"),
    ):
        runner.reload_crontab()


def test_run_once_ignores_the_crontab(db_url: str) -> None:
    ran: list[str] = []
    kongtask.run_once(
        tasks={"report": lambda payload, helpers: ran.append("x")},
        connection_string=db_url,
        crontab="* * * * * report",
    )
    assert ran == []


def test_run_once_refuses_a_bad_crontab(empty_db_url: str, tmp_path: Path) -> None:
    crontab = tmp_path / "bad_crontab"
    crontab.write_text("0 4 * * mon-fry report\n")
    with pytest.raises(CrontabError) as info:
        kongtask.run_once(
            tasks={"report": lambda payload, helpers: None},
            connection_string=empty_db_url,
            crontab_file=crontab,
        )
    assert (info.value.line, info.value.column) == (1, 13)
    assert str(info.value).startswith(f"{crontab}: Could not process line '1' of crontab")
    assert str(info.value).endswith("day of week: 'fry' is not a day name (SUN-SAT)")
    with psycopg.connect(empty_db_url) as conn:
        schemas = conn.execute(
            "select count(*) from pg_namespace where nspname = 'graphile_worker'"
        ).fetchone()
    assert schemas == (0,), "the database was migrated although the crontab was bad"


def test_a_crontab_task_without_a_handler_is_warned_about(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("# served here\n0 4 * * * report\n0 5 * * * reprot ?id=typo\n")
    caplog.set_level(logging.WARNING, logger="kongtask")
    with kongtask.run(
        tasks={"report": lambda payload, helpers: None},
        connection_string=db_url,
        crontab_file=crontab,
        clock=ManualClock(START),
        install_signal_handlers=False,
    ) as runner:
        assert [item.identifier for item in runner.get_cron_items()] == ["report", "typo"]
    warnings = [r.getMessage() for r in caplog.records if "no handler" in r.getMessage()]
    assert warnings == [
        f"Cron item 'typo' (line 3 of crontab file '{crontab}') names task 'reprot', which"
        " this worker has no handler for; its jobs wait for a worker that has one"
    ]


def test_every_actor_and_thread_group_is_a_part(db_url: str) -> None:
    """The job path's parts, cron's, the publisher's: named, probed and counted."""
    clock = ManualClock(START)
    runner = kongtask.Runner(
        tasks={"report": lambda payload, helpers: None},
        connection_string=db_url,
        crontab="0 4 * * * report",
        clock=clock,
        concurrency=2,
        install_signal_handlers=False,
    )
    assert runner.parts() == []
    with runner:
        parts = {part.name: part for part in runner.parts()}
        assert set(parts) == {
            "publisher",
            "claimer",
            "completer",
            "sweeper",
            "liveness",
            "listener",
            "cron:outcomes",
            "executors",
            "cron:writer",
            "cron:matcher",
            "cron:loader",
            "cron:watcher",
        }
        for part in parts.values():
            assert part.probe(5.0) is None, part.name
            stats = part.stats()
            assert stats and all(isinstance(value, int | float) for value in stats.values())
        assert parts["executors"].stats()["threads"] == 2
        assert set(runner.probe()) == set(parts)
        assert runner.scheduler.parts() and {p.name for p in runner.scheduler.parts()} <= set(parts)
    assert runner.parts() == []
