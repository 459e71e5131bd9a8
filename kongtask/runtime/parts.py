"""Parts: every actor or thread group of a run, seen through one small protocol.

A part has a ``name``, answers ``probe(timeout_s)`` (None when healthy, else
why not; never waits on the database) and reports ``stats()``. The health
probe, the metrics and ``Runner.probe`` iterate a host's parts instead of
reaching into the objects that own them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import pykka

from kongtask.runtime.probing import probe_actors

__all__ = ["ActorPart", "Part", "ThreadsPart", "probe_parts"]

Stats = Mapping[str, int | float]


@runtime_checkable
class Part(Protocol):
    """One actor or thread group of a run."""

    @property
    def name(self) -> str:
        """The part's name in probes and metrics (``claimer``, ``cron:writer``, ...)."""
        ...

    def probe(self, timeout_s: float) -> str | None:
        """None if the part answers within ``timeout_s``; else why it does not."""
        ...

    def stats(self) -> Stats:
        """A few numbers about the part now (mailbox length, threads alive, ...)."""
        ...


class ActorPart:
    """A pykka actor as a part: probed with a typed message between two of its messages."""

    __slots__ = ("_name", "ref")

    def __init__(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        self._name = name
        self.ref = ref

    @property
    def name(self) -> str:
        return self._name

    def check(self, timeout_s: float) -> dict[str, Any]:
        """The probe's full answer (``ok``, and ``waiting`` when inside a database call)."""
        return probe_actors({self._name: self.ref}, timeout_s)[self._name]

    def probe(self, timeout_s: float) -> str | None:
        check = self.check(timeout_s)
        return None if check["ok"] else str(check["error"])

    def stats(self) -> Stats:
        inbox = self.ref.actor_inbox
        waiting = inbox.qsize() if isinstance(inbox, queue.Queue) else 0
        return {"mailbox": waiting, "alive": int(self.ref.is_alive())}


class ThreadsPart:
    """Plain threads as a part: healthy while every one of them runs."""

    __slots__ = ("_busy", "_name", "_threads")

    def __init__(
        self,
        name: str,
        threads: Callable[[], Sequence[tuple[str, threading.Thread]]],
        busy: Callable[[], int] | None = None,
    ) -> None:
        self._name = name
        self._threads = threads
        self._busy = busy

    @property
    def name(self) -> str:
        return self._name

    def probe(self, timeout_s: float) -> str | None:
        dead = [label for label, thread in self._threads() if not thread.is_alive()]
        if not dead:
            return None
        kind = "executor threads" if self._name == "executors" else "threads"
        return f"{kind} ended: {', '.join(dead)}"

    def stats(self) -> Stats:
        threads = self._threads()
        stats: dict[str, int | float] = {
            "threads": len(threads),
            "alive": sum(1 for _, thread in threads if thread.is_alive()),
        }
        if self._busy is not None:
            stats["busy"] = self._busy()
        return stats


def probe_parts(parts: Iterable[Part], timeout_s: float) -> dict[str, dict[str, Any]]:
    """Probe every part within ``timeout_s`` in all; name -> ``{"ok": bool, ...}``.

    The actors are asked together (one deadline for all of them), so a few
    stuck parts cost the deadline once, not once each.
    """
    ordered = list(parts)
    actors = {part.name: part.ref for part in ordered if isinstance(part, ActorPart)}
    answers = probe_actors(actors, timeout_s)
    result: dict[str, dict[str, Any]] = {}
    for part in ordered:
        if isinstance(part, ActorPart):
            if part.name in answers:
                result[part.name] = answers[part.name]
            continue
        error = part.probe(timeout_s)
        result[part.name] = {"ok": True} if error is None else {"ok": False, "error": error}
    return result
