-- Cron: graphile-worker's known_crontabs protocol and kongtask's own tables
-- (migrations/kongtask_0002_cron.sql): history, gaps, stored items.
-- Format: see jobs.sql.
--
-- The scheduling transaction of kongtask nodes (CronWriter): lock the identifiers'
-- rows, decide in Python which firings are new, record them in the history (whose
-- unique key settles races over gap minutes), move last_execution forward, add the
-- jobs and put their ids in the history. Node workers use the same row lock and
-- last_execution rule, so both kinds still schedule each (identifier, minute) once.

-- name: register_crontabs
-- Register cron identifiers (never overwriting a known one) and return the
-- rows of those that were known before: the select sees the table as it was
-- before the insert, and only those identifiers may be backfilled.
with inserted as (
    insert into {s}._private_known_crontabs (identifier, known_since)
    select unnest(%(identifiers)s::text[]), %(now)s::timestamptz
    on conflict (identifier) do nothing
    returning identifier
)
select known.identifier, known.known_since, known.last_execution
from {s}._private_known_crontabs as known
where known.identifier = any(%(identifiers)s::text[])
and known.identifier not in (select identifier from inserted)

-- name: cron_ensure_known
-- Rows for identifiers never seen (known_since = the earliest firing).
insert into {s}._private_known_crontabs (identifier, known_since)
select unnest(%(identifiers)s::text[]), %(ts)s::timestamptz
on conflict (identifier) do nothing

-- name: cron_lock_known
-- Lock the known_crontabs rows of these identifiers, in a fixed order (no deadlocks).
select identifier, known_since, last_execution
from {s}._private_known_crontabs
where identifier = any(%(identifiers)s::text[])
order by identifier
for update

-- name: cron_gaps
-- Recorded gaps of these identifiers (minutes nobody scheduled), for backfill.
select identifier, first_missed, ended_by
from {s}._kongtask_cron_gaps
where identifier = any(%(identifiers)s::text[])
  and ended_by > coalesce(%(since)s::timestamptz, '-infinity')

-- name: cron_record_firings
-- Record firings; returns the ones this transaction was first to record. A
-- skipped firing's error column says why, when a rule could not simply be
-- applied (a condition that timed out or raised).
insert into {s}._kongtask_cron_history
    (identifier, task, scheduled_at, backfilled, outcome, rule, error, node)
select f.identifier, f.task, f.ts, f.backfilled, f.outcome, f.rule, f.reason, %(node)s
from unnest(
    %(identifiers)s::text[], %(tasks)s::text[], %(timestamps)s::timestamptz[],
    %(backfilled)s::boolean[], %(outcomes)s::text[], %(rules)s::text[], %(reasons)s::text[]
) as f(identifier, task, ts, backfilled, outcome, rule, reason)
on conflict (identifier, scheduled_at) do nothing
returning identifier, scheduled_at

-- name: cron_advance
-- Move last_execution forward (never back: a filled gap lies behind it).
update {s}._private_known_crontabs as known
set last_execution = greatest(known.last_execution, latest.ts)
from (
    select f.identifier, max(f.ts) as ts
    from unnest(%(identifiers)s::text[], %(timestamps)s::timestamptz[]) as f(identifier, ts)
    group by f.identifier
) as latest
where known.identifier = latest.identifier

-- name: cron_record_gaps
-- Remember due minutes that last_execution is moving past unscheduled.
insert into {s}._kongtask_cron_gaps (identifier, first_missed, ended_by)
select * from unnest(
    %(identifiers)s::text[], %(first_missed)s::timestamptz[], %(ended_by)s::timestamptz[]
)
on conflict do nothing

-- name: cron_still_running
-- Identifiers whose latest recorded job is still queued or running (noOverlap).
select latest.identifier
from (
    select distinct on (identifier) identifier, job_id
    from {s}._kongtask_cron_history
    where identifier = any(%(identifiers)s::text[]) and job_id is not null
    order by identifier, scheduled_at desc
) as latest
inner join {s}._private_jobs as job on job.id = latest.job_id
where job.locked_at is not null or job.attempts < job.max_attempts

-- name: cron_set_job_ids
-- Put the job ids into the history rows just recorded.
update {s}._kongtask_cron_history as history
set job_id = f.job_id
from unnest(
    %(identifiers)s::text[], %(timestamps)s::timestamptz[], %(job_ids)s::bigint[]
) as f(identifier, ts, job_id)
where history.identifier = f.identifier and history.scheduled_at = f.ts

-- name: cron_record_outcomes
-- Outcomes of cron jobs run by a kongtask worker (from the batches its completer wrote).
update {s}._kongtask_cron_history as history
set outcome = f.outcome, finished_at = f.finished_at, duration_s = f.duration_s,
    attempts = f.attempts, error = f.error
from json_to_recordset(%(outcomes)s::json) as f(
    job_id bigint, outcome text, finished_at timestamptz, duration_s double precision,
    attempts int, error text
)
where history.job_id = f.job_id

-- name: cron_history
-- The history, newest first, optionally for one identifier and a time window.
select id, identifier, task, scheduled_at, backfilled, outcome, rule, job_id, node,
       written_at, finished_at, duration_s, attempts, error
from {s}._kongtask_cron_history
where (%(identifier)s::text is null or identifier = %(identifier)s::text)
  and scheduled_at >= coalesce(%(since)s::timestamptz, '-infinity')
  and scheduled_at < coalesce(%(until)s::timestamptz, 'infinity')
order by scheduled_at desc, id desc
limit %(limit)s

-- name: cron_prune_history
-- Retention: forget history rows and gaps older than the cut-off.
with pruned as (
    delete from {s}._kongtask_cron_history where scheduled_at < %(before)s returning 1
), gaps as (
    delete from {s}._kongtask_cron_gaps where ended_by < %(before)s
)
select count(*) from pruned

-- name: cron_reset
-- A clean slate for tests (kongtask.testing.reset_cron_state): forget every
-- identifier's registration and last run, and kongtask's history and gaps.
-- Stored items are configuration, not state, and stay.
with known as (
    delete from {s}._private_known_crontabs
), history as (
    delete from {s}._kongtask_cron_history
)
delete from {s}._kongtask_cron_gaps

-- fragment: notify_cron_items
-- Tell every node that the stored cron items of this schema changed (the
-- channel is kongtask.db.statements.CRON_ITEMS_CHANNEL; the payload names the
-- schema, since one database can hold several).
pg_notify('kongtask:cron_items', %(schema)s)

-- name: cron_items
-- Stored cron items (kongtask's fleet-wide items); changes notify every node.
select identifier, line, created_at, updated_at
from {s}._kongtask_cron_items
order by identifier

-- name: cron_item_add
with added as (
    insert into {s}._kongtask_cron_items (identifier, line) values (%(identifier)s, %(line)s)
    on conflict (identifier) do nothing
    returning identifier
)
select identifier, {notify_cron_items} from added

-- name: cron_item_update
with updated as (
    update {s}._kongtask_cron_items set line = %(line)s, updated_at = now()
    where identifier = %(identifier)s
    returning identifier
)
select identifier, {notify_cron_items} from updated

-- name: cron_item_remove
with removed as (
    delete from {s}._kongtask_cron_items where identifier = %(identifier)s
    returning identifier
)
select identifier, {notify_cron_items} from removed

-- name: listen_cron_items
-- A standalone Scheduler's wait for stored cron item changes (the channel of
-- notify_cron_items).
listen "kongtask:cron_items"

-- name: database_clock
-- The database's clock at this instant (not the transaction's start, unlike
-- now()), to measure this node's clock skew against it.
select clock_timestamp()
