"""The cron Matcher: owns the cron timeline of one Runner.

It registers the crontab's identifiers, backfills missed firings, then wakes
once a minute (through the injectable clock) and asks the CronWriter to
schedule the items due at that minute. The protocol is graphile-worker's:

- a timer that fires early (the clock went back) waits for the same minute
  again (``cron:prematureTimer``); one that fires late processes the overdue
  minute at once and catches up minute by minute (``cron:overdueTimer``);
- the minute pointer only moves forward after the database accepted the
  minute, so a failed write is retried for the same minute (with jittered
  back-off) rather than skipped: an outage is caught up, not lost. The
  database's ``last_execution`` guard makes every retry and every other
  instance harmless, so each (identifier, minute) is scheduled exactly once.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pykka

from kongtask import events
from kongtask.cron.index import CronIndex
from kongtask.cron.schedule import (
    MINUTE,
    KnownCrontab,
    backfill_plan,
    ceil_minute,
    cron_timestamp,
    floor_minute,
    job_spec,
    to_ms,
)
from kongtask.cron.types import ParsedCronItem
from kongtask.protocols import Clock, TimerHandle

from .cron_writer import Register, Registered, Schedule, Scheduled, WriteFailed

__all__ = ["CronMatcher", "SetItems"]

logger = logging.getLogger("kongtask.cron")

Emit = Callable[..., None]

# Back-off between failed writes: 200 ms growing 1.5x per attempt up to 60 s,
# each multiplied by a jitter in [0.5, 1.5) so a fleet does not retry in step.
_RETRY_MIN_S = 0.2
_RETRY_MAX_S = 60.0
_RETRY_MULTIPLIER = 1.5
# Timers fire this much after the minute boundary so rounding never lands early.
_TIMER_SLACK_S = 0.001
# Backfill sends this many job specs (or a little more) per transaction.
_BACKFILL_BATCH = 5000
# Registrations sent for reloaded crontabs: their answers need no follow-up.
_RELOAD_GENERATION = -1


@dataclass(frozen=True, slots=True)
class SetItems:
    """Replace the crontab (a reload); new identifiers are registered, removed ones stop."""

    items: tuple[ParsedCronItem, ...]


@dataclass(frozen=True, slots=True)
class _Tick:
    generation: int


@dataclass(frozen=True, slots=True)
class _Retry:
    generation: int


class CronMatcher(pykka.ThreadingActor):
    """Decides which cron firings happen, and when; see the module docstring."""

    use_daemon_thread = True

    def __init__(
        self,
        *,
        items: Sequence[ParsedCronItem],
        clock: Clock,
        writer: pykka.ActorRef[Any],
        emit: Emit,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self._items = tuple(items)
        self._index = CronIndex(self._items)
        self._clock = clock
        self._writer = writer
        self._emit = emit
        self._rng = rng or random.Random()
        self._generation = 0
        self._state = "new"  # registering -> backfilling -> running
        self._start: datetime | None = None
        self._next: datetime | None = None
        self._plan: Iterator[tuple[datetime, list[ParsedCronItem]]] | None = None
        self._known: dict[str, KnownCrontab] = {}
        self._in_flight: Register | Schedule | None = None
        self._failures = 0
        self._timer: TimerHandle | None = None

    # --- lifecycle ----------------------------------------------------------

    def on_start(self) -> None:
        self._generation += 1
        self._start = self._clock.now()
        self._emit(events.cron_starting, start=self._start)
        self._state = "registering"
        self._send(
            Register(
                tuple(item.identifier for item in self._items),
                self._start,
                self._generation,
                self.actor_ref,
            )
        )

    def on_stop(self) -> None:
        self._cancel_timer()
        self._generation += 1
        self._emit(events.cron_stopped)

    def on_failure(self, *_: Any) -> None:
        self._cancel_timer()

    # --- messages -----------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        try:
            self._dispatch(message)
        except Exception:
            # A bug here must not leave a zombie: log it and try the same step again.
            logger.exception("Cron matcher failed handling %r; retrying", message)
            self._after_failure("matcher", RuntimeError("internal error"))
        return None

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, _Tick):
            if message.generation == self._generation and self._state == "running":
                self._tick()
        elif isinstance(message, Registered):
            if message.generation == self._generation and self._state == "registering":
                self._in_flight = None
                self._failures = 0
                self._begin_backfill(message.known)
        elif isinstance(message, Scheduled):
            if message.generation == self._generation and self._in_flight is not None:
                self._on_scheduled(message)
        elif isinstance(message, WriteFailed):
            if message.generation == _RELOAD_GENERATION:
                logger.warning("Could not register reloaded cron items: %s", message.error)
            elif message.generation == self._generation:
                self._after_failure(message.stage, message.error)
        elif isinstance(message, _Retry):
            if message.generation != self._generation:
                return
            if self._in_flight is not None:
                self._send(self._in_flight)
            elif self._state == "running":
                self._arm()
        elif isinstance(message, SetItems):
            self._set_items(message.items)

    # --- startup: registration and backfill -----------------------------------

    def _begin_backfill(self, known: dict[str, KnownCrontab]) -> None:
        assert self._start is not None
        self._state = "backfilling"
        self._plan = backfill_plan(self._items, known, self._start)
        self._known = known
        self._backfill_next()

    def _backfill_next(self) -> None:
        """Send the next batch of backfill minutes, or start the minute loop when done."""
        assert self._plan is not None and self._start is not None
        firings: list[tuple[datetime, tuple[dict[str, Any], ...]]] = []
        size = 0
        while size < _BACKFILL_BATCH:
            batch = next(self._plan, None)
            if batch is None:
                break
            ts, due = batch
            specs = tuple(job_spec(item, ts, backfilled=True) for item in due)
            self._emit(
                events.cron_backfill,
                items_to_backfill=[
                    {
                        "identifier": spec["identifier"],
                        "job": spec,
                        "known_since": self._known[spec["identifier"]].known_since,
                        "last_execution": self._known[spec["identifier"]].last_execution,
                    }
                    for spec in specs
                ],
                timestamp=cron_timestamp(ts),
            )
            firings.append((ts, specs))
            size += len(specs)
        if firings:
            self._send(Schedule(tuple(firings), True, self._generation, self.actor_ref))
            return
        self._plan = None
        self._state = "running"
        self._emit(events.cron_started, start=self._start)
        self._next = ceil_minute(self._start)
        self._arm()

    # --- the minute loop ------------------------------------------------------

    def _tick(self) -> None:
        if self._in_flight is not None:
            return
        assert self._next is not None
        now = self._clock.now()
        rounded = floor_minute(now)
        if rounded < self._next:
            self._emit(
                events.cron_premature_timer,
                current_timestamp=to_ms(now),
                expected_timestamp=to_ms(self._next),
            )
            self._arm()
            return
        if rounded > self._next:
            self._emit(
                events.cron_overdue_timer,
                current_timestamp=to_ms(now),
                expected_timestamp=to_ms(self._next),
            )
        due = self._index.due(self._next)
        if not due:
            self._next += MINUTE
            self._arm()
            return
        specs = tuple(job_spec(item, self._next, backfilled=False) for item in due)
        self._emit(
            events.cron_schedule,
            timestamp=to_ms(self._next),
            jobs_and_identifiers=[{"identifier": s["identifier"], "job": s} for s in specs],
        )
        self._send(Schedule(((self._next, specs),), False, self._generation, self.actor_ref))

    def _on_scheduled(self, message: Scheduled) -> None:
        in_flight = self._in_flight
        assert isinstance(in_flight, Schedule)
        self._in_flight = None
        self._failures = 0
        if in_flight.backfilled:
            self._backfill_next()
            return
        ((ts, specs),) = in_flight.firings
        self._emit(
            events.cron_scheduled,
            timestamp=to_ms(ts),
            jobs_and_identifiers=[{"identifier": s["identifier"], "job": s} for s in specs],
            scheduled_identifiers=[identifier for identifier, _ in message.scheduled],
        )
        assert self._next is not None
        self._next += MINUTE
        self._arm()

    def _arm(self) -> None:
        self._cancel_timer()
        assert self._next is not None
        delay = (self._next - self._clock.now()).total_seconds() + _TIMER_SLACK_S
        tick = _Tick(self._generation)
        if delay <= 0:
            self.actor_ref.tell(tick)
        else:
            self._timer = self._clock.call_later(delay, lambda: self._tell_self(tick))

    # --- failures -------------------------------------------------------------

    def _after_failure(self, stage: str, error: BaseException) -> None:
        self._failures += 1
        base = min(_RETRY_MIN_S * _RETRY_MULTIPLIER ** (self._failures - 1), _RETRY_MAX_S)
        delay = base * (0.5 + self._rng.random())
        logger.error(
            "Cron hit an error (%s); retrying in %dms (attempt %d): %s",
            stage,
            delay * 1000,
            self._failures,
            error,
        )
        self._cancel_timer()
        retry = _Retry(self._generation)
        self._timer = self._clock.call_later(delay, lambda: self._tell_self(retry))

    # --- reload ---------------------------------------------------------------

    def _set_items(self, items: tuple[ParsedCronItem, ...]) -> None:
        known = {item.identifier for item in self._items}
        self._items = items
        self._index = CronIndex(items)
        added = tuple(item.identifier for item in items if item.identifier not in known)
        if added:
            self._writer.tell(
                Register(added, self._clock.now(), _RELOAD_GENERATION, self.actor_ref)
            )

    # --- helpers --------------------------------------------------------------

    def _send(self, message: Register | Schedule) -> None:
        self._in_flight = message
        self._writer.tell(message)

    def _tell_self(self, message: Any) -> None:
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
