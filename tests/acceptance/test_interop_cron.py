"""Many cron schedulers, kongtask and Node graphile-worker 0.17.3, on one database.

Real processes on the real clock, so each test runs across two or three
minute boundaries (about two to three minutes). The crontab's tasks are run by
no worker, so every job stays in ``_private_jobs``; an audit trigger (see
``tests/cronpeer.py``) records every firing and every claim attempt with the
session that made it. The assertion is graphile-worker's promise, kept across
languages: exactly one job per (identifier, minute) for every minute from the
backfill window to the last boundary, none doubled, none missing.
"""

from __future__ import annotations

import random
import re
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask.cron.matcher import matches
from kongtask.cron.parser import parse_crontab
from kongtask.cron.schedule import MINUTE, ceil_minute, cron_timestamp, floor_minute
from kongtask.cron.types import ParsedCronItem
from tests.conftest import to_uri
from tests.cronpeer import (
    Firing,
    Fleet,
    Window,
    attempts_by_writer,
    exactly_once_problems,
    firings,
    install_audit,
    prime_known_crontabs,
    utc_now,
    wait_until,
    writers_attempting,
)
from tests.nodepeer import require_graphile_worker

pytestmark = [pytest.mark.interop, pytest.mark.timeout(290)]

CRONTAB = """\
# One crontab for every process, kongtask and Node alike.
* * * * * tick ?fill=4h
*/2 * * * * even ?fill=4h
* * * * * keyed ?fill=4h&jobKey=cron-keyed
"""
# How far back the identifiers last ran: every process starts by backfilling this.
BACKFILL = timedelta(hours=3)
RELOADED = re.compile(r"Crontab reloaded from")


def items_of(crontab: str) -> dict[str, ParsedCronItem]:
    return {item.identifier: item for item in parse_crontab(crontab)}


def prime(db_url: str, identifiers: list[str]) -> datetime:
    """Make the identifiers known, last run BACKFILL ago; return that minute."""
    last = floor_minute(utc_now()) - BACKFILL
    prime_known_crontabs(db_url, {name: (last - timedelta(days=1), last) for name in identifiers})
    return last


def minute_done(
    items: dict[str, ParsedCronItem], minute: datetime, writers: set[str]
) -> Callable[[psycopg.Connection[Any]], bool]:
    """A predicate: every item due at ``minute`` has its job, and every one of
    ``writers`` has tried to schedule that minute (all but one in vain)."""
    due = [item.task for item in items.values() if matches(item, minute)]

    def check(conn: psycopg.Connection[Any]) -> bool:
        row = conn.execute(
            "select count(distinct task) from cron_audit.firings where task = any(%s) and ts = %s",
            (due, cron_timestamp(minute)),
        ).fetchone()
        done = row is not None and row[0] == len(due)
        return done and writers <= writers_attempting(conn, minute)

    return check


def wait_minute(
    db_url: str, items: dict[str, ParsedCronItem], minute: datetime, fleet: Fleet
) -> None:
    """Wait until ``minute`` is scheduled and every live process of ``fleet`` started
    before it tried it (one started later may find it done when it backfills)."""
    writers = {peer.writer for peer in fleet.live.values() if peer.started_at < minute}
    timeout = (minute - utc_now()).total_seconds() + 45
    try:
        wait_until(db_url, minute_done(items, minute, writers), timeout)
    except TimeoutError:
        with psycopg.connect(db_url, autocommit=True) as conn:
            tried = writers_attempting(conn, minute)
        names = fleet.writer_names()
        raise AssertionError(
            f"minute {minute:%H:%M} not scheduled by the fleet in time; tried by "
            f"{sorted(names.get(w, w) for w in tried)}, live {sorted(fleet.live)}"
        ) from None


def sleep_until(instant: datetime) -> None:
    """Inject the next fault at a wall-clock instant (this schedules a fault; it
    does not wait for an outcome, which is always awaited on a condition)."""
    time.sleep(max(0.0, (instant - utc_now()).total_seconds()))


def summary(fired: list[Firing], fleet: Fleet, attempts: dict[str, int]) -> str:
    names = fleet.writer_names()
    won = Counter(names.get(f.writer, f.writer) for f in fired)
    tried = {names.get(writer, writer): n for writer, n in attempts.items()}
    return (
        f"firings={len(fired)} won={dict(sorted(won.items()))} tried={dict(sorted(tried.items()))}"
    )


def check_queue_rows(db_url: str, fired: list[Firing]) -> None:
    """Jobs nobody runs are all still queued: one row per firing, a keyed job replaced."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        rows = conn.execute(
            "select t.identifier, count(*), max(j.revision) from graphile_worker._private_jobs j "
            "join graphile_worker._private_tasks t on t.id = j.task_id group by t.identifier"
        ).fetchall()
    per_task = Counter(f.task for f in fired)
    for task, count, revision in rows:
        if task == "keyed":
            assert (count, revision) == (1, per_task[task] - 1)
        else:
            assert count == per_task[task], task


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator[Fleet]:
    node_cli = require_graphile_worker()
    install_audit(db_url)
    fleet = Fleet(tmp_path, to_uri(db_url), CRONTAB, node_cli)
    try:
        yield fleet
    finally:
        fleet.kill_everything()


def test_kongtask_processes_and_node_fire_each_minute_once(db_url: str, fleet: Fleet) -> None:
    items = items_of(CRONTAB)
    last = prime(db_url, list(items))
    names = ["node", "k1", "k2", "k3"]
    random.Random(4).shuffle(names)
    fleet.start_all(names)  # together, so that their backfills race
    target = ceil_minute(utc_now()) + MINUTE  # two boundaries with everyone running
    wait_minute(db_url, items, target, fleet)
    codes = fleet.stop_all()

    fired = firings(db_url)
    attempts = attempts_by_writer(db_url)
    print(summary(fired, fleet, attempts))
    window = Window(start=last + MINUTE, end=target + MINUTE, optional_end=target + 3 * MINUTE)
    assert exactly_once_problems(fired, items, dict.fromkeys(items, window)) == []
    assert {name: code for name, code in codes.items() if name != "node"} == {
        "k1": 0,
        "k2": 0,
        "k3": 0,
    }
    assert any(f.backfilled for f in fired) and any(f.backfilled is False for f in fired)
    check_queue_rows(db_url, fired)


def test_many_nodes_with_reloads_kills_and_a_blackout(db_url: str, fleet: Fleet) -> None:
    rng = random.Random(6)
    items = items_of(CRONTAB)
    last = prime(db_url, list(items))
    names = ["node", "k1", "k2", "k3", "k4", "k5"]
    rng.shuffle(names)
    for name in names:
        fleet.start(name)

    # Reload: an item is added to the file; every kongtask reloads on SIGHUP
    # (graphile-worker reads its crontab only at start, so Node learns it on restart).
    grown = CRONTAB + "* * * * * added ?fill=4h\n"
    fleet.crontab.write_text(grown, encoding="utf-8")
    reload_from = utc_now()
    marks = {name: peer.mark() for name, peer in fleet.live.items() if peer.is_kongtask}
    for name in marks:
        fleet.live[name].send(signal.SIGHUP)
    for name, mark in marks.items():
        fleet.live[name].wait_for_line(RELOADED, after=mark, timeout_s=30)
    reload_done = utc_now()

    # Blackout: every process SIGKILLed across a boundary, then all restarted;
    # that minute can only come from the restarted processes' backfill.
    b0 = ceil_minute(utc_now() + timedelta(seconds=20))
    sleep_until(b0 - timedelta(seconds=4))
    for name in list(fleet.live):
        fleet.kill(name)
    sleep_until(b0 + timedelta(seconds=3))
    rng.shuffle(names)
    fleet.start_all(names)  # their backfills of the blackout race each other

    # A second reload changes an item's payload only; nothing may be doubled.
    fleet.crontab.write_text(grown.replace("added ?fill=4h", "added ?fill=4h {v: 2}"))
    marks = {name: peer.mark() for name, peer in fleet.live.items() if peer.is_kongtask}
    for name in marks:
        fleet.live[name].send(signal.SIGHUP)
    for name, mark in marks.items():
        fleet.live[name].wait_for_line(RELOADED, after=mark, timeout_s=30)

    # Node and one kongtask SIGKILLed just before the next boundary, back just after.
    b1 = b0 + MINUTE
    victims = ["node", rng.choice([n for n in names if n != "node"])]
    sleep_until(b1 - timedelta(seconds=2))
    for name in victims:
        fleet.kill(name)
    sleep_until(b1 + timedelta(seconds=2))
    fleet.start_all(victims)
    wait_minute(db_url, items_of(grown), b1, fleet)
    codes = fleet.stop_all()

    fired = firings(db_url)
    attempts = attempts_by_writer(db_url)
    print(summary(fired, fleet, attempts), f"b0={b0:%H:%M} b1={b1:%H:%M}")
    windows = dict.fromkeys(
        items, Window(start=last + MINUTE, end=b1 + MINUTE, optional_end=b1 + 3 * MINUTE)
    )
    windows["added"] = Window(
        start=ceil_minute(reload_done),
        end=b1 + MINUTE,
        optional_start=ceil_minute(reload_from),
        optional_end=b1 + 3 * MINUTE,
    )
    assert exactly_once_problems(fired, items_of(grown), windows) == []
    at_b0 = [f for f in fired if f.ts == b0]
    assert len(at_b0) == 4 - (b0.minute % 2)  # tick, keyed, added, and even when even
    assert all(f.backfilled for f in at_b0), "the blackout minute came from backfill"
    assert all(code == 0 for name, code in codes.items() if name != "node"), codes
    check_queue_rows(db_url, fired)
