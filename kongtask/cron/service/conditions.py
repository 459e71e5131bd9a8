"""Cron conditions, called off the matcher's thread and each with a deadline.

A condition is user code (a feature flag, a holiday calendar behind a network
call) and may hang. The matcher must never wait on it: the other items of the
minute are written at once, and a condition that has not answered by its
deadline skips its firing ("timed out after 5 s"), as one that raises does.

Each call runs on a daemon thread of its own, started for the call. A thread
stuck in a condition cannot be stopped, so at most one call per item is ever
outstanding: while an item's call has not returned, its next firings are
skipped at once ("still running") instead of starting another thread. Threads
are therefore bounded by the number of items that have a condition.

The deadline is a timer on the injectable clock, so with a ManualClock it
passes when the test advances the clock past it, never on its own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from kongtask.cron.schedule import iso_minute
from kongtask.cron.types import Firing, ParsedCronItem
from kongtask.protocols import Clock

__all__ = ["ConditionCalls", "FiringKey", "Verdict"]

logger = logging.getLogger("kongtask.cron")

#: A firing: (identifier, minute).
FiringKey = tuple[str, datetime]
Reply = Callable[[dict[FiringKey, "Verdict"]], None]

_MAX_REASON_LENGTH = 500


@dataclass(frozen=True, slots=True)
class Verdict:
    """A condition's answer for one firing. ``reason`` says why a condition that did
    not answer True or False skipped it (timed out, raised, still running)."""

    run: bool
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class _Call:
    item: ParsedCronItem
    ts: datetime
    backfilled: bool

    @property
    def key(self) -> FiringKey:
        return (self.item.identifier, self.ts)


@dataclass(slots=True)
class _Group:
    """One item's calls in one request, made in order on one thread."""

    identifier: str
    calls: list[_Call]
    position: int = 0
    closed: bool = False
    verdicts: dict[FiringKey, Verdict] = field(default_factory=dict)


class _Request:
    """The calls for one batch of firings: each item's group replies when it settles
    (answered, or cut short by its deadline), whichever comes first."""

    def __init__(self, reply: Reply) -> None:
        self._lock = threading.Lock()
        self._reply = reply

    def answered(self, group: _Group, position: int, verdict: Verdict) -> str:
        """Record a call's answer: ``"next"`` call, ``"done"`` (the group settled), or
        ``"late"`` (the deadline had already settled it)."""
        with self._lock:
            if group.closed or group.position != position:
                return "late"
            group.verdicts[group.calls[position].key] = verdict
            group.position += 1
            if group.position < len(group.calls):
                return "next"
            group.closed = True
            return "done"

    def timed_out(self, group: _Group, position: int, timeout_s: float) -> None:
        """The call at ``position`` missed its deadline (a clock timer's callback)."""
        if self.cut(group, position, f"timed out after {timeout_s:g} s"):
            logger.warning(
                "The condition of cron item %r did not answer within %g s; skipping %s",
                group.identifier,
                timeout_s,
                iso_minute(group.calls[position].ts),
            )

    def cut(self, group: _Group, position: int, reason: str) -> bool:
        """Skip the call at ``position`` for ``reason`` and the group's later calls as
        still running, and settle the group; False if that call had answered."""
        with self._lock:
            if group.closed or group.position != position:
                return False
            group.closed = True
            stuck = group.calls[position]
            group.verdicts[stuck.key] = Verdict(False, reason)
            for call in group.calls[position + 1 :]:
                group.verdicts[call.key] = Verdict(False, _still_running(stuck.ts))
        self.settle(group)
        return True

    def settle(self, group: _Group) -> None:
        """Send a closed group's verdicts (once: only the side that closed it calls this)."""
        self._reply(dict(group.verdicts))


def _still_running(ts: datetime) -> str:
    return f"its condition is still running (the call for {iso_minute(ts)} has not returned)"


def _ask(call: _Call) -> Verdict:
    """Call the condition; an exception skips the firing and says why."""
    item = call.item
    assert item.condition is not None
    firing = Firing(item.identifier, item.task, call.ts, call.backfilled, item.payload)
    try:
        return Verdict(bool(item.condition(firing)))
    except Exception as exc:
        logger.exception(
            "The condition of cron item %r raised; skipping %s",
            item.identifier,
            iso_minute(call.ts),
        )
        return Verdict(False, f"raised {type(exc).__name__}: {exc}"[:_MAX_REASON_LENGTH])


class ConditionCalls:
    """Calls the conditions of cron firings; see the module docstring."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # Items whose call has not returned, and the minute it was for.
        self._running: dict[str, datetime] = {}

    def running(self) -> dict[str, datetime]:
        """Items whose condition call has not returned yet (stuck ones included)."""
        with self._lock:
            return dict(self._running)

    def decide(
        self, firings: Sequence[tuple[ParsedCronItem, datetime, bool]], reply: Reply
    ) -> None:
        """Call the conditions of ``firings`` ((item, minute, backfilled), each item's
        in time order); ``reply`` gets each item's verdicts as soon as they are known
        (from another thread, or from this one for an item still running)."""
        groups: dict[str, _Group] = {}
        for item, ts, backfilled in firings:
            group = groups.setdefault(item.identifier, _Group(item.identifier, []))
            group.calls.append(_Call(item, ts, backfilled))
        request = _Request(reply)
        for group in groups.values():
            with self._lock:
                busy_since = self._running.get(group.identifier)
                if busy_since is None:
                    self._running[group.identifier] = group.calls[0].ts
            if busy_since is not None:
                self._skip_busy(request, group, busy_since)
                continue
            thread = threading.Thread(
                target=self._run,
                args=(request, group),
                name=f"kongtask-cron-condition-{group.identifier}",
                daemon=True,
            )
            thread.start()

    def _skip_busy(self, request: _Request, group: _Group, since: datetime) -> None:
        reason = _still_running(since)
        logger.warning(
            "The condition of cron item %r is still running since %s; skipping %s",
            group.identifier,
            iso_minute(since),
            ", ".join(iso_minute(call.ts) for call in group.calls),
        )
        group.closed = True
        group.verdicts = {call.key: Verdict(False, reason) for call in group.calls}
        request.settle(group)

    def _run(self, request: _Request, group: _Group) -> None:
        """The group's calls in order, each under its deadline (a thread's target)."""
        state, position = "late", 0
        try:
            for position, call in enumerate(group.calls):
                with self._lock:
                    self._running[group.identifier] = call.ts
                timeout_s = call.item.condition_timeout_s
                timer = self._clock.call_later(
                    timeout_s, partial(request.timed_out, group, position, timeout_s)
                )
                verdict = _ask(call)
                timer.cancel()
                state = request.answered(group, position, verdict)
                if state != "next":
                    break
        except Exception:  # a clock that refuses timers, say: never leave the matcher waiting
            logger.exception("Calling the condition of cron item %r failed", group.identifier)
            state = "failed"
        finally:
            # Free the item before replying, so the next minute may call it again.
            with self._lock:
                self._running.pop(group.identifier, None)
        if state == "done":
            request.settle(group)
        elif state == "failed":
            request.cut(group, position, "its condition could not be called")
