-- The job path: enqueueing and admin (WorkerUtils), task ids, claiming,
-- completing and failing, the stale-lock sweep and the worker's LISTEN.
-- Each statement is headed `-- name: <name>` (a fragment `-- fragment: <name>`,
-- included in statements as {<name>}), then comment lines explaining it, then
-- its body; `{s}` is the schema. See kongtask/db/statements.py.

-- fragment: job_columns
-- A job row as kongtask.Job lays it out (same order). The payload comes as
-- text so a batch of rows can be decoded by one json.loads call.
jobs.id, jobs.job_queue_id, jobs.task_id, tasks.identifier as task_identifier,
jobs.payload::text as payload, jobs.priority, jobs.run_at, jobs.attempts,
jobs.max_attempts, jobs.last_error, jobs.created_at, jobs.updated_at, jobs.key,
jobs.locked_at, jobs.locked_by, jobs.revision, jobs.flags, jobs.is_available

-- fragment: task_of_job
-- Each row of `jobs` with its task row, for the task identifier that
-- job_columns names. A LEFT join keeps a row without a task (the all-NULL
-- row add_job returns when it lost a race on a key, see add_job).
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id

-- fragment: release_pool_queues
-- Release the named queues of the jobs in `finished` (a CTE returning their
-- job_queue_id), only those this pool holds: a queue another pool holds now
-- is that pool's to release.
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
from finished
where queues.id = finished.job_queue_id and queues.locked_by = %(pool_id)s::text

-- fragment: job_specs
-- The jobs to add, sent as one JSON array (the `specs` parameter), as the
-- job_spec[] the schema's add_jobs function takes.
array(select json_populate_recordset(null::{s}.job_spec, %(specs)s::json))

-- name: add_job
-- One job through the schema's own add_job function (job keys, queue and task
-- rows, NOTIFY are all handled in the database). The join adds the task
-- identifier; a LEFT join keeps the all-NULL row add_job returns when it lost a
-- race on a concurrently locked key, so the caller can see and retry it.
select {job_columns}
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
{task_of_job}

-- name: add_jobs
-- Many jobs in one statement: the specs travel as one JSON array and become
-- job_spec values in the database; rows come back in input order.
select {job_columns}
from {s}.add_jobs(
    {job_specs},
    %(preserve_run_at)s::boolean
) as jobs
{task_of_job}

-- name: add_jobs_each
-- Many jobs, each through the schema's own add_job in input order, each with
-- its own job_key_mode: a spec sharing a key with an earlier one replaces the
-- job that one just added, as separate add_job calls would. Rows come back in
-- input order; a lost race on a locked key gives an all-NULL row (see add_job).
select {job_columns}
from rows from (
    json_to_recordset(%(specs)s::json) as (
        identifier text, payload json, queue_name text, run_at timestamptz,
        max_attempts int, job_key text, priority int, flags text[], job_key_mode text
    )
) with ordinality as spec(
    identifier, payload, queue_name, run_at, max_attempts, job_key, priority, flags,
    job_key_mode, ord
)
cross join lateral {s}.add_job(
    identifier => spec.identifier,
    payload => spec.payload,
    queue_name => spec.queue_name,
    run_at => spec.run_at,
    max_attempts => spec.max_attempts,
    job_key => spec.job_key,
    priority => spec.priority,
    flags => spec.flags,
    job_key_mode => coalesce(spec.job_key_mode, 'replace')
) as jobs
{task_of_job}
order by spec.ord

-- fragment: bulk_targets
-- The bulk path's lookups (kongtask/jobs/bulk.py): the transaction's now(),
-- which the job rows' defaults will use, then the task ids of the batch's
-- distinct identifiers and the queue ids of its distinct queue names, each in
-- the order given (NULL where no row exists yet).
now(),
array(
    select tasks.id
    from unnest(%(identifiers)s::text[]) with ordinality as wanted(identifier, ord)
    left join {s}._private_tasks as tasks on tasks.identifier = wanted.identifier
    order by wanted.ord
),
array(
    select queues.id
    from unnest(%(queue_names)s::text[]) with ordinality as wanted(queue_name, ord)
    left join {s}._private_job_queues as queues on queues.queue_name = wanted.queue_name
    order by wanted.ord
)

-- name: bulk_add_targets
-- The bulk path's lookups alone, after bulk_add_missing created rows
-- (bulk_add_prepare starts with the same columns). Reads only.
select {bulk_targets}

-- name: bulk_add_missing
-- The bulk path, only when bulk_add_targets found a task or queue missing: create
-- the rows, as the schema's add_jobs does (a row a concurrent transaction just
-- created is left alone). A separate statement, so the next bulk_add_targets (a
-- new snapshot) sees rows that such a transaction committed meanwhile.
with new_tasks as (
    insert into {s}._private_tasks (identifier)
    select unnest(%(identifiers)s::text[])
    on conflict do nothing
)
insert into {s}._private_job_queues (queue_name)
select unnest(%(queue_names)s::text[])
on conflict do nothing

-- name: bulk_add_prepare
-- The bulk path, step 1: the bulk_targets lookups, and in the same statement (so
-- a batch whose tasks and queues exist needs one round trip before the COPY)
-- take `count` ids from the jobs' own identity sequence (the rows
-- are then copied in with these ids; COPY writes identity columns as given)
-- and send the one `jobs:insert` notification of the batch, with the payload
-- the schema's add_jobs sends, so Node and kongtask workers wake.
select {bulk_targets},
       array(
           select nextval(sequence.id)
           from (
               select pg_get_serial_sequence(
                   format('%%I._private_jobs', %(schema)s::text), 'id'
               )::regclass as id
               offset 0 -- evaluated once, not for every id
           ) as sequence
           cross join generate_series(1, %(count)s::int)
       ),
       pg_notify('jobs:insert', format('{{"r":%%s,"count":%%s}}', random(), %(count)s::int))

-- name: bulk_add_copy
-- The bulk path, last step: the rows, in binary COPY format. Columns left out
-- (attempts, created_at, updated_at, revision, key, locks) take the table's
-- defaults, exactly as the schema's add_jobs leaves them.
copy {s}._private_jobs (id, job_queue_id, task_id, payload, run_at, max_attempts, priority, flags)
from stdin (format binary)

-- name: bulk_add_copy_plain
-- bulk_add_copy for a batch that sets no queue, run_at, max_attempts, priority
-- or flags: the table's defaults (now(), 25, 0, NULL) are the values
-- add_jobs would write, so only three columns travel.
copy {s}._private_jobs (id, task_id, payload)
from stdin (format binary)

-- name: remove_job
select {job_columns}
from {s}.remove_job(%(job_key)s::text) as jobs
{task_of_job}

-- name: complete_jobs_admin
select {job_columns}
from {s}.complete_jobs(%(ids)s::bigint[]) as jobs
{task_of_job}

-- name: permanently_fail_jobs
select {job_columns}
from {s}.permanently_fail_jobs(%(ids)s::bigint[], %(reason)s::text) as jobs
{task_of_job}

-- name: cancel_job
-- Cancel one job (WorkerUtils.cancel_job), in one statement. A job nobody
-- holds (or whose lock is stale, as the schema's admin functions treat it) is
-- failed for good as permanently_fail_jobs does (attempts = max_attempts)
-- and unlocked; a job a pool holds is left to that pool, which is told on
-- the `kongtask:cancel` channel (schema, job id, holding pool, message) and
-- fails it for good when its handler ends. A job already failed for good is
-- left as it is. One row: the outcome and the holding pool.
with target as (
    select jobs.id, jobs.locked_by,
           jobs.locked_at is not null
               and jobs.locked_at >= now() - interval '4 hours' as held,
           jobs.attempts >= jobs.max_attempts and jobs.locked_at is null as finished
    from {s}._private_jobs as jobs
    where jobs.id = %(id)s::bigint
    for update
),
cancelled as (
    update {s}._private_jobs as jobs
    set last_error = %(message)s::text,
        attempts = jobs.max_attempts,
        locked_by = null,
        locked_at = null,
        updated_at = now()
    from target
    where jobs.id = target.id and not target.held and not target.finished
    returning jobs.id
),
signalled as (
    select pg_notify('kongtask:cancel', json_build_object(
        'schema', %(schema)s::text, 'id', target.id, 'pool', target.locked_by,
        'message', %(message)s::text
    )::text)
    from target
    where target.held
)
select case
           when target.id is null then 'missing'
           when target.finished then 'finished'
           when target.held then 'signalled'
           else 'cancelled'
       end as outcome,
       target.locked_by
from (select 1) as one
left join target on true
cross join (select count(*) from cancelled) as changed
cross join (select count(*) from signalled) as notified

-- name: reschedule_jobs
select {job_columns}
from {s}.reschedule_jobs(
    %(ids)s::bigint[],
    run_at => %(run_at)s::timestamptz,
    priority => %(priority)s::int,
    attempts => %(attempts)s::int,
    max_attempts => %(max_attempts)s::int
) as jobs
{task_of_job}

-- name: force_unlock_workers
select {s}.force_unlock_workers(%(worker_ids)s::text[])

-- name: task_identifiers
-- Task identifiers by id (for rows whose task was created by the same statement).
select id, identifier from {s}._private_tasks where id = any(%(ids)s::int[])

-- name: cleanup_delete_permafailed_jobs
-- Cleanup: permanently failed jobs that nobody holds.
delete from {s}._private_jobs as jobs
where jobs.attempts >= jobs.max_attempts and jobs.locked_at is null

-- name: cleanup_gc_task_identifiers
-- Cleanup: task rows no job refers to, except those the caller still uses.
delete from {s}._private_tasks as tasks
where tasks.identifier <> all(%(keep)s::text[])
and not exists (select 1 from {s}._private_jobs as jobs where jobs.task_id = tasks.id)

-- name: cleanup_gc_job_queues
-- Cleanup: unlocked queue rows no job refers to.
delete from {s}._private_job_queues as queues
where queues.locked_at is null
and not exists (select 1 from {s}._private_jobs as jobs where jobs.job_queue_id = queues.id)

-- name: upsert_task_ids
-- Register the worker's task identifiers and learn their ids. The second
-- branch cannot see rows inserted by the first (same snapshot), so together
-- they return every identifier exactly once.
with inserted as (
    insert into {s}._private_tasks (identifier)
    select unnest(%(identifiers)s::text[])
    on conflict (identifier) do nothing
    returning id, identifier
)
select id, identifier from inserted
union all
select id, identifier from {s}._private_tasks where identifier = any(%(identifiers)s::text[])

-- fragment: claim_columns
-- The columns a claim returns, in kongtask.Job's order without task_identifier
-- (the claimer knows it from task_id). The payload comes as text: the claimer
-- decodes a batch in one json.loads call, and a payload Python cannot decode
-- fails only its own job instead of the whole fetch.
jobs.id, jobs.job_queue_id, jobs.task_id, jobs.payload::text, jobs.priority,
jobs.run_at, jobs.attempts, jobs.max_attempts, jobs.last_error, jobs.created_at,
jobs.updated_at, jobs.key, jobs.locked_at, jobs.locked_by, jobs.revision,
jobs.flags, jobs.is_available

-- fragment: runnable_for_pool
-- A job (`jobs`) this pool may run now: available, due, of one of its tasks
-- (`task_ids`), in no named queue or in one that is available and not in
-- `excluded_queues` (locked, skipping queues others hold), and carrying none
-- of the `forbidden_flags`.
jobs.is_available = true
and jobs.run_at <= greatest(now(), %(now)s::timestamptz)
and jobs.task_id = any(%(task_ids)s::int[])
and (
    jobs.job_queue_id is null
    or jobs.job_queue_id in (
        select queues.id from {s}._private_job_queues as queues
        where queues.is_available = true
        and queues.queue_name <> all(%(excluded_queues)s::text[])
        for update skip locked
    )
)
and (%(forbidden_flags)s::text[] is null
     or (jobs.flags ?| %(forbidden_flags)s::text[]) is not true)

-- fragment: candidate_columns
-- What every claim's `candidates` selects for lock_candidates below.
jobs.ctid, jobs.id, jobs.job_queue_id, jobs.priority, jobs.run_at

-- fragment: lock_candidates
-- The CTEs that claim from `candidates` (candidate_columns, rows locked): at
-- most one job per named queue, the queues and jobs locked for this pool; `claimed` returns claim_columns. Only the queued
-- candidates are sorted (usually few; a window over the whole batch cost 0.4 ms
-- per claim of 500), and only they look up their queue row. The update finds
-- each row by its ctid, which cannot change while the row is locked: no
-- primary-key lookup per job (two fewer buffer reads each); the id is checked too.
picked as (
    select candidates.ctid, candidates.id, candidates.job_queue_id
    from candidates
    where candidates.job_queue_id is null
    union all
    select first_of_queue.ctid, first_of_queue.id, first_of_queue.job_queue_id
    from (
        select distinct on (candidates.job_queue_id)
            candidates.ctid, candidates.id, candidates.job_queue_id
        from candidates
        where candidates.job_queue_id is not null
        order by candidates.job_queue_id, candidates.priority, candidates.run_at, candidates.id
    ) as first_of_queue
),
locked_queues as (
    update {s}._private_job_queues as queues
    set locked_by = %(pool_id)s::text, locked_at = now()
    from picked
    where queues.id = picked.job_queue_id and picked.job_queue_id is not null
),
claimed as (
    update {s}._private_jobs as jobs
    set attempts = jobs.attempts + 1, locked_by = %(pool_id)s::text, locked_at = now()
    from picked
    where jobs.ctid = picked.ctid and jobs.id = picked.id
    returning {claim_columns}
)

-- name: get_jobs
-- Claim up to `batch` runnable jobs for this pool, in priority then run_at
-- order, skipping rows and queues other workers hold. Jobs in a named queue
-- may only run when the queue is unlocked, and a batch takes at most one job
-- per named queue, so named queues stay strictly serial even with batching.
-- Rows locked by `candidates` but not picked stay untouched (and so
-- available) once the statement ends. Each row also carries how many
-- candidates the claim saw: when that reached `batch`, more may be waiting
-- even if the one-per-queue rule kept fewer. Rows come back in run order.
-- `now` is the worker's own clock when a test gave it one (ManualClock, as
-- graphile-worker's useNodeTime), else null: a job is ready once either the
-- database's time or that clock has reached its run_at, so advancing the test
-- clock makes retries and delayed jobs due while ordinary jobs still run.
-- Jobs of limited or paused keys (kongtask/jobs/limits.py) are left out: the
-- caller leaves their tasks out of `task_ids`, names their queues in
-- `excluded_queues` and adds limited flags to `forbidden_flags`.
with candidates as (
    select {candidate_columns}
    from {s}._private_jobs as jobs
    where {runnable_for_pool}
    order by jobs.priority asc, jobs.run_at asc
    limit %(batch)s
    for update of jobs skip locked
),
{lock_candidates}
select claimed.*, (select count(*) from candidates)::int as seen
from claimed
order by claimed.priority, claimed.run_at, claimed.id

-- name: analyze_jobs
-- Refresh the planner's statistics of the jobs table. A claim planned with
-- statistics taken while the table was (nearly) empty seq-scans and sorts the
-- whole backlog (240 ms per claim at 170,000 waiting jobs against 15 ms once
-- analyzed); autovacuum repairs that only after its next pass, or never when it
-- is off. skip_locked: if another session is analyzing or vacuuming the table,
-- do nothing rather than wait.
analyze (skip_locked) {s}._private_jobs

-- name: jobs_dead_rows
-- The jobs table's dead and live row counts as the statistics system last
-- heard them (each backend reports its writes within about a second), for the
-- worker's own upkeep (kongtask/jobs/upkeep.py). Matched by name, not cast to
-- regclass, so a schema name needing quotes is looked up as it is.
select pg_stat_get_dead_tuples(tables.oid)::bigint as dead,
       pg_stat_get_live_tuples(tables.oid)::bigint as live
from pg_class as tables
join pg_namespace as namespaces on namespaces.oid = tables.relnamespace
where namespaces.nspname = %(schema)s and tables.relname = '_private_jobs'

-- name: vacuum_jobs
-- Remove the dead rows of finished jobs and their index entries, which every
-- claim otherwise walks past (see kongtask/jobs/upkeep.py), and refresh the
-- statistics. Outside any transaction; skip_locked: another vacuum or analyze
-- of the table (autovacuum's, another worker's) is already doing it.
vacuum (skip_locked, analyze) {s}._private_jobs

-- name: orphaned_claims
-- Jobs this pool locked in a claim whose answer never arrived (the statement
-- committed, then the connection broke): everything locked by the pool after
-- its last answered claim, except what the retried claim just returned. Only
-- the claimer locks jobs for a pool, so these can only be those orphans; the
-- claimer adopts them instead of leaving them locked until the 4-hour sweep.
select {claim_columns}
from {s}._private_jobs as jobs
where jobs.locked_by = %(pool_id)s::text
and jobs.locked_at > %(since)s::timestamptz
and jobs.id <> all(%(claimed)s::bigint[])
order by jobs.priority, jobs.run_at, jobs.id

-- fragment: delete_completed
-- The CTE `finished` of complete_jobs: the successful jobs deleted, returning
-- their job_queue_id.
finished as (
    delete from {s}._private_jobs as jobs
    where jobs.id = any(%(ids)s::bigint[])
    and (jobs.locked_by = %(pool_id)s::text or jobs.locked_by is null)
    returning jobs.job_queue_id
)

-- name: complete_jobs
-- Finish successful jobs: delete them and release their queues (only queues
-- this pool holds). A job another pool holds now is left alone: this pool
-- was declared dead while the handler ran, and the other pool is running the
-- job again; deleting its row would leave that pool's named queue locked
-- (its own completion would find no row, so release no queue) and drop its
-- outcome. (graphile-worker deletes by id alone.) An unlocked row is deleted:
-- the job did succeed, and is not running anywhere.
with {delete_completed}
{release_pool_queues}

-- name: complete_jobs_announcing
-- As complete_jobs, and in the same statement (no extra round trip) tell the
-- pools that limited jobs finished when a key has jobs waiting for room (see
-- notify_released in limits.sql).
with {delete_completed},
released as (
{release_pool_queues}
)
{announce_release}

-- name: fail_jobs
-- Fail jobs this pool holds, each with its own message and optionally a
-- replacement payload (batch jobs retry only their failed items). The retry
-- waits exp(min(attempts, 10)) seconds; the queue is released. A spec marked
-- `permanent` (a cancelled job) uses up its attempts: it never runs again.
with specs as (
    select (spec->>'id')::bigint as id, spec->>'message' as message, spec->'payload' as payload,
           coalesce((spec->>'permanent')::boolean, false) as permanent
    from json_array_elements(%(specs)s::json) as spec
),
finished as (
    update {s}._private_jobs as jobs
    set last_error = specs.message,
        attempts = case when specs.permanent then greatest(jobs.attempts, jobs.max_attempts)
                        else jobs.attempts end,
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
{release_pool_queues}
)
select * from finished

-- name: permanently_fail_held_job
-- The completer's last resort for one job whose outcome the database refused
-- to record (a constraint, trigger or foreign key of the application's on the
-- row): permanently fail it with a plain message, touching neither its payload
-- nor its run_at, and release its queue, so it is never left locked and does
-- not run again.
with finished as (
    update {s}._private_jobs as jobs
    set last_error = %(message)s::text,
        attempts = greatest(jobs.attempts, jobs.max_attempts),
        locked_by = null,
        locked_at = null,
        updated_at = now()
    where jobs.id = %(id)s::bigint and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
{release_pool_queues}

-- name: held_jobs
-- Which of the buffered jobs this pool still holds, with the locked_at of its
-- lock (see kongtask/jobs/ownership.py). The caller compares locked_at with
-- the one its claim returned: a job released and claimed again by this pool
-- is buffered twice, and only the later copy may run. Looked up by primary
-- key (a filter on locked_by alone would scan the whole table).
select jobs.id, jobs.locked_at
from {s}._private_jobs as jobs
where jobs.id = any(%(ids)s::bigint[]) and jobs.locked_by = %(pool_id)s::text

-- name: return_jobs
-- Give back claimed jobs that never started (local buffer on shutdown or TTL):
-- the attempt they were charged is refunded.
with finished as (
    update {s}._private_jobs as jobs
    set attempts = greatest(0, jobs.attempts - 1), locked_by = null, locked_at = null
    where jobs.id = any(%(ids)s::bigint[]) and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
{release_pool_queues}

-- name: reset_locked
-- The stale-lock sweep: locks older than the expiry (4 hours in production)
-- belong to dead workers; free the jobs (not before their run_at) and queues.
with jobs_reset as (
    update {s}._private_jobs as jobs
    set locked_at = null, locked_by = null, run_at = greatest(jobs.run_at, now())
    where jobs.locked_at < now() - %(expiry)s::interval
)
update {s}._private_job_queues as queues
set locked_at = null, locked_by = null
where queues.locked_at < now() - %(expiry)s::interval

-- name: release_queues
-- Release named queues this pool holds for jobs it has just finished. Used
-- after a complete/fail statement had to be retried on a new connection: if
-- the first try committed before the connection broke, the retry finds no
-- rows and so releases no queue. A queue where this pool holds a job again
-- (it claimed the next one meanwhile) stays locked, so queues stay serial.
update {s}._private_job_queues as queues
set locked_by = null, locked_at = null
where queues.id = any(%(queue_ids)s::int[])
and queues.locked_by = %(pool_id)s::text
and not exists (
    select 1 from {s}._private_jobs as jobs
    where jobs.job_queue_id = queues.id and jobs.locked_by = %(pool_id)s::text
)

-- name: migration_state
-- The newest migration recorded in this schema, and the newest breaking one.
-- A `worker:migrate` notice names no schema (graphile-worker sends the same
-- one), so the listener reads its own schema's table before believing it.
select coalesce(max(id), 0)::int, coalesce(max(id) filter (where breaking), 0)::int
from {s}.migrations

-- name: queue_names
-- Names of queues by id, for helpers.get_queue_name().
select id, queue_name from {s}._private_job_queues where id = any(%(ids)s::int[])

-- name: listen_jobs_insert
-- The listener's wake-up channel: add_job and add_jobs (graphile-worker's and
-- kongtask's) notify it for every job that becomes runnable.
LISTEN "jobs:insert"

-- name: listen_worker_migrate
-- Another worker migrated the database (possibly past what this one knows):
-- the listener then checks migration_state.
LISTEN "worker:migrate"

-- name: listen_cancel
-- Cancels of jobs a pool holds (see cancel_job); each pool acts only on those
-- naming its schema and itself.
LISTEN "kongtask:cancel"

-- name: listener_check
-- The quiet LISTEN connection's check that the path still answers; a
-- half-open connection would otherwise wait for notifications for ever.
select 1
