"""Every event kongtask emits, as one blinker signal per graphile-worker event name.

Each event is sent with the emitting :class:`~kongtask.runner.Runner` as the
sender, so a receiver connected with ``sender=runner`` hears one Runner only
and several Runners in one process never cross wires. Payloads are keyword
arguments; their names are graphile-worker's in snake case. Events are
delivered in order by the Runner's event publisher thread, never on the hot
path: a slow receiver delays other receivers, not the work. A receiver that
raises is logged and the others still get the event.

blinker holds receivers weakly by default; connect with ``weak=False`` (or
keep a reference) for receivers defined inline. Example::

    from kongtask import events

    @events.job_failed.connect
    def alert(runner, *, job, error, **_):
        print("gave up on", job.id, error)

The payloads (``pool_id``/``worker_id`` are ``pool-…``/``worker-…`` strings;
``job`` is a :class:`kongtask.Job`; ``error`` an exception or message):
"""

from __future__ import annotations

from blinker import NamedSignal, Namespace

__all__ = ["EVENT_NAMES", "namespace", "signal_for"]

#: The namespace holding every kongtask signal (separate from blinker's default).
namespace = Namespace()


def _signal(name: str, doc: str) -> NamedSignal:
    return namespace.signal(name, doc)


# --- the pool (one per Runner) ----------------------------------------------
pool_create = _signal("pool:create", "The Runner created its pool. Payload: pool_id.")
pool_listen_connecting = _signal(
    "pool:listen:connecting", "Connecting the LISTEN connection. Payload: pool_id, attempts."
)
pool_listen_success = _signal("pool:listen:success", "LISTEN is established. Payload: pool_id.")
pool_listen_error = _signal(
    "pool:listen:error", "The LISTEN connection failed. Payload: pool_id, error."
)
pool_listen_notification = _signal(
    "pool:listen:notification",
    "A notification arrived. Payload: pool_id, channel, payload (the raw text).",
)
pool_listen_release = _signal(
    "pool:listen:release", "The LISTEN connection was closed. Payload: pool_id."
)
pool_fatal_error = _signal(
    "pool:fatalError",
    "A part of the pool failed beyond retrying; the Runner shuts down. "
    "Payload: pool_id, error, action.",
)
pool_release = _signal("pool:release", "The pool is fully released. Payload: pool_id.")
pool_graceful_shutdown = _signal(
    "pool:gracefulShutdown", "A graceful shutdown began. Payload: pool_id, message."
)
pool_graceful_shutdown_error = _signal(
    "pool:gracefulShutdown:error", "A graceful shutdown hit an error. Payload: pool_id, error."
)
pool_graceful_shutdown_complete = _signal(
    "pool:gracefulShutdown:complete", "A graceful shutdown finished. Payload: pool_id."
)
pool_forceful_shutdown = _signal(
    "pool:forcefulShutdown", "A forceful shutdown began. Payload: pool_id, message."
)
pool_forceful_shutdown_error = _signal(
    "pool:forcefulShutdown:error", "A forceful shutdown hit an error. Payload: pool_id, error."
)
pool_forceful_shutdown_complete = _signal(
    "pool:forcefulShutdown:complete",
    "A forceful shutdown finished. Payload: pool_id, force_failed_jobs (list of Job).",
)

# --- the local queue -----------------------------------------------------------
local_queue_get_jobs_complete = _signal(
    "localQueue:getJobs:complete", "A claim returned. Payload: pool_id, jobs (list of Job)."
)
local_queue_return_jobs = _signal(
    "localQueue:returnJobs",
    "Unstarted jobs were given back (shutdown or TTL). Payload: pool_id, jobs.",
)
local_queue_drop_jobs = _signal(
    "localQueue:dropJobs",
    "Buffered jobs were dropped unstarted because this pool no longer holds them "
    "(another pool released them, e.g. after this one was paused past pool_dead_after_s, "
    "and may be running them); kongtask's own. Payload: pool_id, jobs, reason (text).",
)

# --- workers (one per executor thread) ---------------------------------------------
worker_create = _signal(
    "worker:create", "An executor started. Payload: worker_id, tasks (identifiers)."
)
worker_release = _signal("worker:release", "An executor was asked to stop. Payload: worker_id.")
worker_stop = _signal(
    "worker:stop", "An executor stopped. Payload: worker_id, error (None if clean)."
)
worker_get_job_start = _signal(
    "worker:getJob:start", "A claim statement started. Payload: pool_id."
)
worker_get_job_error = _signal(
    "worker:getJob:error", "A claim statement failed. Payload: pool_id, error."
)
worker_get_job_empty = _signal(
    "worker:getJob:empty", "A claim found no runnable job. Payload: pool_id."
)
worker_fatal_error = _signal(
    "worker:fatalError",
    "A worker thread met an error outside any job's handler and stopped (the pool then "
    "shuts down). Payload: worker_id, error.",
)

# --- jobs ----------------------------------------------------------------------------
job_start = _signal("job:start", "A handler is about to run. Payload: worker_id, job.")
job_success = _signal("job:success", "A handler returned. Payload: worker_id, job.")
job_error = _signal(
    "job:error",
    "A handler raised (or a batch item failed). "
    "Payload: worker_id, job, error, batch_job_errors (list or None).",
)
job_failed = _signal(
    "job:failed",
    "A job failed on its last attempt and will not be retried. "
    "Payload: worker_id, job, error, batch_job_errors.",
)
job_complete = _signal(
    "job:complete", "A job finished either way. Payload: worker_id, job, error (None on success)."
)

# --- the stale-lock sweep ------------------------------------------------------------
reset_locked_started = _signal("resetLocked:started", "A stale-lock sweep began. Payload: pool_id.")
reset_locked_success = _signal(
    "resetLocked:success",
    "A stale-lock sweep finished. Payload: pool_id, delay_s (until the next, or None).",
)
reset_locked_failure = _signal(
    "resetLocked:failure", "A stale-lock sweep failed. Payload: pool_id, error, delay_s."
)

# --- cron ------------------------------------------------------------------------------
cron_starting = _signal("cron:starting", "The cron scheduler is starting. Payload: start.")
cron_started = _signal("cron:started", "The cron scheduler started. Payload: start.")
cron_backfill = _signal(
    "cron:backfill",
    "Backfilling missed firings. Payload: items_to_backfill, timestamp (ISO, as "
    "graphile-worker), and kongtask's scheduled_at, digest, firings (see cron:schedule).",
)
cron_premature_timer = _signal(
    "cron:prematureTimer",
    "The minute timer fired early. Payload: current_timestamp, expected_timestamp "
    "(epoch ms), current_at, expected_at (ISO-8601 UTC).",
)
cron_overdue_timer = _signal(
    "cron:overdueTimer",
    "The minute timer fired late. Payload: current_timestamp, expected_timestamp "
    "(epoch ms), current_at, expected_at (ISO-8601 UTC).",
)
cron_schedule = _signal(
    "cron:schedule",
    "Scheduling firings. Payload: timestamp (epoch ms), jobs_and_identifiers, and "
    "kongtask's scheduled_at (ISO-8601 UTC, e.g. '2024-01-01T04:00:00Z'), digest "
    "('00:04:01:01:01': minute, hour, day, month, weekday), task_identifiers, and "
    "firings: one dict per firing with identifier, task_identifier, scheduled_at, "
    "digest, backfilled.",
)
cron_scheduled = _signal(
    "cron:scheduled",
    "Firings were written. Payload: as cron:schedule, plus scheduled_identifiers "
    "(those this instance added jobs for; another instance already scheduled the "
    "rest for that minute), skipped (identifier, rule) pairs and job_ids "
    "(identifier -> job id).",
)
cron_skipped = _signal(
    "cron:skipped",
    "A rule skipped a firing (recorded in the history as skipped). Payload: identifier, "
    "task_identifier, scheduled_at, rule ('condition', 'skipDates' or 'noOverlap'), "
    "reason (None when the rule simply said no; for a condition that did not answer, why: "
    "'timed out after 5 s', 'raised ...', 'its condition is still running ...').",
)
cron_item_failed = _signal(
    "cron:itemFailed",
    "The database refused one item's firing; the other items of the minute were "
    "scheduled. Payload: identifier, task_identifier, scheduled_at, error.",
)
cron_clock_skew = _signal(
    "cron:clockSkew",
    "This node's clock differs from the database's now() by more than "
    "clock_skew_tolerance_s. Payload: skew_s (positive: this clock is ahead), tolerance_s.",
)
cron_stopped = _signal("cron:stopped", "The cron scheduler stopped. No payload.")
cron_reload = _signal(
    "cron:reload",
    "The crontab was reloaded. Payload: items (count), added, removed (identifiers).",
)
cron_reload_failed = _signal(
    "cron:reloadFailed",
    "A crontab reload failed; the previous schedule stays. Payload: error, source.",
)

# --- the Runner -------------------------------------------------------------------------
graceful_shutdown = _signal(
    "gracefulShutdown", "An OS signal asked for a graceful shutdown. Payload: signal (name)."
)
forceful_shutdown = _signal(
    "forcefulShutdown", "An OS signal forced the shutdown. Payload: signal (name)."
)
stop = _signal("stop", "Runner.stop() (or a signal) began stopping the Runner. No payload.")

#: Every event name, in the order above.
EVENT_NAMES: tuple[str, ...] = tuple(namespace)


def signal_for(name: str) -> NamedSignal:
    """The signal for an event name such as ``"job:success"`` (KeyError if unknown)."""
    return namespace[name]
