"""Every statement kongtask runs at run time, named and explained in one place.

Templates name the schema as ``{s}``; :class:`Queries` composes them once per
schema with :class:`psycopg.sql.Identifier`, so the schema name is always
quoted and values only ever travel as parameters. Templates must not contain
literal braces.

The statements follow graphile-worker 0.17.3's effects on the database (see
the module docstrings of their callers), so Python and Node workers can share
one queue.
"""

from __future__ import annotations

from functools import cached_property

from psycopg import sql

__all__ = ["LOCK_EXPIRY", "Queries"]

#: A lock older than this is considered abandoned by a crashed worker.
LOCK_EXPIRY = "4 hours"

# --- enqueueing and admin (WorkerUtils) -------------------------------------

# A job row as kongtask.Job lays it out (same order). The payload comes as
# text so a batch of rows can be decoded by one json.loads call.
JOB_COLUMNS = """
    jobs.id, jobs.job_queue_id, jobs.task_id, tasks.identifier as task_identifier,
    jobs.payload::text as payload, jobs.priority, jobs.run_at, jobs.attempts,
    jobs.max_attempts, jobs.last_error, jobs.created_at, jobs.updated_at, jobs.key,
    jobs.locked_at, jobs.locked_by, jobs.revision, jobs.flags, jobs.is_available
"""

# One job through the schema's own add_job function (job keys, queue and task
# rows, NOTIFY are all handled in the database). The join adds the task
# identifier; a LEFT join keeps the all-NULL row add_job returns when it lost a
# race on a concurrently locked key, so the caller can see and retry it.
ADD_JOB = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.add_job(
    identifier => %(identifier)s::text,
    payload => %(payload)s::json,
    queue_name => %(queue_name)s::text,
    run_at => %(run_at)s::timestamptz,
    max_attempts => %(max_attempts)s::int,
    job_key => %(job_key)s::text,
    priority => %(priority)s::int,
    flags => %(flags)s::text[],
    job_key_mode => coalesce(%(job_key_mode)s::text, 'replace')
) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

# Many jobs in one statement: the specs travel as one JSON array and become
# job_spec values in the database; rows come back in input order.
ADD_JOBS = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.add_jobs(
    array(select json_populate_recordset(null::{s}.job_spec, %(specs)s::json)),
    %(preserve_run_at)s::boolean
) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

REMOVE_JOB = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.remove_job(%(job_key)s::text) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

COMPLETE_JOBS_ADMIN = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.complete_jobs(%(ids)s::bigint[]) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

PERMANENTLY_FAIL_JOBS = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.permanently_fail_jobs(%(ids)s::bigint[], %(reason)s::text) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

RESCHEDULE_JOBS = (
    "select"
    + JOB_COLUMNS
    + """
from {s}.reschedule_jobs(
    %(ids)s::bigint[],
    run_at => %(run_at)s::timestamptz,
    priority => %(priority)s::int,
    attempts => %(attempts)s::int,
    max_attempts => %(max_attempts)s::int
) as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
"""
)

FORCE_UNLOCK_WORKERS = "select {s}.force_unlock_workers(%(worker_ids)s::text[])"

# Task identifiers by id (for rows whose task was created by the same statement).
TASK_IDENTIFIERS = "select id, identifier from {s}._private_tasks where id = any(%(ids)s::int[])"

# Cleanup: permanently failed jobs that nobody holds.
CLEANUP_DELETE_PERMAFAILED_JOBS = """
delete from {s}._private_jobs as jobs
where jobs.attempts >= jobs.max_attempts and jobs.locked_at is null
"""

# Cleanup: task rows no job refers to, except those the caller still uses.
CLEANUP_GC_TASK_IDENTIFIERS = """
delete from {s}._private_tasks as tasks
where tasks.identifier <> all(%(keep)s::text[])
and not exists (select 1 from {s}._private_jobs as jobs where jobs.task_id = tasks.id)
"""

# Cleanup: unlocked queue rows no job refers to.
CLEANUP_GC_JOB_QUEUES = """
delete from {s}._private_job_queues as queues
where queues.locked_at is null
and not exists (select 1 from {s}._private_jobs as jobs where jobs.job_queue_id = queues.id)
"""

# --- the worker --------------------------------------------------------------

# Register the worker's task identifiers and learn their ids. The second
# branch cannot see rows inserted by the first (same snapshot), so together
# they return every identifier exactly once.
UPSERT_TASK_IDS = """
with inserted as (
    insert into {s}._private_tasks (identifier)
    select unnest(%(identifiers)s::text[])
    on conflict (identifier) do nothing
    returning id, identifier
)
select id, identifier from inserted
union all
select id, identifier from {s}._private_tasks where identifier = any(%(identifiers)s::text[])
"""

# The columns a claim returns, in kongtask.Job's order without task_identifier
# (the claimer knows it from task_id). The payload comes as text: the claimer
# decodes a batch in one json.loads call, and a payload Python cannot decode
# fails only its own job instead of the whole fetch.
CLAIM_COLUMNS = """
    jobs.id, jobs.job_queue_id, jobs.task_id, jobs.payload::text, jobs.priority,
    jobs.run_at, jobs.attempts, jobs.max_attempts, jobs.last_error, jobs.created_at,
    jobs.updated_at, jobs.key, jobs.locked_at, jobs.locked_by, jobs.revision,
    jobs.flags, jobs.is_available
"""

# Claim up to `batch` runnable jobs for this pool, in priority then run_at
# order, skipping rows and queues other workers hold. Jobs in a named queue
# may only run when the queue is unlocked, and a batch takes at most one job
# per named queue, so named queues stay strictly serial even with batching.
# Rows locked by `candidates` but not picked stay untouched (and so
# available) once the statement ends. Each row also carries how many
# candidates the claim saw: when that reached `batch`, more may be waiting
# even if the one-per-queue rule kept fewer. Rows come back in run order.
# `now` is the worker's own clock when a test gave it one (ManualClock, as
# graphile-worker's useNodeTime), else null: a job is ready once either the
# database's time or that clock has reached its run_at, so advancing the test
# clock makes retries and delayed jobs due while ordinary jobs still run.
GET_JOBS = (
    """
with candidates as (
    select jobs.id, jobs.job_queue_id, jobs.priority, jobs.run_at
    from {s}._private_jobs as jobs
    where jobs.is_available = true
    and jobs.run_at <= greatest(now(), %(now)s::timestamptz)
    and jobs.task_id = any(%(task_ids)s::int[])
    and (
        jobs.job_queue_id is null
        or jobs.job_queue_id in (
            select queues.id from {s}._private_job_queues as queues
            where queues.is_available = true
            for update skip locked
        )
    )
    and (%(forbidden_flags)s::text[] is null
         or (jobs.flags ?| %(forbidden_flags)s::text[]) is not true)
    order by jobs.priority asc, jobs.run_at asc
    limit %(batch)s
    for update of jobs skip locked
),
picked as (
    select ranked.id, ranked.job_queue_id
    from (
        select candidates.id, candidates.job_queue_id,
               row_number() over (
                   partition by candidates.job_queue_id
                   order by candidates.priority, candidates.run_at, candidates.id
               ) as place
        from candidates
    ) as ranked
    where ranked.job_queue_id is null or ranked.place = 1
),
locked_queues as (
    update {s}._private_job_queues as queues
    set locked_by = %(pool_id)s::text, locked_at = now()
    from picked
    where queues.id = picked.job_queue_id
),
claimed as (
    update {s}._private_jobs as jobs
    set attempts = jobs.attempts + 1, locked_by = %(pool_id)s::text, locked_at = now()
    from picked
    where jobs.id = picked.id
    returning"""
    + CLAIM_COLUMNS
    + """)
select claimed.*, (select count(*) from candidates)::int as seen
from claimed
order by claimed.priority, claimed.run_at, claimed.id
"""
)

# Refresh the planner's statistics of the jobs table. A claim planned with
# statistics taken while the table was (nearly) empty seq-scans and sorts the
# whole backlog (240 ms per claim at 170,000 waiting jobs against 15 ms once
# analyzed); autovacuum repairs that only after its next pass, or never when it
# is off. skip_locked: if another session is analyzing or vacuuming the table,
# do nothing rather than wait.
ANALYZE_JOBS = "analyze (skip_locked) {s}._private_jobs"

# Jobs this pool locked in a claim whose answer never arrived (the statement
# committed, then the connection broke): everything locked by the pool after
# its last answered claim, except what the retried claim just returned. Only
# the claimer locks jobs for a pool, so these can only be those orphans; the
# claimer adopts them instead of leaving them locked until the 4-hour sweep.
ORPHANED_CLAIMS = (
    "select"
    + CLAIM_COLUMNS
    + """
from {s}._private_jobs as jobs
where jobs.locked_by = %(pool_id)s::text
and jobs.locked_at > %(since)s::timestamptz
and jobs.id <> all(%(claimed)s::bigint[])
order by jobs.priority, jobs.run_at, jobs.id
"""
)

# Finish successful jobs: delete them and release their queues (only queues
# this pool holds). A job another pool holds now is left alone: this pool
# was declared dead while the handler ran, and the other pool is running the
# job again; deleting its row would leave that pool's named queue locked
# (its own completion would find no row, so release no queue) and drop its
# outcome. (graphile-worker deletes by id alone.) An unlocked row is deleted:
# the job did succeed, and is not running anywhere.
COMPLETE_JOBS = """
with done as (
    delete from {s}._private_jobs as jobs
    where jobs.id = any(%(ids)s::bigint[])
    and (jobs.locked_by = %(pool_id)s::text or jobs.locked_by is null)
    returning jobs.job_queue_id
)
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
from done
where queues.id = done.job_queue_id and queues.locked_by = %(pool_id)s::text
"""

# Fail jobs this pool holds, each with its own message and optionally a
# replacement payload (batch jobs retry only their failed items). The retry
# waits exp(min(attempts, 10)) seconds; the queue is released.
FAIL_JOBS = """
with specs as (
    select (spec->>'id')::bigint as id, spec->>'message' as message, spec->'payload' as payload
    from json_array_elements(%(specs)s::json) as spec
),
failed as (
    update {s}._private_jobs as jobs
    set last_error = specs.message,
        run_at = greatest(now(), jobs.run_at)
                 + exp(least(jobs.attempts, 10)) * interval '1 second',
        locked_by = null,
        locked_at = null,
        payload = coalesce(specs.payload, jobs.payload),
        updated_at = now()
    from specs
    where jobs.id = specs.id and jobs.locked_by = %(pool_id)s::text
    returning jobs.*
),
released as (
    update {s}._private_job_queues as queues
    set locked_by = null, locked_at = null
    from failed
    where queues.id = failed.job_queue_id and queues.locked_by = %(pool_id)s::text
)
select * from failed
"""

# The completer's last resort for one job whose outcome the database refused
# to record (a constraint, trigger or foreign key of the application's on the
# row): permanently fail it with a plain message, touching neither its payload
# nor its run_at, and release its queue, so it is never left locked and does
# not run again.
PERMANENTLY_FAIL_HELD_JOB = """
with failed as (
    update {s}._private_jobs as jobs
    set last_error = %(message)s::text,
        attempts = greatest(jobs.attempts, jobs.max_attempts),
        locked_by = null,
        locked_at = null,
        updated_at = now()
    where jobs.id = %(id)s::bigint and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
from failed
where queues.id = failed.job_queue_id and queues.locked_by = %(pool_id)s::text
"""

# Which of the buffered jobs this pool still holds, with the locked_at of its
# lock (see kongtask/jobs/ownership.py). The caller compares locked_at with
# the one its claim returned: a job released and claimed again by this pool
# is buffered twice, and only the later copy may run. Looked up by primary
# key (a filter on locked_by alone would scan the whole table).
HELD_JOBS = """
select jobs.id, jobs.locked_at
from {s}._private_jobs as jobs
where jobs.id = any(%(ids)s::bigint[]) and jobs.locked_by = %(pool_id)s::text
"""

# Give back claimed jobs that never started (local buffer on shutdown or TTL):
# the attempt they were charged is refunded.
RETURN_JOBS = """
with returned as (
    update {s}._private_jobs as jobs
    set attempts = greatest(0, jobs.attempts - 1), locked_by = null, locked_at = null
    where jobs.id = any(%(ids)s::bigint[]) and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
from returned
where queues.id = returned.job_queue_id and queues.locked_by = %(pool_id)s::text
"""

# The stale-lock sweep: locks older than the expiry (4 hours in production)
# belong to dead workers; free the jobs (not before their run_at) and queues.
RESET_LOCKED = """
with jobs_reset as (
    update {s}._private_jobs as jobs
    set locked_at = null, locked_by = null, run_at = greatest(jobs.run_at, now())
    where jobs.locked_at < now() - %(expiry)s::interval
)
update {s}._private_job_queues as queues
set locked_at = null, locked_by = null
where queues.locked_at < now() - %(expiry)s::interval
"""

# Release named queues this pool holds for jobs it has just finished. Used
# after a complete/fail statement had to be retried on a new connection: if
# the first try committed before the connection broke, the retry finds no
# rows and so releases no queue. A queue where this pool holds a job again
# (it claimed the next one meanwhile) stays locked, so queues stay serial.
RELEASE_QUEUES = """
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
where queues.id = any(%(queue_ids)s::int[])
and queues.locked_by = %(pool_id)s::text
and not exists (
    select 1 from {s}._private_jobs as jobs
    where jobs.job_queue_id = queues.id and jobs.locked_by = %(pool_id)s::text
)
"""

# --- pool liveness (kongtask's own tables, see migrations/kongtask_0001_pools.sql) --

# A pool announces itself before it claims anything. Timestamps are the
# database's, never the worker's, so a skewed host clock cannot fake a death.
REGISTER_POOL = """
insert into {s}._kongtask_pools (pool_id, hostname, pid, concurrency, version)
values (%(pool_id)s::text, %(hostname)s::text, %(pid)s::int, %(concurrency)s::int,
        %(version)s::text)
on conflict (pool_id) do update set last_seen = now()
"""

# The heartbeat: returns no row when another pool has declared this one dead
# (and released its locks); the caller then registers again.
HEARTBEAT = """
update {s}._kongtask_pools set last_seen = now()
where pool_id = %(pool_id)s::text
returning pool_id
"""

# A clean stop: the pool has given everything back.
DEREGISTER_POOL = """
delete from {s}._kongtask_pools where pool_id = %(pool_id)s::text
"""

# Release every kongtask pool whose heartbeat is older than the bound, in one
# statement: its row goes; a suspect it was running (marked in
# _kongtask_job_crashes) gets one more crash; its locked jobs are unlocked
# and marked as suspects through last_error, except those that have now
# crashed `quarantine_after` times, which are failed for good
# (attempts = max_attempts); its named queues are unlocked. Concurrent
# releasers serialise on the pool rows, so each death is counted once. Node
# pools have no row and are never touched here (the 4-hour sweep frees them).
RELEASE_DEAD_POOLS = """
with dead as (
    delete from {s}._kongtask_pools as pools
    where pools.last_seen < now() - %(dead_after_s)s * interval '1 second'
    returning pools.pool_id, pools.last_seen
),
crashed as (
    update {s}._kongtask_job_crashes as crashes
    set crashes = crashes.crashes + 1, running_pool = null, running_since = null,
        last_crash_at = now()
    from dead
    where crashes.running_pool = dead.pool_id
    returning crashes.job_id, crashes.crashes
),
targets as (
    select jobs.id, dead.pool_id, coalesce(crashed.crashes, 0) as crashes
    from {s}._private_jobs as jobs
    inner join dead on jobs.locked_by = dead.pool_id
    left join crashed on crashed.job_id = jobs.id
),
released as (
    update {s}._private_jobs as jobs
    set locked_by = null,
        locked_at = null,
        attempts = case
            when targets.crashes >= %(quarantine_after)s::int
            then greatest(jobs.attempts, jobs.max_attempts)
            else jobs.attempts
        end,
        last_error = case
            when targets.crashes >= %(quarantine_after)s::int
            then format(%(quarantined_message)s::text, targets.crashes, targets.pool_id)
            else format(%(suspect_message)s::text, targets.pool_id)
        end,
        run_at = greatest(jobs.run_at, now()),
        updated_at = now()
    from targets
    where jobs.id = targets.id
    returning jobs.id, targets.crashes >= %(quarantine_after)s::int as quarantined
),
queues as (
    update {s}._private_job_queues as queues
    set locked_by = null, locked_at = null
    from dead
    where queues.locked_by = dead.pool_id
    returning queues.id
)
select
    coalesce((select array_agg(dead.pool_id order by dead.pool_id) from dead), array[]::text[]),
    (select count(*) from released)::int,
    (select count(*) from queues)::int,
    coalesce((select array_agg(released.id order by released.id)
              from released where released.quarantined), array[]::bigint[])
"""

# Lock holders that look like kongtask pools (pool-/otpool- ids) but have no
# liveness row, holding locks older than the dead-pool bound: a pool declared
# dead whose locks were left (or one that stopped without giving them back).
# A live pool always has a row: it registers before claiming and registers
# again at once if it was declared dead. Run by the (rare) stale-lock sweep.
ORPHANED_POOL_LOCKS = """
with holders as (
    select jobs.locked_by from {s}._private_jobs as jobs
    where jobs.locked_by ~ '^(ot)?pool-[0-9a-f]+$'
    and jobs.locked_at < now() - %(dead_after_s)s * interval '1 second'
    union
    select queues.locked_by from {s}._private_job_queues as queues
    where queues.locked_by ~ '^(ot)?pool-[0-9a-f]+$'
    and queues.locked_at < now() - %(dead_after_s)s * interval '1 second'
)
select holders.locked_by from holders
where not exists (
    select 1 from {s}._kongtask_pools as pools where pools.pool_id = holders.locked_by
)
"""

# Crash counts of jobs that no longer exist (completed, or removed).
GC_JOB_CRASHES = """
delete from {s}._kongtask_job_crashes as crashes
where not exists (select 1 from {s}._private_jobs as jobs where jobs.id = crashes.job_id)
"""

# A suspect is about to run in this pool: name the pool, so that if the
# process dies now the next release counts a crash against this job.
MARK_SUSPECT_RUNNING = """
insert into {s}._kongtask_job_crashes (job_id, running_pool, running_since)
values (%(job_id)s::bigint, %(pool_id)s::text, now())
on conflict (job_id) do update
set running_pool = excluded.running_pool, running_since = excluded.running_since
"""

# A suspect's handler returned: it did not kill the process. Its success is
# recorded at once (the job deleted, its queue released) so a crash of the
# next suspect cannot make it run again; the completer's later delete finds
# nothing. On failure only the mark is cleared.
FINISH_SUSPECT = """
with mark as (
    update {s}._kongtask_job_crashes as crashes
    set running_pool = null, running_since = null
    where crashes.job_id = %(job_id)s::bigint
),
done as (
    delete from {s}._private_jobs as jobs
    where jobs.id = %(job_id)s::bigint and %(succeeded)s::boolean
    and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
from done
where queues.id = done.job_queue_id and queues.locked_by = %(pool_id)s::text
"""

# Lock holders that are not live kongtask pools, for `kongtask admin
# unlock-dead`: kongtask pool ids with no liveness row or a heartbeat older
# than the bound (never pg_stat_activity, which pgbouncer makes lie), and,
# only when asked for, every other holder (Node pools, which keep no row).
DEAD_POOLS = """
with holders as (
    select locked_by, count(*) as jobs, 0 as queues, min(locked_at) as since
    from {s}._private_jobs where locked_by is not null group by locked_by
    union all
    select locked_by, 0, count(*), min(locked_at)
    from {s}._private_job_queues where locked_by is not null group by locked_by
)
select locked_by, sum(jobs)::int, sum(queues)::int, min(since)
from holders
where (%(any_holder)s or locked_by ~ '^(ot)?pool-[0-9a-f]+$')
  and not exists (
    select 1 from {s}._kongtask_pools as pools
    where pools.pool_id = holders.locked_by
    and pools.last_seen >= now() - %(dead_after_s)s * interval '1 second'
  )
group by locked_by
order by min(since)
"""

# The newest migration recorded in this schema, and the newest breaking one.
# A `worker:migrate` notice names no schema (graphile-worker sends the same
# one), so the listener reads its own schema's table before believing it.
MIGRATION_STATE = """
select coalesce(max(id), 0)::int, coalesce(max(id) filter (where breaking), 0)::int
from {s}.migrations
"""

# Names of queues by id, for helpers.get_queue_name().
QUEUE_NAMES = """
select id, queue_name from {s}._private_job_queues where id = any(%(ids)s::int[])
"""

# --- cron --------------------------------------------------------------------

# Register cron identifiers (never overwriting a known one) and return the
# rows of those that were known before: the select sees the table as it was
# before the insert, and only those identifiers may be backfilled.
REGISTER_CRONTABS = """
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
"""

# Scheduling cron firings is one transaction of up to four statements (see
# CronWriter): make sure every identifier has a row, claim the firings, then
# add their jobs. Claiming locks the identifiers' rows, keeps only firings
# newer than each identifier's last_execution and moves last_execution
# forward; another instance (Node or Python) scheduling the same identifier
# waits on the row lock and then finds nothing newer to do, so every
# (identifier, minute) gets exactly one job. This is graphile-worker's
# protocol, extended to many minutes per transaction for fast backfills.

# Rows for identifiers never seen (known_since = the earliest firing).
CRON_ENSURE_KNOWN = """
insert into {s}._private_known_crontabs (identifier, known_since)
select unnest(%(identifiers)s::text[]), %(ts)s::timestamptz
on conflict (identifier) do nothing
"""

# Claim firings: returns the ordinal positions (1-based) of those to run.
CRON_CLAIM_FIRINGS = """
with firings as (
    select firing.identifier, firing.ts, firing.ordinality
    from unnest(%(identifiers)s::text[], %(timestamps)s::timestamptz[])
         with ordinality as firing(identifier, ts, ordinality)
),
locked as (
    select known.identifier, known.last_execution
    from {s}._private_known_crontabs as known
    where known.identifier in (select identifier from firings)
    for update
),
chosen as (
    select firings.identifier, firings.ts, firings.ordinality
    from firings
    inner join locked on locked.identifier = firings.identifier
    where locked.last_execution is null or firings.ts > locked.last_execution
),
advanced as (
    update {s}._private_known_crontabs as known
    set last_execution = latest.ts
    from (select identifier, max(ts) as ts from chosen group by identifier) as latest
    where known.identifier = latest.identifier
)
select ordinality from chosen order by ordinality
"""

# Jobs without a job key, all at once (what add_job does for each of them).
CRON_ADD_JOBS = """
select count(*) from {s}.add_jobs(
    array(select json_populate_recordset(null::{s}.job_spec, %(specs)s::json)),
    false
)
"""

# Jobs with a job key, one add_job call each and in order, so two firings
# sharing a key replace each other exactly as they would minute by minute.
CRON_ADD_KEYED_JOBS = """
select count(
    {s}.add_job(
        spec.task, spec.payload, spec.queue_name, spec.run_at, spec.max_attempts,
        spec.job_key, spec.priority, null, coalesce(spec.job_key_mode, 'replace')
    )
)
from json_to_recordset(%(specs)s::json) as spec(
    task text, payload json, queue_name text, run_at timestamptz, max_attempts int,
    job_key text, priority int, job_key_mode text
)
"""


# --- inspection (kongtask status, kongtask jobs, the dashboard) -------------

# A job's state as operators name it, from its columns alone (so every
# listing and count agrees): running = locked by a pool; failed = attempts
# used up (permanently failed); retrying = failed before and waiting for its
# next attempt; scheduled = never tried and run_at in the future; ready =
# runnable now (perhaps behind a locked named queue).
JOB_STATE = """
case
    when jobs.locked_at is not null then 'running'
    when jobs.attempts >= jobs.max_attempts then 'failed'
    when jobs.attempts > 0 then 'retrying'
    when jobs.run_at > now() then 'scheduled'
    else 'ready'
end
"""

# Job counts by task, named queue (NULL for none), state and locking pool.
STATUS_COUNTS = (
    """
select tasks.identifier as task, queues.queue_name as queue,
       """
    + JOB_STATE
    + """ as state,
       jobs.locked_by as locked_by, count(*)::int as jobs
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
group by 1, 2, 3, 4
order by 1, 2 nulls first, 3, 4 nulls first
"""
)

# Named queues currently locked, and by whom.
LOCKED_QUEUES = """
select queue_name, locked_by, locked_at
from {s}._private_job_queues
where locked_at is not null
order by queue_name
"""

# kongtask pools (from their heartbeat table), newest heartbeat first, with
# whether each counts as live (heartbeat within the bound, in seconds).
POOLS = """
select pool_id, hostname, pid, concurrency, started_at, last_seen, version,
       last_seen > now() - make_interval(secs => %(live_bound_s)s) as live
from {s}._kongtask_pools
order by last_seen desc, pool_id
"""

# Every identifier the cron protocol knows, with its last firing.
KNOWN_CRONTABS = """
select identifier, known_since, last_execution
from {s}._private_known_crontabs
order by identifier
"""

# Jobs filtered by task, named queue and state, oldest run_at first; each row
# is JOB_COLUMNS plus its queue name and state. NULL filters match all.
LIST_JOBS = (
    "select"
    + JOB_COLUMNS
    + """, queues.queue_name, """
    + JOB_STATE
    + """ as state
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
where (%(task)s::text is null or tasks.identifier = %(task)s::text)
  and (%(queue)s::text is null or queues.queue_name = %(queue)s::text)
  and (%(state)s::text is null or """
    + JOB_STATE
    + """ = %(state)s::text)
  and (%(ids)s::bigint[] is null or jobs.id = any(%(ids)s::bigint[]))
order by jobs.run_at, jobs.id
limit %(limit)s
"""
)

# Make jobs run now: run_at = now() and, for a job whose attempts are used
# up, one more attempt (max_attempts = attempts + 1), keeping its history.
# Locked jobs are left alone unless their lock is stale (as the schema's own
# admin functions do). Workers are woken with the notification add_jobs
# sends (same channel and payload shape), so they claim at once.
RETRY_JOBS = (
    """
with retried as (
    update {s}._private_jobs as jobs
    set run_at = now(),
        max_attempts = least(32767, greatest(jobs.max_attempts, jobs.attempts + 1)),
        updated_at = now()
    where jobs.id = any(%(ids)s::bigint[])
      and (jobs.locked_at is null or jobs.locked_at < now() - interval '4 hours')
    returning jobs.*
),
woken as (
    select pg_notify('jobs:insert', format('{{"r":%%s,"count":%%s}}', random(), count(*)))
    from retried having count(*) > 0
)
select"""
    + JOB_COLUMNS
    + """
from retried as jobs
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
cross join (select count(*) from woken) as notified
"""
)

# Per minute of the last hour: how many jobs recorded a failure then (their
# latest failure; a job failing twice in the hour counts in its last minute).
FAILURES_BY_MINUTE = """
select date_trunc('minute', updated_at) as minute, count(*)::int as failures
from {s}._private_jobs
where last_error is not null and locked_at is null
  and updated_at > now() - interval '1 hour'
group by 1
order by 1
"""

# Rows ever deleted from the jobs table (completed, removed or cleaned up),
# from PostgreSQL's statistics: sampled over time it gives the throughput.
JOBS_DELETED_TOTAL = """
select coalesce(n_tup_del, 0)::bigint, now()
from pg_stat_user_tables
where schemaname = %(schema)s::text and relname = '_private_jobs'
"""

# The database answers (the readiness probe), with its clock.
PING = "select now()"
# --- cron: kongtask's own tables (migrations/kongtask_0002_cron.sql) -------------
# The scheduling transaction of kongtask nodes (CronWriter): lock the identifiers'
# rows, decide in Python which firings are new, record them in the history (whose
# unique key settles races over gap minutes), move last_execution forward, add the
# jobs and put their ids in the history. Node workers use the same row lock and
# last_execution rule, so both kinds still schedule each (identifier, minute) once.

# Lock the known_crontabs rows of these identifiers, in a fixed order (no deadlocks).
CRON_LOCK_KNOWN = """
select identifier, known_since, last_execution
from {s}._private_known_crontabs
where identifier = any(%(identifiers)s::text[])
order by identifier
for update
"""

# Recorded gaps of these identifiers (minutes nobody scheduled), for backfill.
CRON_GAPS = """
select identifier, first_missed, ended_by
from {s}._kongtask_cron_gaps
where identifier = any(%(identifiers)s::text[])
  and ended_by > coalesce(%(since)s::timestamptz, '-infinity')
"""

# Record firings; returns the ones this transaction was first to record. A
# skipped firing's error column says why, when a rule could not simply be
# applied (a condition that timed out or raised).
CRON_RECORD_FIRINGS = """
insert into {s}._kongtask_cron_history
    (identifier, task, scheduled_at, backfilled, outcome, rule, error, node)
select f.identifier, f.task, f.ts, f.backfilled, f.outcome, f.rule, f.reason, %(node)s
from unnest(
    %(identifiers)s::text[], %(tasks)s::text[], %(timestamps)s::timestamptz[],
    %(backfilled)s::boolean[], %(outcomes)s::text[], %(rules)s::text[], %(reasons)s::text[]
) as f(identifier, task, ts, backfilled, outcome, rule, reason)
on conflict (identifier, scheduled_at) do nothing
returning identifier, scheduled_at
"""

# Move last_execution forward (never back: a filled gap lies behind it).
CRON_ADVANCE = """
update {s}._private_known_crontabs as known
set last_execution = greatest(known.last_execution, latest.ts)
from (
    select f.identifier, max(f.ts) as ts
    from unnest(%(identifiers)s::text[], %(timestamps)s::timestamptz[]) as f(identifier, ts)
    group by f.identifier
) as latest
where known.identifier = latest.identifier
"""

# Remember due minutes that last_execution is moving past unscheduled.
CRON_RECORD_GAPS = """
insert into {s}._kongtask_cron_gaps (identifier, first_missed, ended_by)
select * from unnest(
    %(identifiers)s::text[], %(first_missed)s::timestamptz[], %(ended_by)s::timestamptz[]
)
on conflict do nothing
"""

# Identifiers whose latest recorded job is still queued or running (noOverlap).
CRON_STILL_RUNNING = """
select latest.identifier
from (
    select distinct on (identifier) identifier, job_id
    from {s}._kongtask_cron_history
    where identifier = any(%(identifiers)s::text[]) and job_id is not null
    order by identifier, scheduled_at desc
) as latest
inner join {s}._private_jobs as job on job.id = latest.job_id
where job.locked_at is not null or job.attempts < job.max_attempts
"""

# Jobs with a job key: one add_job call each, in order, returning their ids in that
# order (so keyed jobs replace each other minute by minute, as they would live).
CRON_ADD_JOBS_IN_ORDER = """
select job.id
from rows from (
    json_to_recordset(%(specs)s::json) as (
        task text, payload json, queue_name text, run_at timestamptz, max_attempts int,
        job_key text, priority int, job_key_mode text
    )
) with ordinality as spec(
    task, payload, queue_name, run_at, max_attempts, job_key, priority, job_key_mode, ord
)
cross join lateral {s}.add_job(
    spec.task, spec.payload, spec.queue_name, spec.run_at, spec.max_attempts,
    spec.job_key, spec.priority, null, coalesce(spec.job_key_mode, 'replace')
) as job
order by spec.ord
"""

# Jobs without a job key, all at once (one NOTIFY, set-based): each row comes back
# with its task id, minute and payload so the writer can tell which firing it is.
# (Task names come from CRON_TASK_NAMES: a task row add_jobs just created is not
# visible to a join in this same statement.)
CRON_ADD_PLAIN_JOBS = """
select job.id, job.task_id, job.run_at, job.payload::text
from {s}.add_jobs(
    array(select json_populate_recordset(null::{s}.job_spec, %(specs)s::json)),
    false
) as job
"""

# Task identifiers by id.
CRON_TASK_NAMES = """
select id, identifier from {s}._private_tasks where id = any(%(ids)s::int[])
"""

# Put the job ids into the history rows just recorded.
CRON_SET_JOB_IDS = """
update {s}._kongtask_cron_history as history
set job_id = f.job_id
from unnest(
    %(identifiers)s::text[], %(timestamps)s::timestamptz[], %(job_ids)s::bigint[]
) as f(identifier, ts, job_id)
where history.identifier = f.identifier and history.scheduled_at = f.ts
"""

# Outcomes of cron jobs run by a kongtask worker (from its job events).
CRON_RECORD_OUTCOMES = """
update {s}._kongtask_cron_history as history
set outcome = f.outcome, finished_at = f.finished_at, duration_s = f.duration_s,
    attempts = f.attempts, error = f.error
from json_to_recordset(%(outcomes)s::json) as f(
    job_id bigint, outcome text, finished_at timestamptz, duration_s double precision,
    attempts int, error text
)
where history.job_id = f.job_id
"""

# The history, newest first, optionally for one identifier and a time window.
CRON_HISTORY = """
select id, identifier, task, scheduled_at, backfilled, outcome, rule, job_id, node,
       written_at, finished_at, duration_s, attempts, error
from {s}._kongtask_cron_history
where (%(identifier)s::text is null or identifier = %(identifier)s::text)
  and scheduled_at >= coalesce(%(since)s::timestamptz, '-infinity')
  and scheduled_at < coalesce(%(until)s::timestamptz, 'infinity')
order by scheduled_at desc, id desc
limit %(limit)s
"""

# Retention: forget history rows and gaps older than the cut-off.
CRON_PRUNE_HISTORY = """
with pruned as (
    delete from {s}._kongtask_cron_history where scheduled_at < %(before)s returning 1
), gaps as (
    delete from {s}._kongtask_cron_gaps where ended_by < %(before)s
)
select count(*) from pruned
"""

# A clean slate for tests (kongtask.testing.reset_cron_state): forget every
# identifier's registration and last run, and kongtask's history and gaps.
# Stored items are configuration, not state, and stay.
CRON_RESET = """
with known as (
    delete from {s}._private_known_crontabs
), history as (
    delete from {s}._kongtask_cron_history
)
delete from {s}._kongtask_cron_gaps
"""

# Stored cron items (kongtask's fleet-wide items); changes notify every node.
CRON_ITEMS = """
select identifier, line, created_at, updated_at
from {s}._kongtask_cron_items
order by identifier
"""

CRON_ITEM_ADD = """
with added as (
    insert into {s}._kongtask_cron_items (identifier, line) values (%(identifier)s, %(line)s)
    on conflict (identifier) do nothing
    returning identifier
)
select identifier, pg_notify('kongtask:cron_items', %(schema)s) from added
"""

CRON_ITEM_UPDATE = """
with updated as (
    update {s}._kongtask_cron_items set line = %(line)s, updated_at = now()
    where identifier = %(identifier)s
    returning identifier
)
select identifier, pg_notify('kongtask:cron_items', %(schema)s) from updated
"""

CRON_ITEM_REMOVE = """
with removed as (
    delete from {s}._kongtask_cron_items where identifier = %(identifier)s
    returning identifier
)
select identifier, pg_notify('kongtask:cron_items', %(schema)s) from removed
"""

#: The channel on which stored cron item changes are announced (payload: schema).
CRON_ITEMS_CHANNEL = "kongtask:cron_items"


class Queries:
    """The statements above, composed for one schema (cheap to keep, one per schema)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self._identifier = sql.Identifier(schema)

    def _compose(self, template: str) -> sql.Composed:
        return sql.SQL(template).format(s=self._identifier)

    @cached_property
    def add_job(self) -> sql.Composed:
        return self._compose(ADD_JOB)

    @cached_property
    def add_jobs(self) -> sql.Composed:
        return self._compose(ADD_JOBS)

    @cached_property
    def remove_job(self) -> sql.Composed:
        return self._compose(REMOVE_JOB)

    @cached_property
    def complete_jobs_admin(self) -> sql.Composed:
        return self._compose(COMPLETE_JOBS_ADMIN)

    @cached_property
    def permanently_fail_jobs(self) -> sql.Composed:
        return self._compose(PERMANENTLY_FAIL_JOBS)

    @cached_property
    def reschedule_jobs(self) -> sql.Composed:
        return self._compose(RESCHEDULE_JOBS)

    @cached_property
    def force_unlock_workers(self) -> sql.Composed:
        return self._compose(FORCE_UNLOCK_WORKERS)

    @cached_property
    def task_identifiers(self) -> sql.Composed:
        return self._compose(TASK_IDENTIFIERS)

    @cached_property
    def cleanup(self) -> dict[str, sql.Composed]:
        """Cleanup statements by task name."""
        return {
            "DELETE_PERMAFAILED_JOBS": self._compose(CLEANUP_DELETE_PERMAFAILED_JOBS),
            "GC_TASK_IDENTIFIERS": self._compose(CLEANUP_GC_TASK_IDENTIFIERS),
            "GC_JOB_QUEUES": self._compose(CLEANUP_GC_JOB_QUEUES),
        }

    @cached_property
    def upsert_task_ids(self) -> sql.Composed:
        return self._compose(UPSERT_TASK_IDS)

    @cached_property
    def get_jobs(self) -> sql.Composed:
        return self._compose(GET_JOBS)

    @cached_property
    def analyze_jobs(self) -> sql.Composed:
        return self._compose(ANALYZE_JOBS)

    @cached_property
    def orphaned_claims(self) -> sql.Composed:
        return self._compose(ORPHANED_CLAIMS)

    @cached_property
    def complete_jobs(self) -> sql.Composed:
        return self._compose(COMPLETE_JOBS)

    @cached_property
    def fail_jobs(self) -> sql.Composed:
        return self._compose(FAIL_JOBS)

    @cached_property
    def permanently_fail_held_job(self) -> sql.Composed:
        return self._compose(PERMANENTLY_FAIL_HELD_JOB)

    @cached_property
    def migration_state(self) -> sql.Composed:
        return self._compose(MIGRATION_STATE)

    @cached_property
    def held_jobs(self) -> sql.Composed:
        return self._compose(HELD_JOBS)

    @cached_property
    def return_jobs(self) -> sql.Composed:
        return self._compose(RETURN_JOBS)

    @cached_property
    def reset_locked(self) -> sql.Composed:
        return self._compose(RESET_LOCKED)

    @cached_property
    def release_queues(self) -> sql.Composed:
        return self._compose(RELEASE_QUEUES)

    @cached_property
    def dead_pools(self) -> sql.Composed:
        return self._compose(DEAD_POOLS)

    @cached_property
    def register_pool(self) -> sql.Composed:
        return self._compose(REGISTER_POOL)

    @cached_property
    def heartbeat(self) -> sql.Composed:
        return self._compose(HEARTBEAT)

    @cached_property
    def deregister_pool(self) -> sql.Composed:
        return self._compose(DEREGISTER_POOL)

    @cached_property
    def release_dead_pools(self) -> sql.Composed:
        return self._compose(RELEASE_DEAD_POOLS)

    @cached_property
    def orphaned_pool_locks(self) -> sql.Composed:
        return self._compose(ORPHANED_POOL_LOCKS)

    @cached_property
    def gc_job_crashes(self) -> sql.Composed:
        return self._compose(GC_JOB_CRASHES)

    @cached_property
    def mark_suspect_running(self) -> sql.Composed:
        return self._compose(MARK_SUSPECT_RUNNING)

    @cached_property
    def finish_suspect(self) -> sql.Composed:
        return self._compose(FINISH_SUSPECT)

    @cached_property
    def queue_names(self) -> sql.Composed:
        return self._compose(QUEUE_NAMES)

    @cached_property
    def register_crontabs(self) -> sql.Composed:
        return self._compose(REGISTER_CRONTABS)

    @cached_property
    def cron_ensure_known(self) -> sql.Composed:
        return self._compose(CRON_ENSURE_KNOWN)

    @cached_property
    def cron_claim_firings(self) -> sql.Composed:
        return self._compose(CRON_CLAIM_FIRINGS)

    @cached_property
    def cron_add_jobs(self) -> sql.Composed:
        return self._compose(CRON_ADD_JOBS)

    @cached_property
    def cron_add_keyed_jobs(self) -> sql.Composed:
        return self._compose(CRON_ADD_KEYED_JOBS)

    @cached_property
    def status_counts(self) -> sql.Composed:
        return self._compose(STATUS_COUNTS)

    @cached_property
    def locked_queues(self) -> sql.Composed:
        return self._compose(LOCKED_QUEUES)

    @cached_property
    def pools(self) -> sql.Composed:
        return self._compose(POOLS)

    @cached_property
    def known_crontabs(self) -> sql.Composed:
        return self._compose(KNOWN_CRONTABS)

    @cached_property
    def list_jobs(self) -> sql.Composed:
        return self._compose(LIST_JOBS)

    @cached_property
    def retry_jobs(self) -> sql.Composed:
        return self._compose(RETRY_JOBS)

    @cached_property
    def failures_by_minute(self) -> sql.Composed:
        return self._compose(FAILURES_BY_MINUTE)

    @cached_property
    def jobs_deleted_total(self) -> sql.Composed:
        return self._compose(JOBS_DELETED_TOTAL)

    @cached_property
    def ping(self) -> sql.Composed:
        return self._compose(PING)

    @cached_property
    def cron(self) -> dict[str, sql.Composed]:
        """kongtask's own cron statements by name (the ``CRON_*`` templates above)."""
        names = (
            "CRON_LOCK_KNOWN",
            "CRON_GAPS",
            "CRON_RECORD_FIRINGS",
            "CRON_ADVANCE",
            "CRON_RECORD_GAPS",
            "CRON_STILL_RUNNING",
            "CRON_ADD_JOBS_IN_ORDER",
            "CRON_ADD_PLAIN_JOBS",
            "CRON_TASK_NAMES",
            "CRON_SET_JOB_IDS",
            "CRON_RECORD_OUTCOMES",
            "CRON_HISTORY",
            "CRON_PRUNE_HISTORY",
            "CRON_RESET",
            "CRON_ITEMS",
            "CRON_ITEM_ADD",
            "CRON_ITEM_UPDATE",
            "CRON_ITEM_REMOVE",
        )
        return {name: self._compose(globals()[name]) for name in names}
