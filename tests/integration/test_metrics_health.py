"""/metrics, /healthz and /readyz of a real Runner, scraped over HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import make_conninfo

import kongtask
import kongtask.metrics
from kongtask.health import DB_TIMEOUT_S, OpsServer
from tests.faults.test_cron_faults import (  # noqa: F401  (the fixture)
    PrivateServer,
    private_server_fixture,
)
from tests.integration.ops_support import add, counts_by_sql, seed_every_state
from tests.integration.worker_support import wait_until


def get(url: str) -> tuple[int, str]:
    """Status and body of a GET (503 included)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def ok(payload: Any, helpers: Any) -> None:
    pass


def bad(payload: Any, helpers: Any) -> None:
    raise RuntimeError("bad job")


@pytest.fixture
def runner(db_url: str) -> Iterator[kongtask.Runner]:
    with kongtask.run(
        tasks={"ok": ok, "bad": bad},
        connection_string=db_url,
        concurrency=3,
        metrics_port=0,
        install_signal_handlers=False,
    ) as started:
        yield started


def test_metrics_count_what_the_worker_did(
    runner: kongtask.Runner, db: psycopg.Connection[Any]
) -> None:
    for _ in range(5):
        add(db, "ok")
    for _ in range(3):
        add(db, "bad", max_attempts=1)
    for _ in range(2):
        add(db, "bad", max_attempts=2)  # fails once, then waits to retry
    runner.join()
    url = runner.ops_server.url + "/metrics"

    def counted() -> bool:
        values = samples(get(url)[1])
        return values.get(("kongtask_jobs_started_total", (("task", "bad"),))) == 5

    wait_until(counted, what="the job events to be counted")
    values = samples(get(url)[1])

    def value(name: str, **labels: str) -> float:
        return values.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("kongtask_jobs_started_total", task="ok") == 5
    assert value("kongtask_jobs_succeeded_total", task="ok") == 5
    assert value("kongtask_jobs_failed_total", task="bad") == 5
    assert value("kongtask_jobs_permanently_failed_total", task="bad") == 3
    assert value("kongtask_jobs_failed_total", task="ok") == 0
    assert value("kongtask_job_duration_seconds_count", task="ok") == 5
    assert value("kongtask_job_pickup_latency_seconds_count", task="bad") == 5
    assert value("kongtask_executors", pool=runner.pool_id) == 3
    assert value("kongtask_local_queue_size", pool=runner.pool_id) == 16
    assert value("kongtask_database_up") == 1
    # Queue depth comes from the database: the same numbers SQL gives.
    for (task, state), count in counts_by_sql(db).items():
        assert value("kongtask_jobs", task=task, state=state) == count
    assert value("kongtask_jobs", task="bad", state="failed") == 3
    assert value("kongtask_jobs", task="bad", state="retrying") == 2


def test_healthz_turns_red_while_an_actor_is_stuck(
    runner: kongtask.Runner, db: psycopg.Connection[Any]
) -> None:
    url = runner.ops_server.url + "/healthz"
    status, body = get(url)
    assert status == 200, body
    checks = json.loads(body)["checks"]
    assert {"claimer", "completer", "publisher", "executors"} <= set(checks)
    assert all(check["ok"] for check in checks.values())

    # A receiver that blocks holds the event publisher actor: it stops answering.
    entered, release = threading.Event(), threading.Event()

    def blocking(sender: Any, **_: Any) -> None:
        entered.set()
        release.wait(30)

    kongtask.events.job_start.connect(blocking, sender=runner, weak=False)
    runner.ops_server.probes.probe_timeout_s = 0.5
    try:
        add(db, "ok")
        assert entered.wait(30)
        status, body = get(url)
        assert status == 503, body
        report = json.loads(body)
        assert report["status"] == "failing"
        assert report["checks"]["publisher"] == {
            "ok": False,
            "error": "did not answer within 0.5s",
        }
        assert report["checks"]["claimer"]["ok"] is True
    finally:
        release.set()
        kongtask.events.job_start.disconnect(blocking)
    wait_until(lambda: get(url)[0] == 200, what="/healthz to recover")


def test_metrics_register_into_a_host_registry(runner: kongtask.Runner) -> None:
    from prometheus_client import generate_latest

    registry = CollectorRegistry()
    metrics = kongtask.metrics.register(registry, runner=runner)
    try:
        runner.add_job("ok")
        runner.join()
        wait_until(
            lambda: b'kongtask_jobs_succeeded_total{task="ok"} 1.0' in generate_latest(registry),
            what="the host registry to count the job",
        )
    finally:
        metrics.detach()


def test_metrics_and_probes_for_a_database_alone(db_url: str, db: psycopg.Connection[Any]) -> None:
    seed_every_state(db)
    with OpsServer.for_database(db_url, schema="graphile_worker") as server:
        status, body = get(server.url + "/readyz")
        assert status == 200, body
        assert json.loads(body)["checks"]["database"]["ok"] is True
        assert get(server.url + "/healthz")[0] == 200
        assert get(server.url + "/nope")[0] == 404
        values = samples(get(server.url + "/metrics")[1])
        assert values[("kongtask_jobs", (("state", "ready"), ("task", "email")))] == 3
        assert values[("kongtask_locked_queues", ())] == 1
        assert values[("kongtask_live_pools", ())] == 1


def test_bad_metrics_port_is_refused_before_anything_starts(db_url: str) -> None:
    with pytest.raises(kongtask.ConfigurationError, match="metrics_port must be a TCP port") as e:
        kongtask.Runner(tasks={}, connection_string=db_url, metrics_port=70000)
    assert e.value.name == "metrics_port"


#: Nothing listens on port 1: connecting is refused at once.
_REFUSED = "postgresql://kt@127.0.0.1:1/app"


def test_a_taken_metrics_port_is_refused_before_connecting() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        runner = kongtask.Runner(tasks={"ok": ok}, connection_string=_REFUSED, metrics_port=port)
        # Connecting first would have failed with the refused connection instead.
        with pytest.raises(kongtask.ConfigurationError) as refused:
            runner.start()
    assert str(refused.value) == f"metrics_port {port}: address already in use (host 127.0.0.1)"
    assert refused.value.name == "metrics_port" and refused.value.value == port
    assert runner.pool_id is None and runner.ops_server is None


def test_a_failed_start_gives_the_metrics_port_back() -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    runner = kongtask.Runner(tasks={"ok": ok}, connection_string=_REFUSED, metrics_port=port)
    with pytest.raises(psycopg.OperationalError):
        runner.start()
    with socket.create_server(("127.0.0.1", port)):
        pass  # free again


def test_readyz_follows_the_database_down_and_up(private_server: PrivateServer) -> None:
    url = make_conninfo(private_server.conninfo, dbname="readyz")
    with psycopg.connect(private_server.conninfo, autocommit=True) as conn:
        conn.execute("create database readyz")
    with kongtask.run(
        tasks={"ok": ok},
        connection_string=url,
        metrics_port=0,
        install_signal_handlers=False,
    ) as runner:
        readyz = runner.ops_server.url + "/readyz"
        wait_until(lambda: runner.listening is True, what="LISTEN to connect")
        status, body = get(readyz)
        assert status == 200, body
        assert json.loads(body)["checks"]["listen"]["connected"] is True

        private_server.stop()
        stopped = time.monotonic()
        wait_until(lambda: get(readyz)[0] == 503, timeout_s=DB_TIMEOUT_S + 5, what="503")
        assert time.monotonic() - stopped <= DB_TIMEOUT_S + 5
        status, body = get(readyz)
        report = json.loads(body)
        assert status == 503 and report["status"] == "failing"
        assert report["checks"]["database"]["ok"] is False
        assert report["checks"]["database"]["error"]
        # Alive all the same, even once the claimer is busy retrying its claim
        # (its poll falls due every 2 s): a restart would not bring the database back.
        wait_until(
            lambda: runner.probe(0.3).get("claimer") is not None,
            timeout_s=20,
            what="the claimer to be busy retrying",
        )
        runner.ops_server.probes.probe_timeout_s = 0.3
        status, body = get(runner.ops_server.url + "/healthz")
        assert status == 200, body
        assert json.loads(body)["checks"]["claimer"] == {
            "ok": True,
            "waiting": "for the database (see /readyz)",
        }

        private_server.start()
        wait_until(lambda: get(readyz)[0] == 200, timeout_s=60, what="200 after the restart")
        # Still a working worker: a job added now runs.
        runner.add_job("ok")
        runner.join()


def test_readyz_reports_cron_behind_its_minute(db_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    from kongtask import events
    from kongtask.testing import ManualClock

    clock = ManualClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC))
    runner = kongtask.Runner(
        tasks={"daily": ok},
        connection_string=db_url,
        crontab="1 0 * * * daily",
        clock=clock,
        metrics_port=0,
        install_signal_handlers=False,
    )
    started, scheduled = threading.Event(), threading.Event()

    def on_started(sender: Any, **_: Any) -> None:
        started.set()

    def on_scheduled(sender: Any, **_: Any) -> None:
        scheduled.set()

    events.cron_started.connect(on_started, sender=runner, weak=False)
    events.cron_scheduled.connect(on_scheduled, sender=runner, weak=False)
    try:
        with runner:
            readyz = runner.ops_server.url + "/readyz"
            assert started.wait(30)
            status, body = get(readyz)
            assert status == 200, body
            cron = json.loads(body)["checks"]["cron"]
            assert cron["ok"] is True and cron["lag_s"] < 1  # the next minute is ahead
            # The machine was suspended for ten minutes, and another session
            # holds the cron rows, so the overdue 00:01 firing cannot be written.
            with psycopg.connect(db_url) as blocker:
                blocker.execute("select * from graphile_worker._private_known_crontabs for update")
                clock.jump(timedelta(minutes=10))
                clock.advance(31)
                wait_until(lambda: get(readyz)[0] == 503, what="/readyz to see cron behind")
                cron = json.loads(get(readyz)[1])["checks"]["cron"]
                assert cron["ok"] is False and 600 <= cron["lag_s"] < 602
                assert cron["error"] == "cron is 601s behind its minute"
                assert not scheduled.is_set()
                blocker.rollback()
            # Released: the firing is written and cron catches up minute by minute.
            assert scheduled.wait(30)
            wait_until(lambda: get(readyz)[0] == 200, what="/readyz once cron caught up")
            caught_up = json.loads(get(readyz)[1])["checks"]["cron"]
            assert caught_up["ok"] is True and caught_up["lag_s"] < 60
            values = samples(get(runner.ops_server.url + "/metrics")[1])
            assert values[("kongtask_cron_firings_total", ())] == 1
            assert values[("kongtask_cron_skips_total", ())] == 0
            assert values[("kongtask_cron_lag_seconds_count", ())] == 1
            assert values[("kongtask_cron_lag_seconds_bucket", (("le", "300.0"),))] == 0
            assert values[("kongtask_cron_lag_seconds_bucket", (("le", "600.0"),))] == 0
            assert values[("kongtask_cron_lag_seconds_bucket", (("le", "+Inf"),))] == 1
    finally:
        events.cron_started.disconnect(on_started)
        events.cron_scheduled.disconnect(on_scheduled)
