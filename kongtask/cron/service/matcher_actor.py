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
  instance harmless, so each (identifier, minute) is scheduled exactly once;
- items with a ``condition`` are decided off this thread, each call with a
  deadline (:mod:`.cron_conditions`): the minute's other items are written at
  once, the conditioned ones when their conditions have answered or timed out,
  and only then does the minute count as done.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pykka

from kongtask import events
from kongtask.cron.index import CronIndex
from kongtask.cron.matcher import digest
from kongtask.cron.schedule import (
    MINUTE,
    KnownCrontab,
    backfill_plan,
    ceil_minute,
    cron_timestamp,
    floor_minute,
    iso_minute,
    job_spec,
    skip_rule,
    to_ms,
)
from kongtask.cron.service.conditions import ConditionCalls, FiringKey, Verdict
from kongtask.cron.service.writer import (
    Planned,
    Register,
    Registered,
    Schedule,
    Scheduled,
    WriteFailed,
)
from kongtask.cron.types import ParsedCronItem
from kongtask.protocols import Clock, TimerHandle
from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.backoff import backoff_s

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
    """The minute timer fired (ignored unless ``generation`` is the current one)."""

    generation: int


@dataclass(frozen=True, slots=True)
class _Retry:
    """The back-off after a failure is over: send the step in flight again."""

    generation: int


@dataclass(frozen=True, slots=True)
class _Decided:
    """One item's conditions have answered, raised or timed out (see ``_decide``)."""

    generation: int
    verdicts: dict[FiringKey, Verdict]


#: What the matcher receives: its own timers, the writer's answers, the loader's items.
MatcherMessage = _Tick | _Retry | _Decided | SetItems | Registered | Scheduled | WriteFailed


@dataclass(slots=True)
class _Minute:
    """The live minute being written: its firings, and what the writes did so far.

    Firings whose conditions are still being called (``deciding``) are written
    after the others, as their verdicts come (``queued`` while a write is in
    flight, then written together).
    """

    ts: datetime
    planned: list[Planned]
    deciding: dict[FiringKey, Planned]
    queued: list[Planned] = field(default_factory=list)
    scheduled: list[tuple[str, datetime]] = field(default_factory=list)
    skipped: list[tuple[str, datetime, str]] = field(default_factory=list)
    job_ids: dict[tuple[str, datetime], int] = field(default_factory=dict)

    def absorb(self, message: Scheduled) -> None:
        self.scheduled.extend(message.scheduled)
        self.skipped.extend(message.skipped)
        self.job_ids.update(message.job_ids)


def _key(planned: Planned) -> FiringKey:
    return (planned.item.identifier, planned.ts)


def _gated(planned: Sequence[Planned]) -> list[Planned]:
    """The firings whose condition must still be called (no other rule skips them)."""
    return [p for p in planned if p.skip_rule is None and p.item.condition is not None]


def _apply(planned: Planned, verdicts: dict[FiringKey, Verdict]) -> Planned:
    verdict = verdicts.get(_key(planned))
    if verdict is None or verdict.run:
        return planned
    return replace(planned, skip_rule="condition", skip_reason=verdict.reason)


def _seed_fields(ts: datetime, planned: Sequence[Planned]) -> dict[str, Any]:
    """kongtask's additions to the schedule events: one time form, the seed's digest."""
    minute_digest = str(digest(ts))
    return {
        "scheduled_at": iso_minute(ts),
        "digest": minute_digest,
        "task_identifiers": sorted({p.item.task for p in planned}),
        "firings": [
            {
                "identifier": p.item.identifier,
                "task_identifier": p.item.task,
                "scheduled_at": iso_minute(p.ts),
                "digest": str(digest(p.ts)),
                "backfilled": p.backfilled,
            }
            for p in planned
        ],
    }


def _timer_fields(now: datetime, expected: datetime) -> dict[str, Any]:
    return {
        "current_timestamp": to_ms(now),
        "expected_timestamp": to_ms(expected),
        "current_at": now.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "expected_at": iso_minute(expected),
    }


class CronProgress:
    """The minute the matcher handles next, shared with the readiness probe and ``join()``.

    Only the matcher writes it (:meth:`advance`); anyone may read it or wait
    for it to pass a time. ``None`` until the live minute loop runs
    (registering and backfilling come first).
    """

    def __init__(self) -> None:
        self.next_minute: datetime | None = None
        self._changed = threading.Condition()

    def advance(self, minute: datetime) -> None:
        """The matcher is done with every minute before ``minute``."""
        with self._changed:
            self.next_minute = minute
            self._changed.notify_all()

    def lag_s(self, now: datetime) -> float | None:
        """How far ``now`` is past the minute still to be handled (0 when caught up)."""
        minute = self.next_minute
        if minute is None:
            return None
        return max(0.0, (now - minute).total_seconds())

    def wait_caught_up(self, now: Callable[[], datetime], timeout_s: float) -> bool:
        """Wait until every minute up to ``now()`` has been handled; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self.next_minute is None or self.next_minute <= now():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # advance() wakes us; a real clock passing the next minute
                # meanwhile makes the matcher handle it, and advance again.
                self._changed.wait(left)
        return True


class CronMatcher(Actor):
    """Decides which cron firings happen, and when; see the module docstring."""

    # A bug must not leave a zombie timeline: the failed step is retried (see recover).
    error_policy = ErrorPolicy.RECOVER

    def __init__(
        self,
        *,
        items: Sequence[ParsedCronItem],
        clock: Clock,
        writer: pykka.ActorRef[Any],
        emit: Emit,
        rng: random.Random | None = None,
        backfill_on_start: bool = True,
        overdue_tolerance_s: float = 0.0,
        progress: CronProgress | None = None,
    ) -> None:
        super().__init__()
        self._progress = progress if progress is not None else CronProgress()
        self._backfill_on_start = backfill_on_start
        self._tolerance = timedelta(seconds=overdue_tolerance_s)
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
        self._conditions = ConditionCalls(clock)
        self._minute: _Minute | None = None
        # A backfill batch waiting for its conditions' verdicts, and those come so far.
        self._batch: list[Planned] | None = None
        self._batch_waiting: set[FiringKey] = set()
        self._batch_verdicts: dict[FiringKey, Verdict] = {}

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

    def handle(self, message: MatcherMessage) -> None:
        match message:
            case _Tick(generation):
                if generation == self._generation and self._state == "running":
                    self._tick()
            case Registered(known, generation):
                if generation == self._generation and self._state == "registering":
                    self._in_flight = None
                    self._failures = 0
                    self._begin_backfill(known)
            case Scheduled():
                if message.generation == self._generation and self._in_flight is not None:
                    self._on_scheduled(message)
            case _Decided(generation, verdicts):
                if generation == self._generation:
                    self._on_decided(verdicts)
            case WriteFailed(stage, error, generation):
                if generation == _RELOAD_GENERATION:
                    logger.warning("Could not register reloaded cron items: %s", error)
                elif generation == self._generation:
                    self._after_failure(stage, error)
            case _Retry(generation):
                if generation != self._generation:
                    return
                if self._in_flight is not None:
                    self._send(self._in_flight)
                elif self._state == "running":
                    self._arm()
            case SetItems(items):
                self._set_items(items)

    def recover(self, message: Any, error: Exception) -> None:
        # A bug here must not leave a zombie: log it and try the same step again.
        logger.exception("Cron matcher failed handling %r; retrying", message)
        self._after_failure("matcher", RuntimeError("internal error"))

    # --- startup: registration and backfill -----------------------------------

    def _begin_backfill(self, known: dict[str, KnownCrontab]) -> None:
        assert self._start is not None
        self._state = "backfilling"
        # A node that does not backfill plans nothing; the minutes it moves
        # last_execution past are recorded as gaps, which backfilling nodes fill.
        plan_items = self._items if self._backfill_on_start else ()
        self._plan = backfill_plan(plan_items, known, self._start)
        self._known = known
        self._backfill_next()

    def _backfill_next(self) -> None:
        """Send the next batch of backfill minutes, or start the minute loop when done."""
        assert self._plan is not None and self._start is not None
        firings: list[Planned] = []
        size = 0
        while size < _BACKFILL_BATCH:
            batch = next(self._plan, None)
            if batch is None:
                break
            ts, due = batch
            planned = self._plan_firings(due, ts, backfilled=True)
            self._emit(
                events.cron_backfill,
                items_to_backfill=[
                    {
                        "identifier": p.item.identifier,
                        "job": p.spec,
                        "known_since": self._known[p.item.identifier].known_since,
                        "last_execution": self._known[p.item.identifier].last_execution,
                    }
                    for p in planned
                ],
                timestamp=cron_timestamp(ts),
                **_seed_fields(ts, planned),
            )
            firings.extend(planned)
            size += len(planned)
        if firings:
            gated = _gated(firings)
            if gated:
                self._batch = firings
                self._batch_waiting = {_key(p) for p in gated}
                self._batch_verdicts = {}
                self._decide(gated)
            else:
                self._send(Schedule(tuple(firings), True, self._generation, self.actor_ref))
            return
        self._plan = None
        self._state = "running"
        self._emit(events.cron_started, start=self._start)
        self._next = ceil_minute(self._start)
        self._progress.advance(self._next)
        self._arm()

    # --- the minute loop ------------------------------------------------------

    def _tick(self) -> None:
        if self._in_flight is not None or self._minute is not None:
            return
        assert self._next is not None
        now = self._clock.now()
        rounded = floor_minute(now)
        if rounded < self._next:
            # The clock went back (or the timer fired early): wait for the same minute.
            if self._next - now > self._tolerance:
                self._emit(events.cron_premature_timer, **_timer_fields(now, self._next))
            self._arm()
            return
        if rounded > self._next and now - self._next - MINUTE >= self._tolerance:
            self._emit(events.cron_overdue_timer, **_timer_fields(now, self._next))
        due = self._index.due(self._next)
        if not due:
            self._next += MINUTE
            self._progress.advance(self._next)
            self._arm()
            return
        planned = self._plan_firings(due, self._next, backfilled=False)
        self._emit(
            events.cron_schedule,
            timestamp=to_ms(self._next),
            jobs_and_identifiers=[
                {"identifier": p.item.identifier, "job": p.spec} for p in planned
            ],
            **_seed_fields(self._next, planned),
        )
        gated = _gated(planned)
        minute = _Minute(self._next, planned, {_key(p): p for p in gated})
        self._minute = minute
        minute.queued = [p for p in planned if _key(p) not in minute.deciding]
        if gated:
            self._decide(gated)
        self._flush(minute)

    def _decide(self, gated: Sequence[Planned]) -> None:
        """Have the conditions of ``gated`` called; their verdicts come as ``_Decided``."""
        generation = self._generation
        self._conditions.decide(
            [(p.item, p.ts, p.backfilled) for p in gated],
            lambda verdicts: self._tell_self(_Decided(generation, verdicts)),
        )

    def _on_decided(self, verdicts: dict[FiringKey, Verdict]) -> None:
        """One item's verdicts: a live minute writes them as soon as it can; a backfill
        batch is written whole once every verdict is in."""
        if self._batch is not None:
            self._batch_verdicts.update(verdicts)
            self._batch_waiting.difference_update(verdicts)
            if not self._batch_waiting:
                batch, self._batch = self._batch, None
                decided = tuple(_apply(p, self._batch_verdicts) for p in batch)
                self._send(Schedule(decided, True, self._generation, self.actor_ref))
            return
        minute = self._minute
        if minute is None:
            return
        for key in verdicts:
            planned = minute.deciding.pop(key, None)
            if planned is not None:
                minute.queued.append(_apply(planned, verdicts))
        if self._in_flight is None:
            self._flush(minute)

    def _flush(self, minute: _Minute) -> None:
        """Write the minute's firings that are ready (no write is in flight)."""
        if minute.queued:
            queued, minute.queued = minute.queued, []
            self._send(Schedule(tuple(queued), False, self._generation, self.actor_ref))

    def _on_scheduled(self, message: Scheduled) -> None:
        in_flight = self._in_flight
        assert isinstance(in_flight, Schedule)
        self._in_flight = None
        self._failures = 0
        self._report(in_flight, message)
        if in_flight.backfilled:
            self._backfill_next()
            return
        minute = self._minute
        assert minute is not None
        minute.absorb(message)
        if minute.queued:
            self._flush(minute)
        elif not minute.deciding:
            self._finish_minute(minute)

    def _finish_minute(self, minute: _Minute) -> None:
        """Every firing of the live minute is written: report it and move on."""
        self._minute = None
        self._emit(
            events.cron_scheduled,
            timestamp=to_ms(minute.ts),
            jobs_and_identifiers=[
                {"identifier": p.item.identifier, "job": p.spec} for p in minute.planned
            ],
            scheduled_identifiers=[identifier for identifier, _ in minute.scheduled],
            skipped=[(identifier, rule) for identifier, _, rule in minute.skipped],
            job_ids={identifier: job_id for (identifier, _), job_id in minute.job_ids.items()},
            **_seed_fields(minute.ts, minute.planned),
        )
        assert self._next is not None
        self._next += MINUTE
        self._progress.advance(self._next)
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
        delay = backoff_s(
            self._failures - 1,
            base_s=_RETRY_MIN_S,
            factor=_RETRY_MULTIPLIER,
            cap_s=_RETRY_MAX_S,
            rng=self._rng,
        )
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

    def _plan_firings(
        self, due: Sequence[ParsedCronItem], ts: datetime, *, backfilled: bool
    ) -> list[Planned]:
        return [
            Planned(
                item,
                ts,
                job_spec(item, ts, backfilled=backfilled),
                backfilled,
                skip_rule(item, ts),
            )
            for item in due
        ]

    def _report(self, sent: Schedule, message: Scheduled) -> None:
        """Events and log lines for skipped firings and items the database refused."""
        tasks = {p.item.identifier: p.item.task for p in sent.planned}
        reasons = {_key(p): p.skip_reason for p in sent.planned}
        for identifier, ts, rule in message.skipped:
            reason = reasons.get((identifier, ts)) if rule == "condition" else None
            logger.info(
                "Cron item %r at %s skipped by rule %s%s",
                identifier,
                iso_minute(ts),
                rule,
                f" ({reason})" if reason else "",
            )
            self._emit(
                events.cron_skipped,
                identifier=identifier,
                task_identifier=tasks.get(identifier),
                scheduled_at=iso_minute(ts),
                rule=rule,
                reason=reason,
            )
        for identifier, ts, error in message.failed:
            logger.error(
                "Cron item %r could not be scheduled at %s (the other items were): %s",
                identifier,
                iso_minute(ts),
                error,
            )
            self._emit(
                events.cron_item_failed,
                identifier=identifier,
                task_identifier=tasks.get(identifier),
                scheduled_at=iso_minute(ts),
                error=error,
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
