"""The claimer: the one actor that claims batches of runnable jobs into the local queue.

One claim statement (``Queries.get_jobs``) locks up to what the policy asks for
(:meth:`FetchPolicy.ask`: the idle slots and a buffer sized from the handlers'
measured run time, see :mod:`kongtask.jobs.claim_sizing`) for this pool, in
priority then run_at order, at most one job per named queue. *When* to
claim is decided by :class:`FetchPolicy` alone, fed by typed messages: the
claim's own answer, ``BufferLow`` from the executors, ``InsertNotified``
from the listener, ``Finished`` from the completer, the poll timer,
wake-ups and shutdown. Messages that arrive while a claim runs wait in the
mailbox and are folded in right after its answer, so none is lost.

Rows arrive as tuples with the payload as text; the payloads of a batch are
decoded by one ``json.loads`` call, and only if that fails one by one, so a
payload Python cannot decode (a 5,000-digit number, nesting deeper than the
recursion limit) fails that job's attempt with a clear ``last_error`` and
never the batch or the worker. The same holds for a row psycopg cannot load
(``flags`` holding such a number): the claim has locked it, so it is failed
alone instead of failing the fetch and staying locked. Timestamps Python
cannot hold (``-infinity``, year 10000) load as
:class:`~kongtask.db.timestamps.OutOfRangeTimestamp` on the pool's connections,
so a ``-infinity`` job is simply due. Buffered jobs left unstarted for
``local_queue_ttl_s`` are given back, as graphile-worker's local queue does.
An executor about to start a job this pool may no longer hold asks the
claimer to :class:`Confirm` it: one statement re-reads the locks of that job
and of everything buffered, and the jobs another pool has taken over are
dropped unstarted (see :mod:`kongtask.jobs.ownership`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import psycopg

from kongtask import events
from kongtask.db.connecting import cancel_and_wait, without_deadline
from kongtask.db.timestamps import load_rows_tolerating, psycopg_timestamps
from kongtask.job import Job
from kongtask.jobs.claim_sizing import ClaimSizing
from kongtask.jobs.context import WorkerContext
from kongtask.jobs.db_actor import DbActor
from kongtask.jobs.fetch_policy import (
    Action,
    BufferLow,
    ClaimAnswered,
    ClaimFailed,
    FetchEvent,
    FetchPolicy,
    Finished,
    InsertNotified,
    PollDue,
    Recheck,
    Returned,
    Shutdown,
    Wake,
)
from kongtask.jobs.limits import SHARED_CLAIM_MAX, LimitSet, claim_limited
from kongtask.jobs.local_queue import Stamped
from kongtask.jobs.outbox import Outbox
from kongtask.jobs.slow_statement import SLOW_STATEMENT_S, SlowStatement
from kongtask.protocols import TimerHandle
from kongtask.runtime.clock import SystemClock
from kongtask.runtime.retry import is_transient

__all__ = [
    "BufferLow",
    "Claimer",
    "ClaimerMessage",
    "Confirm",
    "Finished",
    "HeldCount",
    "InsertNotified",
    "JoinRequest",
    "LimitsChanged",
    "Shutdown",
    "Wake",
]

logger = logging.getLogger(__name__)


class TtlDue(NamedTuple):
    """The local queue's TTL timer fired: give back jobs left unstarted too long."""


class JoinRequest(NamedTuple):
    """Set ``done`` once a claim finds nothing runnable while this pool holds nothing."""

    done: threading.Event


class LimitsChanged(NamedTuple):
    """Read limits and pauses again: ``notified`` by a ``kongtask:limits`` notice (then
    look for jobs again), or the periodic check is due (look again only if the
    limited or paused keys changed)."""

    notified: bool = True


class HeldCount(NamedTuple):
    """Ask how many jobs this pool holds (claimed, not yet recorded)."""


class Confirm(NamedTuple):
    """Does this pool still hold ``job``? Answers True or False.

    Asked by an executor when :meth:`Ownership.doubt` gave ``reason``; the
    buffered jobs are checked in the same statement.
    """

    job: Job
    reason: str


ClaimerMessage = (
    FetchEvent | TtlDue | JoinRequest | HeldCount | SlowStatement | Confirm | LimitsChanged
)

_EPOCH = datetime.min.replace(tzinfo=UTC)
_JOB_FIELDS = dataclasses.fields(Job)

#: How often a pool reads the limits and pauses again without being told.
LIMITS_CHECK_S = 2.0

#: At most one analyze of our own per this many seconds.
ANALYZE_EVERY_S = 10.0
#: How long the analyzer thread waits for a pool connection.
_ANALYZE_POOL_TIMEOUT_S = 10.0
#: How long a stopping claimer waits for an analyze that runs.
_ANALYZE_STOP_WAIT_S = 5.0


def wants_analyze(claim_s: float, since_last_s: float | None) -> bool:
    """Whether a statement that took ``claim_s`` should make the claimer analyze the jobs table.

    ``since_last_s`` is the time since the claimer's last analyze (None: never).
    A false alarm costs one cheap analyze per ten seconds; a missed one, a claim that
    sorts the whole backlog every time until autovacuum comes by.
    """
    slow = claim_s >= SLOW_STATEMENT_S
    return slow and (since_last_s is None or since_last_s >= ANALYZE_EVERY_S)


class Claimer(DbActor):
    """Owns the claim connection and the fetch policy; see :data:`ClaimerMessage`."""

    action = "getJob"

    def __init__(self, ctx: WorkerContext, outbox: Outbox) -> None:
        super().__init__(ctx)
        self._outbox = outbox
        queue = ctx.queue
        self.policy = FetchPolicy(
            capacity=queue.size,
            low_water=queue.low_water,
            once=ctx.settings.once,
            # The buffer, the running jobs, and three more buffers' worth of
            # outcomes on their way to the database: room for claims, runs and
            # completions to overlap (at twice the buffer they took turns, and
            # a sustained 10,000 jobs/s fell to 1,900), yet a bound on what a
            # shutdown must flush.
            max_held=4 * queue.size + ctx.settings.concurrency,
            # Claims sized from the handlers' measured run time, so that a pool
            # of slow jobs leaves work for pools with idle slots (claim_sizing).
            sizing=(
                ClaimSizing(concurrency=ctx.settings.concurrency, capacity=queue.size)
                if ctx.settings.size_claims
                else None
            ),
        )
        self._joins: list[threading.Event] = []
        self._poll_timer: TimerHandle | None = None
        self._ttl_timer: TimerHandle | None = None
        self._last_fill_at = 0.0
        self._task_id_list: list[int] = []
        # The newest locked_at among the jobs claims have answered with: any
        # job locked by this pool later than that comes from a lost answer.
        self._last_locked_at = _EPOCH
        settings = ctx.settings
        self._flags = (
            list(settings.forbidden_flags) if settings.forbidden_flags is not None else None
        )
        self._analyzed_at: float | None = None
        self._analyzer: threading.Thread | None = None
        #: The analyzer's connection while its statement runs (cancelled by a stop).
        self._analyzing: psycopg.Connection[Any] | None = None
        self._stopped = False
        # The limits and pauses (read before the first claim), and the claim
        # parameters they give (see _apply_limits).
        self._limits_read = False
        self._limits_timer: TimerHandle | None = None
        self._rate_timer: TimerHandle | None = None
        self._rate_due_at: float | None = None
        self._free_task_ids: list[int] = []
        self._excluded_queues: list[str] = []
        self._ordinary_flags = self._flags
        self._limited = False
        # The last limited claim found room for every pool's batch: try a shared one.
        self._limits_roomy = False
        self._may_analyze = True
        # A clock of the caller's (a test's ManualClock) also decides readiness.
        self._clock_now = None if isinstance(ctx.clock, SystemClock) else ctx.clock.now

    def handle(self, message: ClaimerMessage) -> Any:
        match message:
            case TtlDue():
                self._expire()
            case JoinRequest(done):
                self._joins.append(done)
                self.policy.joins = len(self._joins)
                self._step(Wake())
            case HeldCount():
                return self.policy.held
            case SlowStatement(seconds):
                self._maybe_analyze(seconds)
            case Confirm():
                return self._confirm(message)
            case LimitsChanged(notified):
                if self._limits_read and not self.policy.stopping:
                    before = self.ctx.limits
                    self._read_limits(tolerant=True)
                    if notified or self.ctx.limits != before:
                        self._step(Wake())
            case Shutdown():
                return self._shutdown()
            case PollDue():
                self._poll_timer = None
                self._step(message)
            case _:
                self._step(message)
        return None

    # --- the policy loop --------------------------------------------------------

    def _step(self, event: FetchEvent) -> None:
        """Feed ``event`` to the policy and claim if it says so (once per message)."""
        policy = self.policy
        queue = self.ctx.queue
        if self.ctx.stopping and not policy.stopping:
            policy.step(Shutdown(), len(queue))
        if policy.step(event, len(queue)) is Action.CLAIM and self._claim_now() is Action.CLAIM:
            # Claim again only after the messages that came meanwhile (a
            # shutdown above all): looping here would keep claiming a backlog
            # while a Shutdown waits in the mailbox.
            self.actor_ref.tell(Recheck())
            return
        if not policy.stopping:
            if queue.wake_at(policy.wake_level(len(queue))):
                # The buffer already fell to that level before anyone could report it.
                self.actor_ref.tell(BufferLow())
            self._arm_poll()

    def _claim_now(self) -> Action:
        """Run one claim and return what the policy says after its answer."""
        ctx = self.ctx
        queue = ctx.queue
        policy = self.policy
        want = policy.ask(len(queue))
        if not self._task_id_list:
            self._register_tasks()
        if not self._limits_read:
            try:
                self._read_limits()
            except psycopg.Error as exc:
                # No claim before the limits and pauses are known; the poll tries again.
                logger.error("Failed to get jobs: could not read limits and pauses: %s", exc)
                ctx.bus.emit(events.worker_get_job_error, pool_id=ctx.pool_id, error=exc)
                return policy.step(ClaimFailed(), len(queue))
        policy.claim_started()
        ctx.bus.emit(events.worker_get_job_start, pool_id=ctx.pool_id)
        adopted: list[Job] = []
        # The claimed jobs are known to be ours from (no later than) now on.
        known_at = ctx.ownership.now()
        try:
            started = time.perf_counter()
            claim = self.run_noting_retries(lambda conn: self._claim(conn, want), "Claiming jobs")
            claim_s = time.perf_counter() - started
            jobs, seen = claim.value
            if claim.retried:
                adopted = self.run(lambda conn: self._orphans(conn, jobs), "Adopting claimed jobs")
            else:  # (a retried claim's time includes its back-off)
                self._maybe_analyze(claim_s)
        except psycopg.Error as exc:
            logger.error("Failed to get jobs: %s", exc)
            ctx.bus.emit(events.worker_get_job_error, pool_id=ctx.pool_id, error=exc)
            return policy.step(ClaimFailed(), len(queue))
        answer = ClaimAnswered(
            claimed=len(jobs),
            asked=want,
            seen=seen,
            adopted=len(adopted),
            took_s=None if claim.retried else claim_s,
        )
        if adopted:
            jobs += adopted
        self._note_answered(jobs)
        runnable = self._hand_over(jobs, known_at)
        action = policy.step(answer, len(queue))
        if runnable:
            ctx.bus.emit(events.local_queue_get_jobs_complete, pool_id=ctx.pool_id, jobs=runnable)
            self._arm_ttl()
        elif not jobs:
            ctx.bus.emit(events.worker_get_job_empty, pool_id=ctx.pool_id)
            if policy.idle:
                self._idle()
        return action

    def _hand_over(self, jobs: list[Job], known_at: float) -> list[Job]:
        """Buffer the jobs whose payload decoded; fail the others' attempt. Returns the buffered."""
        if not jobs:
            return jobs
        runnable = [job for job in jobs if type(job.payload) is not _Unusable]
        if len(runnable) != len(jobs):
            for job in jobs:
                if type(job.payload) is _Unusable:
                    message = job.payload.message
                    logger.error("Failed task %s (%s): %s", job.id, job.task_identifier, message)
                    self._outbox.failure(dataclasses.replace(job, payload=None), message)
        self.ctx.queue.put_many(runnable, known_at)
        return runnable

    def _idle(self) -> None:
        """Nothing runnable and nothing held: release joins, end a run-once worker."""
        joins, self._joins = self._joins, []
        self.policy.joins = 0
        for done in joins:
            done.set()
        if self.ctx.settings.once:
            self.policy.step(Shutdown(), len(self.ctx.queue))
            self.ctx.request_shutdown(
                "'Run once' mode processed all available jobs and is now exiting"
            )

    # --- the statements -----------------------------------------------------------

    def _register_tasks(self) -> None:
        identifiers = sorted(self.ctx.tasks)

        def upsert(conn: psycopg.Connection[Any]) -> list[tuple[int, str]]:
            return conn.execute(
                self.ctx.queries.upsert_task_ids, {"identifiers": identifiers}
            ).fetchall()

        rows = self.run(upsert, "Registering task identifiers")
        for _ in range(3):
            if {identifier for _, identifier in rows} >= set(identifiers):
                break
            # An identifier inserted by a transaction that committed while this
            # statement waited on it is in neither branch's snapshot: the next
            # statement (a new snapshot) sees it. Without this, jobs of that
            # task were never claimed by this pool.
            rows = self.run(upsert, "Registering task identifiers")
        self.ctx.task_ids.update(dict(rows))
        self._task_id_list = sorted(self.ctx.task_ids)
        self._apply_limits(self.ctx.limits)
        if not self._task_id_list:
            logger.warning("No tasks found; nothing to do!")

    def _claim(self, conn: psycopg.Connection[Any], want: int) -> tuple[list[Job], int]:
        """Claim up to ``want`` jobs; returns them and how many candidates the claim saw."""
        ctx = self.ctx
        now = self._clock_now() if self._clock_now is not None else None
        limited: list[Job] = []
        if self._limited:
            asked = want
            limited, capped = self._claim_limited(conn, want, now)
            if capped:
                # A shared limited claim took all it may: more may be waiting.
                return limited, asked
            want -= len(limited)
            if want <= 0:
                return limited, len(limited)
        params = {
            "task_ids": self._free_task_ids,
            "excluded_queues": self._excluded_queues,
            "forbidden_flags": self._ordinary_flags,
            "batch": want,
            "pool_id": ctx.pool_id,
            "now": now,
        }
        with conn.cursor() as cursor:
            # The hot path: psycopg's own timestamp loader, unless a row needs more (_load).
            psycopg_timestamps(cursor)
            cursor.execute(ctx.queries.get_jobs, params)
            jobs = self._load(cursor)
            result = cursor.pgresult
        assert result is not None
        # From the raw answer: every row carries it, even one that could not be loaded.
        seen = int(bytes(result.get_value(0, result.nfields - 1) or b"0")) if jobs else 0
        return limited + jobs, seen + len(limited)

    # --- limits and pauses (kongtask/jobs/limits.py) --------------------------------

    def _read_limits(self, *, tolerant: bool = False) -> None:
        """Read the limited and paused keys and derive the claims' parameters from them.

        A ``tolerant`` read (any after the first) that fails keeps the keys read
        last, and the periodic check tries again; the first read must succeed,
        as the claim must.
        """
        ctx = self.ctx
        if self._limits_timer is not None:
            self._limits_timer.cancel()
        ref = self.actor_ref
        self._limits_timer = ctx.clock.call_later(
            LIMITS_CHECK_S, lambda: ref.tell(LimitsChanged(notified=False))
        )
        try:
            rows = self.run(
                lambda conn: conn.execute(ctx.queries.limit_snapshot).fetchall(), "Reading limits"
            )
        except psycopg.Error as exc:
            if not tolerant:
                raise
            logger.warning("Could not read the fleet-wide limits and pauses: %s", exc)
            return
        self._limits_read = True
        self._apply_limits(LimitSet.from_rows(rows))

    def _apply_limits(self, limits: LimitSet) -> None:
        """The ordinary claim leaves out limited and paused keys; the limited claim runs
        only while some limit could concern this pool's tasks."""
        ctx = self.ctx
        ctx.limits = limits
        left_out = limits.limited | limits.paused
        self._free_task_ids = [
            task_id
            for task_id in self._task_id_list
            if ("task", ctx.task_ids[task_id]) not in left_out
        ]
        self._excluded_queues = sorted({*limits.keys("queue"), *limits.keys("queue", paused=True)})
        flags = limits.keys("flag")
        if flags:
            self._ordinary_flags = sorted({*(self._flags or ()), *flags})
        else:
            self._ordinary_flags = self._flags
        served = set(ctx.task_ids.values())
        self._limited = any(kind != "task" or key in served for kind, key in limits.limited)

    def _claim_limited(
        self, conn: psycopg.Connection[Any], want: int, now: datetime | None
    ) -> tuple[list[Job], bool]:
        """Claim jobs of limited keys within their headroom, in one transaction that
        holds the limit rows' locks: exclusive (claims of limited jobs take turns
        fleet-wide), or shared while the last one found room for every pool's
        batch (see :func:`plan_limited_claim`). Also says whether a shared claim
        took all it may (:data:`SHARED_CLAIM_MAX`, less than ``want``)."""
        ctx = self.ctx
        jobs, plan = claim_limited(
            conn,
            ctx.queries,
            ctx.limits,
            self._load,
            task_ids=ctx.task_ids,
            want=want,
            now=now,
            forbidden_flags=self._flags,
            pool_id=ctx.pool_id,
            shared=self._limits_roomy,
        )
        self._limits_roomy = plan.shared_ok
        # A claim with ample room (shared, or exclusive and sized as one) takes at most that.
        capped = plan.shared_ok and want > SHARED_CLAIM_MAX and len(jobs) == SHARED_CLAIM_MAX
        if plan.retry_in_s is not None:
            # A rate binds: look again when it lets one more start.
            now_m = ctx.clock.monotonic()
            due_at = now_m + plan.retry_in_s
            pending = self._rate_due_at is not None and now_m <= self._rate_due_at <= due_at
            if not pending:
                if self._rate_timer is not None:
                    self._rate_timer.cancel()
                ref = self.actor_ref
                self._rate_due_at = due_at
                self._rate_timer = ctx.clock.call_later(
                    plan.retry_in_s + 0.005, lambda: ref.tell(Wake())
                )
        return jobs, capped

    def _maybe_analyze(self, claim_s: float) -> None:
        """Refresh the jobs table's statistics after a suspiciously slow claim.

        The analyze runs on a thread and a pool connection of its own: an analyze of a
        large table takes a while (110-160 ms at 100,000 jobs on a 2-core machine), and a
        slow statement may be a false alarm, so the claims go on meanwhile.
        """
        analyzer = self._analyzer
        if not self._may_analyze or (analyzer is not None and analyzer.is_alive()):
            return
        now = time.perf_counter()
        since = None if self._analyzed_at is None else now - self._analyzed_at
        if not wants_analyze(claim_s, since):
            return
        self._analyzed_at = now
        logger.info(
            "A statement on the jobs table took %.0f ms; refreshing its statistics",
            claim_s * 1000,
        )
        self._analyzer = threading.Thread(
            target=self._analyze, name=f"kongtask-analyze-{self.ctx.pool_id}", daemon=True
        )
        self._analyzer.start()

    def _analyze(self) -> None:
        """The analyze itself (on the analyzer thread)."""
        try:
            with self.ctx.pool.connection(timeout=_ANALYZE_POOL_TIMEOUT_S) as conn:
                self._analyzing = conn
                try:
                    # An analyze of a large table may outlast kongtask's statement deadline.
                    with without_deadline(conn):
                        conn.execute(self.ctx.queries.analyze_jobs)
                finally:
                    self._analyzing = None
        except psycopg.Error as exc:
            if self._stopped or self.stopping(exc):
                logger.debug("The jobs table's analyze was cut short by the pool's stop: %s", exc)
            elif is_transient(exc):
                logger.warning("Could not analyze the jobs table (%s); trying again later", exc)
            else:
                # Not the table's owner, say: the claim still works, only slower.
                self._may_analyze = False
                logger.warning(
                    "Could not analyze the jobs table (%s); leaving it to autovacuum", exc
                )

    def on_stop(self) -> None:
        # An analyze that runs is cancelled (the next slow claim asks again).
        self._stopped = True
        cancel_and_wait(
            self._analyzer, self._analyzing, _ANALYZE_STOP_WAIT_S, "the jobs table's analyze"
        )
        super().on_stop()

    def _orphans(self, conn: psycopg.Connection[Any], claimed: list[Job]) -> list[Job]:
        """Jobs locked by a claim whose answer was lost with its connection."""
        params = {
            "pool_id": self.ctx.pool_id,
            "since": self._last_locked_at,
            "claimed": [job.id for job in claimed],
        }
        jobs = self._load(conn.execute(self.ctx.queries.orphaned_claims, params))
        if jobs:
            logger.warning(
                "Adopted %d job(s) locked by a claim whose answer was lost: %s",
                len(jobs),
                ", ".join(str(job.id) for job in jobs),
            )
        return jobs

    def _load(self, cursor: psycopg.Cursor[Any]) -> list[Job]:
        """The jobs of a claim's answer, each row it locked among them.

        When psycopg refuses the answer (a value no loader of the cursor
        reads), the rows are loaded again one by one, tolerating timestamps
        Python cannot hold (a ``-infinity`` job is simply due); a row that
        still cannot be loaded must not fail the others: it becomes a job
        whose payload is an :class:`_Unusable`, which :meth:`_hand_over` fails.
        """
        try:
            loaded = cursor.fetchall()
        except Exception:  # whatever a loader raised about the data
            pass
        else:
            return self._jobs_of(loaded)
        result = cursor.pgresult
        assert result is not None
        rows: list[Sequence[Any]] = []
        unreadable: list[Job] = []
        for index, row in enumerate(load_rows_tolerating(cursor)):
            if isinstance(row, Exception):
                unreadable.append(self._unreadable(result, index, row))
            else:
                rows.append(row)
        return self._jobs_of(rows) + unreadable

    def _unreadable(self, result: Any, index: int, exc: Exception) -> Job:
        """A stand-in for claimed row ``index`` that could not be loaded, for failing it.

        Only its ids are read (as raw text); the completer needs no more to
        fail its attempt and release its queue.
        """

        def raw(column: int) -> int | None:
            value = result.get_value(index, column)
            return None if value is None else int(bytes(value))

        job_id, queue_id, task_id = raw(0), raw(1), raw(2)
        assert job_id is not None and task_id is not None
        first_line = str(exc).strip().split("\n", 1)[0]
        message = f"Row could not be read: {type(exc).__name__}: {first_line}"
        blank = (None,) * (len(_JOB_FIELDS) - 5)
        return Job.from_values(
            (job_id, queue_id, task_id, self.ctx.task_ids[task_id], _Unusable(message), *blank)
        )

    def _jobs_of(self, rows: Sequence[Sequence[Any]]) -> list[Job]:
        """Jobs from claim rows (``claim_columns``: the payload as text at index 3)."""
        if not rows:
            return []
        task_ids = self.ctx.task_ids
        payloads = decode_payloads([row[3] for row in rows])
        make = Job.from_values
        return [
            make((row[0], row[1], row[2], task_ids[row[2]], payload, *row[4:17]))
            for row, payload in zip(rows, payloads, strict=True)
        ]

    def _note_answered(self, jobs: list[Job]) -> None:
        """Remember the newest lock among jobs whose claim answered (see _orphans)."""
        for job in jobs:
            if job.locked_at is not None and job.locked_at > self._last_locked_at:
                self._last_locked_at = job.locked_at

    def _arm_poll(self) -> None:
        if self._poll_timer is None:
            ref = self.actor_ref
            self._poll_timer = self.ctx.clock.call_later(
                self.ctx.settings.poll_interval_s, lambda: ref.tell(PollDue())
            )

    # --- the local queue's TTL ------------------------------------------------------

    def _arm_ttl(self) -> None:
        self._last_fill_at = self.ctx.clock.monotonic()
        if self._ttl_timer is None:
            self._start_ttl_timer(self.ctx.settings.local_queue_ttl_s)

    def _start_ttl_timer(self, delay_s: float) -> None:
        ref = self.actor_ref
        self._ttl_timer = self.ctx.clock.call_later(delay_s, lambda: ref.tell(TtlDue()))

    def _expire(self) -> None:
        self._ttl_timer = None
        if self.policy.stopping:
            return
        ttl = self.ctx.settings.local_queue_ttl_s
        age = self.ctx.clock.monotonic() - self._last_fill_at
        if age < ttl:
            self._start_ttl_timer(ttl - age)
            return
        jobs = self.ctx.queue.drain()
        if jobs:
            logger.debug("Returning %d unstarted jobs after the local queue TTL", len(jobs))
            self._return(jobs)

    # --- jobs this pool may no longer hold --------------------------------------------

    def _confirm(self, message: Confirm) -> bool:
        """Check ``message.job`` and every buffered job; drop those held elsewhere now.

        The buffered ones that are still held go back into the buffer as
        confirmed now. A check that fails (after the usual retries) holds
        nothing back: the job runs, as it did before this check existed.
        """
        ctx = self.ctx
        queue = ctx.queue
        started = time.perf_counter()
        checked_at = ctx.ownership.now()
        buffered = queue.drain_stamped()
        jobs = [message.job, *(job for job, _ in buffered)]
        params = {"ids": [job.id for job in jobs], "pool_id": ctx.pool_id}

        def held_jobs(conn: psycopg.Connection[Any]) -> set[tuple[int, datetime]]:
            rows = conn.execute(ctx.queries.held_jobs, params).fetchall()
            return {(row[0], row[1]) for row in rows}

        try:
            held = self.run(held_jobs, "Checking that buffered jobs are still held")
        except psycopg.Error as exc:
            logger.warning(
                "Could not check whether pool %s still holds job %s (%s: %s); running it",
                ctx.pool_id,
                message.job.id,
                type(exc).__name__,
                str(exc).strip(),
            )
            self._rebuffer(buffered)
            return True
        check_ms = (time.perf_counter() - started) * 1000
        kept = [(job, checked_at) for job, _ in buffered if (job.id, job.locked_at) in held]
        dropped = [job for job in jobs if (job.id, job.locked_at) not in held]
        self._rebuffer(kept)
        if dropped:
            logger.warning(
                "Dropped %d job(s) from the local queue without running them: pool %s no "
                "longer holds them (%s), and another pool may be running them: %s "
                "(checked in %.1f ms)",
                len(dropped),
                ctx.pool_id,
                message.reason,
                ", ".join(str(job.id) for job in dropped),
                check_ms,
            )
            ctx.bus.emit(
                events.local_queue_drop_jobs,
                pool_id=ctx.pool_id,
                jobs=dropped,
                reason=message.reason,
            )
            # They are no longer held; decided after the answer, so the executor waits no claim.
            self.actor_ref.tell(Returned(len(dropped)))
        else:
            logger.debug(
                "Pool %s still holds its %d buffered job(s) (%s; checked in %.1f ms)",
                ctx.pool_id,
                len(jobs),
                message.reason,
                check_ms,
            )
        return (message.job.id, message.job.locked_at) in held

    def _rebuffer(self, items: list[Stamped]) -> None:
        """Put checked jobs back in the buffer, or give them back if the pool is stopping."""
        if not items:
            return
        if self.policy.stopping:
            # The shutdown has drained the buffer already: nobody would take them.
            self._return([job for job, _ in items])
        else:
            self.ctx.queue.put_stamped(items)

    # --- giving jobs back -----------------------------------------------------------

    def _return(self, jobs: list[Job]) -> None:
        ctx = self.ctx
        ids = [job.id for job in jobs]

        def give_back(conn: psycopg.Connection[Any]) -> None:
            conn.execute(ctx.queries.return_jobs, {"ids": ids, "pool_id": ctx.pool_id})

        self.run(give_back, "Returning jobs")
        self._step(Returned(len(jobs)))
        ctx.bus.emit(events.local_queue_return_jobs, pool_id=ctx.pool_id, jobs=jobs)

    def _shutdown(self) -> list[Job]:
        """Stop claiming for good and give back every buffered job; returns them."""
        self.policy.step(Shutdown(), len(self.ctx.queue))
        self.ctx.queue.wake_at(-1)
        for timer in (self._poll_timer, self._ttl_timer, self._limits_timer, self._rate_timer):
            if timer is not None:
                timer.cancel()
        self._poll_timer = self._ttl_timer = self._limits_timer = self._rate_timer = None
        jobs = self.ctx.queue.drain()
        if jobs:
            self._return(jobs)
        return jobs


class _Unusable(NamedTuple):
    """Stands in for a payload ``json.loads`` refused or a row psycopg could not load.

    The claimer fails that job's attempt with ``message`` as its last error.
    """

    message: str


def decode_payloads(texts: list[str]) -> list[Any]:
    """Decode JSON payload texts, in one call when possible.

    A text Python's json refuses (digits beyond the integer limit, nesting
    beyond the recursion limit) becomes an :class:`_Unusable` naming why,
    so that only its own job fails.
    """
    try:
        return list(json.loads("[" + ",".join(texts) + "]"))
    except (ValueError, RecursionError):
        pass
    payloads: list[Any] = []
    for text in texts:
        try:
            payloads.append(json.loads(text))
        except (ValueError, RecursionError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            payloads.append(_Unusable(f"Payload could not be decoded: {reason}"))
    return payloads
