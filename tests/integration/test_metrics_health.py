"""/metrics, /healthz and /readyz of a real Runner, scraped over HTTP."""

from __future__ import annotations

import json
import selectors
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
import kongtask.ops.metrics
from kongtask.ops.health import DB_TIMEOUT_S, OpsServer, ThreadingWSGIServer
from tests.faults.tcp_proxy import TcpProxy, server_address
from tests.faults.test_cron_faults import (  # noqa: F401  (the fixture)
    PrivateServer,
    private_server_fixture,
)
from tests.integration.ops_support import add, counts_by_sql, seed_every_state
from tests.integration.worker_support import actor_ref, wait_until


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
    metrics = kongtask.ops.metrics.register(registry, runner=runner)
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
            lambda: "waiting" in runner.probe()["claimer"],
            timeout_s=20,
            what="the claimer to be busy retrying",
        )
        status, body = get(runner.ops_server.url + "/healthz")
        assert status == 200, body
        claimer = json.loads(body)["checks"]["claimer"]
        assert claimer["ok"] is True and claimer["waiting"] == "for the database (see /readyz)"
        assert claimer["waiting_s"] >= 0

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


def timed_get(url: str) -> tuple[int, dict[str, Any], float]:
    """Status, decoded JSON body and answer time (seconds) of a probe."""
    started = time.perf_counter()
    status, body = get(url)
    return status, json.loads(body), time.perf_counter() - started


def test_probes_answer_in_time_while_the_database_is_silent(db_url: str) -> None:
    # The database goes silent (every connection, old and new, accepted and never
    # answered): /healthz must answer from what the process knows, at once, and
    # stay green; /readyz answers 503 within its own database deadline.
    with (
        TcpProxy(server_address(db_url)) as proxy,
        kongtask.run(
            tasks={"ok": ok},
            connection_string=proxy.through(db_url),
            metrics_port=0,
            poll_interval_s=0.5,  # the claimer goes into the silent database at once
            install_signal_handlers=False,
        ) as runner,
    ):
        healthz = runner.ops_server.url + "/healthz"
        readyz = runner.ops_server.url + "/readyz"
        assert get(healthz)[0] == 200 and get(readyz)[0] == 200
        proxy.silence(new_connections=True)
        wait_until(
            lambda: "waiting" in timed_get(healthz)[1]["checks"]["claimer"],
            what="/healthz to see the claimer waiting for the database",
        )
        healthz_s, readyz_s = [], []
        for _ in range(5):
            status, report, elapsed = timed_get(healthz)
            assert status == 200, json.dumps(report)
            assert report["checks"]["claimer"]["ok"] is True
            healthz_s.append(elapsed)
            status, report, elapsed = timed_get(readyz)
            assert status == 503, report
            assert report["checks"]["database"]["ok"] is False
            readyz_s.append(elapsed)
        print(
            f"\nsilent database: /healthz {min(healthz_s):.3f}-{max(healthz_s):.3f} s, "
            f"/readyz {min(readyz_s):.3f}-{max(readyz_s):.3f} s"
        )
        assert max(healthz_s) < 0.5
        assert max(readyz_s) < DB_TIMEOUT_S + 0.5
        proxy.close()  # the connections fail at once, so the Runner stops quickly


def test_healthz_turns_red_while_a_cron_actor_is_stuck(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from kongtask import events
    from kongtask.cron.service.writer import CronWriter
    from kongtask.testing import ManualClock

    # A bug outside the database holds the cron writer in its handler.
    entered, release = threading.Event(), threading.Event()
    schedule = CronWriter._schedule

    def stuck(self: CronWriter, planned: Any) -> Any:
        entered.set()
        release.wait(30)
        return schedule(self, planned)

    monkeypatch.setattr(CronWriter, "_schedule", stuck)
    clock = ManualClock(datetime(2026, 1, 1, 0, 0, 30, tzinfo=UTC))
    runner = kongtask.Runner(
        tasks={"tick": ok},
        connection_string=db_url,
        crontab="* * * * * tick",
        clock=clock,
        metrics_port=0,
        install_signal_handlers=False,
    )
    started = threading.Event()

    def on_started(sender: Any, **_: Any) -> None:
        started.set()

    events.cron_started.connect(on_started, sender=runner, weak=False)
    try:
        with runner:
            healthz = runner.ops_server.url + "/healthz"
            assert started.wait(30)
            status, report, _ = timed_get(healthz)
            assert status == 200, report
            assert {"cron:writer", "cron:matcher", "cron:loader"} <= set(report["checks"])
            clock.advance(31)  # 00:01:01: the matcher hands the minute to the writer
            assert entered.wait(30)
            status, report, elapsed = timed_get(healthz)
            assert status == 503, report
            assert report["checks"]["cron:writer"] == {
                "ok": False,
                "error": "did not answer within 0.5s",
            }
            assert report["checks"]["cron:matcher"]["ok"] is True
            assert report["checks"]["claimer"]["ok"] is True
            assert elapsed < 1.0
            release.set()
            wait_until(lambda: get(healthz)[0] == 200, what="/healthz to recover")
    finally:
        release.set()
        events.cron_started.disconnect(on_started)


def test_healthz_names_a_stopped_cron_actor(db_url: str) -> None:
    runner = kongtask.Runner(
        tasks={"tick": ok},
        connection_string=db_url,
        crontab="* * * * * tick",
        metrics_port=0,
        install_signal_handlers=False,
    )
    with runner:
        healthz = runner.ops_server.url + "/healthz"
        assert get(healthz)[0] == 200
        actor_ref(runner, "cron:loader").stop()
        status, report, _ = timed_get(healthz)
        assert status == 503, report
        assert report["checks"]["cron:loader"] == {"ok": False, "error": "the actor has stopped"}


def sampled_metrics(url: str) -> str:
    """The /metrics page once a depth sample succeeded (one may time out on a loaded machine)."""
    pages: list[str] = []

    def sampled() -> bool:
        status, text = get(url + "/metrics")
        pages.append(text)
        return status == 200 and samples(text).get(("kongtask_database_up", ())) == 1

    wait_until(sampled, what="a successful depth sample")
    return pages[-1]


def test_queue_depth_series_are_capped_with_many_tasks(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    # Another application queued jobs under 10,000 task identifiers (inserted
    # directly: 10,000 add_job calls take a minute on a loaded machine).
    db.execute(
        "insert into graphile_worker._private_tasks (identifier)"
        " select 'bulk_' || i from generate_series(1, 10000) i"
    )
    db.execute(
        "insert into graphile_worker._private_jobs (task_id)"
        " select id from graphile_worker._private_tasks where identifier like 'bulk\\_%'"
    )
    db.execute("select graphile_worker.add_job('heavy_a') from generate_series(1, 5)")
    db.execute("select graphile_worker.add_job('heavy_b') from generate_series(1, 3)")
    db.execute("select graphile_worker.add_job('_other') from generate_series(1, 7)")
    db.commit()
    total = 10_000 + 5 + 3 + 7
    with OpsServer.for_database(db_url, schema="graphile_worker") as server:
        started = time.perf_counter()
        text = sampled_metrics(server.url)
        elapsed = time.perf_counter() - started
        jobs = {
            labels: value
            for (name, labels), value in samples(text).items()
            if name == "kongtask_jobs"
        }
        print(
            f"\n10,003 tasks: {len(jobs)} kongtask_jobs series, {len(text)} bytes, {elapsed:.3f} s"
        )
        tasks = {dict(labels)["task"] for labels in jobs}
        assert len(tasks) == kongtask.ops.metrics.DEPTH_MAX_TASKS + 1
        assert {"heavy_a", "heavy_b", "_other"} <= tasks
        assert len(jobs) == len(tasks) * 5  # every state of every series
        assert jobs[(("state", "ready"), ("task", "heavy_a"))] == 5
        assert sum(jobs.values()) == total  # nothing lost in the folding
        # A task literally named "_other" is counted with the folded ones.
        folded_tasks = 10_002 - kongtask.ops.metrics.DEPTH_MAX_TASKS + 1
        assert jobs[(("state", "ready"), ("task", "_other"))] == 7 + folded_tasks - 1
        assert samples(text)[("kongtask_jobs_other_tasks", ())] == folded_tasks

    with OpsServer.for_database(db_url, schema="graphile_worker", depth_max_tasks=2) as server:
        jobs = {
            labels: value
            for (name, labels), value in samples(sampled_metrics(server.url)).items()
            if name == "kongtask_jobs" and dict(labels)["state"] == "ready"
        }
        assert jobs == {
            (("state", "ready"), ("task", "heavy_a")): 5,
            (("state", "ready"), ("task", "heavy_b")): 3,
            (("state", "ready"), ("task", "_other")): 10_007,
        }


def test_bad_depth_max_tasks_is_refused() -> None:
    for bad in (0, -1, True, 2.5, "100"):
        with pytest.raises(kongtask.ConfigurationError, match="depth_max_tasks") as e:
            kongtask.ops.metrics.Metrics(depth_max_tasks=bad)
        assert e.value.name == "depth_max_tasks"


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to ``port`` that never send a byte."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def _wait_closed_by_peer(
    socks: list[socket.socket], timeout_s: float
) -> dict[socket.socket, float]:
    """When (``time.monotonic()``) the server closed each socket, waiting up to ``timeout_s``."""
    closed: dict[socket.socket, float] = {}
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock.recv(1) == b"":
                    closed[sock] = time.monotonic()
                    selector.unregister(sock)
    return closed


def test_idle_connections_hold_no_thread_and_are_closed(db_url: str) -> None:
    idle_timeout_s = ThreadingWSGIServer.idle_timeout_s
    with OpsServer.for_database(db_url, schema="graphile_worker") as server:
        assert get(server.url + "/metrics")[0] == 200
        threads_before = threading.active_count()
        opened = time.monotonic()
        socks = _idle_sockets(server.port, 300)
        try:
            # Accepted after the 300 (one listen queue), served at once all the same.
            started = time.perf_counter()
            status, _ = get(server.url + "/metrics")
            scrape_s = time.perf_counter() - started
            assert status == 200
            threads = threading.active_count()
            assert threads - threads_before <= ThreadingWSGIServer.max_threads
            assert scrape_s < 1.0
            closed = _wait_closed_by_peer(socks, idle_timeout_s + 5)
            assert len(closed) == len(socks), f"{len(socks) - len(closed)} idle sockets open"
            after = sorted(at - opened for at in closed.values())
            print(
                f"\n300 idle connections: {threads - threads_before} more threads, "
                f"scrape {scrape_s:.3f} s, closed after {after[0]:.1f}-{after[-1]:.1f} s"
            )
            assert after[0] >= idle_timeout_s - 0.5  # by the timeout, not before
            assert get(server.url + "/healthz")[0] == 200
        finally:
            for sock in socks:
                sock.close()


def test_past_max_waiting_the_oldest_idle_connection_is_closed(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ThreadingWSGIServer, "max_waiting", 20)
    with OpsServer.for_database(db_url, schema="graphile_worker") as server:
        oldest = _idle_sockets(server.port, 10)
        newest = _idle_sockets(server.port, 19)
        try:
            # Its connection is the 20th waiting: every one of the 10 oldest has to go
            # (before this answers), long before the idle timeout.
            assert get(server.url + "/healthz")[0] == 200
            closed = _wait_closed_by_peer(oldest, ThreadingWSGIServer.idle_timeout_s / 2)
            assert len(closed) == len(oldest)
            assert _wait_closed_by_peer(newest, 0.2) == {}
        finally:
            for sock in oldest + newest:
                sock.close()


def test_metrics_show_limits_and_pauses(db_url: str) -> None:
    with kongtask.WorkerUtils(db_url) as utils:
        utils.set_limit("resize", concurrency=3, rate="6/m")
        utils.set_limit(flag="tenant:1", concurrency=2)
        utils.pause(queue="mail")
    with OpsServer.for_database(db_url, schema="graphile_worker") as server:
        values = samples(get(server.url + "/metrics")[1])
    task, flag = (
        (("key", "resize"), ("key_kind", "task")),
        (("key", "tenant:1"), ("key_kind", "flag")),
    )
    assert values[("kongtask_limit_concurrency", task)] == 3
    assert values[("kongtask_limit_concurrency", flag)] == 2
    assert values[("kongtask_limit_rate_per_second", task)] == pytest.approx(0.1)
    assert ("kongtask_limit_rate_per_second", flag) not in values
    assert values[("kongtask_limit_running", task)] == 0
    assert values[("kongtask_paused", (("key", "mail"), ("kind", "queue")))] == 1
