"""Asking actors whether they are alive, without ever waiting on the database.

An actor answers a probe message between two of its messages. One that is
inside a database call cannot answer until the call returns, and that is not
being stuck: the call has its deadline and its retries, and restarting the
process would not bring the database back (``/readyz`` reports the outage).
:class:`DatabaseWait` marks those calls where the probing thread can read
them, so :func:`probe_actors` reports such an actor as waiting at once; an
actor that neither answers nor waits on the database is stuck.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pykka

from kongtask.runtime.actor import PROBE, Probe

__all__ = ["PROBE", "DatabaseWait", "Probe", "probe_actors"]

# How long answers are awaited before a silent actor's database mark is read;
# a healthy actor answers within microseconds, a quick statement within this.
_SLICE_S = 0.05

_waits: weakref.WeakValueDictionary[str, DatabaseWait] = weakref.WeakValueDictionary()
_waits_lock = threading.Lock()


class DatabaseWait:
    """When the owning actor's current database call began (``time.monotonic()``), else None.

    Written by the actor's own thread only, read by probes from any thread.
    """

    __slots__ = ("__weakref__", "since")

    def __init__(self) -> None:
        self.since: float | None = None

    @classmethod
    def of(cls, actor: pykka.Actor) -> DatabaseWait:
        """A new mark for ``actor``, found by :func:`probe_actors` through the actor's ref."""
        wait = cls()
        with _waits_lock:
            _waits[actor.actor_urn] = wait
        return wait

    @contextmanager
    def __call__(self) -> Iterator[None]:
        """Mark the ``with`` block as a database call (nested blocks keep the outer start)."""
        outer = self.since
        if outer is None:
            self.since = time.monotonic()
        try:
            yield
        finally:
            self.since = outer


def _waiting_since(ref: pykka.ActorRef[Any]) -> float | None:
    with _waits_lock:
        wait = _waits.get(ref.actor_urn)
    return wait.since if wait is not None else None


def probe_actors(
    parts: Mapping[str, pykka.ActorRef[Any] | None], timeout_s: float
) -> dict[str, dict[str, Any]]:
    """Ask every actor to answer within ``timeout_s``; name -> ``{"ok": bool, ...}``.

    An actor inside a database call is ``ok`` with ``waiting`` and
    ``waiting_s`` as soon as that is seen; one that neither answers nor waits
    on the database is not ok (``error`` says why). Never touches the database.
    """
    result: dict[str, dict[str, Any]] = {}
    pending: dict[str, tuple[pykka.ActorRef[Any], Any]] = {}
    for name, ref in parts.items():
        if ref is None:
            continue
        try:
            pending[name] = (ref, ref.ask(PROBE, block=False))
        except pykka.ActorDeadError:
            result[name] = {"ok": False, "error": "the actor has stopped"}
    deadline = time.monotonic() + timeout_s
    while pending:
        # Wait a slice on one outstanding answer, then sort out all of them.
        _, first = next(iter(pending.values()))
        try:
            first.get(timeout=max(0.0, min(_SLICE_S, deadline - time.monotonic())))
        except Exception:  # sorted out below, with the others
            pass
        for name, (ref, future) in list(pending.items()):
            check = _check(ref, future)
            if check is not None:
                result[name] = check
                del pending[name]
        if time.monotonic() >= deadline:
            break
    for name in pending:
        result[name] = {"ok": False, "error": f"did not answer within {timeout_s:g}s"}
    return {name: result[name] for name in parts if name in result}


def _check(ref: pykka.ActorRef[Any], future: Any) -> dict[str, Any] | None:
    """The actor's check if it answered, stopped or waits on the database; None if unknown yet."""
    try:
        future.get(timeout=0)
        return {"ok": True}
    except pykka.ActorDeadError:
        return {"ok": False, "error": "the actor has stopped"}
    except pykka.Timeout:
        pass
    except Exception:  # it answered, with its handler's exception
        return {"ok": True}
    since = _waiting_since(ref)
    if since is None:
        return None
    return {
        "ok": True,
        "waiting": "for the database (see /readyz)",
        "waiting_s": round(time.monotonic() - since, 1),
    }
