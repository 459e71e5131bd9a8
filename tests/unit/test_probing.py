"""probe_actors: answered, stuck, stopped, and waiting on the database (seen at once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from kongtask.runtime.probing import DatabaseWait, probe_actors

BLOCK = "block"


class Part(pykka.ThreadingActor):
    """Blocks on ``release`` when told to, inside a database wait or not."""

    def __init__(
        self, *, in_database: bool, entered: threading.Event, release: threading.Event
    ) -> None:
        super().__init__()
        self._in_database = in_database
        self._entered = entered
        self._release = release
        self._wait = DatabaseWait.of(self)

    def on_receive(self, message: Any) -> Any:
        if message == BLOCK:
            if self._in_database:
                with self._wait():
                    self._block()
            else:
                self._block()
        return None

    def _block(self) -> None:
        self._entered.set()
        self._release.wait(30)


@pytest.fixture
def parts() -> Iterator[dict[str, Any]]:
    release = threading.Event()
    entered = {name: threading.Event() for name in ("idle", "stuck", "database")}
    refs = {
        name: Part.start(in_database=name == "database", entered=event, release=release)
        for name, event in entered.items()
    }
    try:
        yield {"refs": refs, "entered": entered}
    finally:
        release.set()
        for ref in refs.values():
            try:
                ref.stop(timeout=5)
            except pykka.ActorDeadError:
                pass


def test_each_actor_is_judged_without_waiting_on_the_database(parts: dict[str, Any]) -> None:
    refs, entered = parts["refs"], parts["entered"]
    refs["stuck"].tell(BLOCK)
    refs["database"].tell(BLOCK)
    assert entered["stuck"].wait(5) and entered["database"].wait(5)
    result = probe_actors(refs, 0.5)
    assert result["idle"] == {"ok": True}
    assert result["stuck"] == {"ok": False, "error": "did not answer within 0.5s"}
    database = result["database"]
    assert database["ok"] is True and database["waiting"] == "for the database (see /readyz)"
    assert list(result) == ["idle", "stuck", "database"]


def test_a_database_wait_is_reported_at_once(parts: dict[str, Any]) -> None:
    refs, entered = parts["refs"], parts["entered"]
    refs["database"].tell(BLOCK)
    assert entered["database"].wait(5)
    started = time.monotonic()
    result = probe_actors({"database": refs["database"], "idle": refs["idle"]}, 10.0)
    assert time.monotonic() - started < 1.0  # not the 10 s deadline
    assert result["database"]["ok"] is True and result["idle"] == {"ok": True}


def test_a_stopped_actor_is_named(parts: dict[str, Any]) -> None:
    refs = parts["refs"]
    refs["idle"].stop(timeout=5)
    result = probe_actors({"idle": refs["idle"], "absent": None}, 0.5)
    assert result == {"idle": {"ok": False, "error": "the actor has stopped"}}


def test_a_probe_is_answered_before_a_db_actor_handles_anything() -> None:
    """The typed probe never reaches ``handle`` (the claimer's feeds its fetch policy)."""
    from types import SimpleNamespace
    from typing import cast

    from kongtask.jobs.context import WorkerContext
    from kongtask.jobs.db_actor import DbActor
    from kongtask.runtime.probing import PROBE

    handled: list[object] = []

    class Recorder(DbActor):
        action = "recording"

        def handle(self, message: Any) -> Any:
            handled.append(message)
            return "handled"

    ctx = cast(WorkerContext, SimpleNamespace(pool_id="pool-test", fatal=lambda *_: None))
    ref = Recorder.start(ctx)
    try:
        assert ref.ask(PROBE, timeout=5) is True  # answered by the base class
        assert ref.ask("other", timeout=5) == "handled"
        assert probe_actors({"recorder": ref}, 1.0) == {"recorder": {"ok": True}}
    finally:
        ref.stop()
    assert handled == ["other"]
