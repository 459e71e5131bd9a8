"""Shared pieces of the worker tests: recording events and waiting on them."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from kongtask import events
from kongtask.jobs.context import WorkerContext
from kongtask.runner import Runner
from kongtask.runtime.parts import ActorPart

DEADLINE_S = 30.0


class EventLog:
    """Records (name, payload) of every event a Runner sends, and lets tests wait on them."""

    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        self._receivers: list[tuple[Any, Callable[..., None]]] = []

    def attach(self, runner: Runner) -> None:
        """Listen to every event ``runner`` sends (must be called before it starts)."""
        for name in events.EVENT_NAMES:
            signal = events.signal_for(name)

            def receiver(sender: Any, _name: str = name, **payload: Any) -> None:
                with self._cond:
                    self.records.append((_name, payload))
                    self._cond.notify_all()

            signal.connect(receiver, sender=runner, weak=False)
            self._receivers.append((signal, receiver))

    def detach(self) -> None:
        for signal, receiver in self._receivers:
            signal.disconnect(receiver)
        self._receivers.clear()

    def names(self) -> list[str]:
        with self._cond:
            return [name for name, _ in self.records]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def payloads(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [payload for event, payload in self.records if event == name]

    def wait_for(self, name: str, count: int = 1, timeout_s: float = DEADLINE_S) -> None:
        with self._cond:
            ok = self._cond.wait_for(
                lambda: sum(1 for event, _ in self.records if event == name) >= count, timeout_s
            )
        assert ok, f"expected {count} x {name!r}; last events: {self.names()[-20:]}"


@contextmanager
def recording(runner: Runner) -> Iterator[EventLog]:
    log = EventLog()
    log.attach(runner)
    try:
        yield log
    finally:
        log.detach()


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = DEADLINE_S, what: str = ""
) -> None:
    """Re-check a database condition until it holds (for state no event announces)."""
    deadline = time.monotonic() + timeout_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        pause.wait(0.02)


def jobs(conn: psycopg.Connection[Any], schema: str = "graphile_worker") -> list[dict[str, Any]]:
    """Every job row (with task identifier and queue name), by id."""
    from psycopg import sql
    from psycopg.rows import dict_row

    query = sql.SQL(
        "select j.*, t.identifier as task_identifier, q.queue_name, "
        "extract(epoch from j.run_at - j.updated_at)::float8 as delay_s "
        "from {s}._private_jobs j join {s}._private_tasks t on t.id = j.task_id "
        "left join {s}._private_job_queues q on q.id = j.job_queue_id order by j.id"
    ).format(s=sql.Identifier(schema))
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(query).fetchall()


class Abortable:
    """A handler that waits on its abort event (up to DEADLINE_S), and events that say
    it started and that the abort reached it."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.aborted = threading.Event()

    def __call__(self, payload: Any, helpers: Any) -> None:
        self.started.set()
        if helpers.abort_event.wait(DEADLINE_S):
            self.aborted.set()


def locked_queues(conn: psycopg.Connection[Any]) -> int:
    return conn.execute(
        "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
    ).fetchone()[0]  # type: ignore[index]


def add_jobs_sql(conn: psycopg.Connection[Any], specs: list[dict[str, Any]]) -> None:
    """Enqueue through the schema's own add_jobs function (as any client would)."""
    import json

    conn.execute(
        "select count(*) from graphile_worker.add_jobs(array(select json_populate_recordset("
        "null::graphile_worker.job_spec, %s::json)))",
        (json.dumps(specs),),
    )


def run_until_ran(db_url: str, expected: set[Any]) -> dict[Any, Any]:
    """Run task ``work`` (4 threads, one claim for a small backlog) until every payload ``n``
    in ``expected`` ran and the queue is idle; returns each ``n``'s ``helpers.job``.

    Fails if those jobs did not all run within the deadline or the worker stopped.
    """
    ran: dict[Any, Any] = {}
    lock = threading.Lock()
    all_ran = threading.Event()

    def work(payload: dict[str, Any], helpers: Any) -> None:
        with lock:
            ran[payload["n"]] = helpers.job
            if expected <= set(ran):
                all_ran.set()

    runner = Runner(
        tasks={"work": work},
        connection_string=db_url,
        concurrency=4,
        local_queue_size=50,  # one claim takes a small backlog whole
        install_signal_handlers=False,
    )
    with runner:
        assert all_ran.wait(20), f"jobs did not run: {sorted(expected - set(ran))}"
        runner.join(20)
        assert runner.running, "the worker stopped"
    return ran


def actor_ref(runner: Runner, name: str) -> Any:
    """The actor behind the part ``name`` of a running Runner (to send it messages)."""
    for part in runner.parts():
        if part.name == name and isinstance(part, ActorPart):
            return part.ref
    raise AssertionError(f"the Runner has no actor part {name!r}")


def capture_contexts(monkeypatch: pytest.MonkeyPatch) -> list[WorkerContext]:
    """Record every WorkerContext made from now on (the state a Runner's actors share)."""
    made: list[WorkerContext] = []
    original = WorkerContext.__post_init__

    def post_init(self: WorkerContext) -> None:
        original(self)
        made.append(self)

    monkeypatch.setattr(WorkerContext, "__post_init__", post_init)
    return made
