-- Fleet-wide limits and pauses (kongtask's own tables, see
-- migrations/kongtask_0005_limits.sql and kongtask/jobs/limits.py).
-- Format: see jobs.sql.

-- name: limit_snapshot
-- What a pool caches: every limited key and every paused key.
select 'limit' as what, key_kind, key from {s}._kongtask_limits
union all
select 'pause', key_kind, key from {s}._kongtask_pauses

-- name: lock_limits
-- The exclusive limited claim's first step: lock every limit row, so one
-- such claim runs at a time across the fleet (and no shared one meanwhile)
-- and each sees what the previous one locked. The transaction's time and the number of kongtask
-- pools on the schema (live or not: an upper bound) come with each row.
select key_kind, key, concurrency, rate_count, rate_interval_s, rate_starts, waiting, now(),
       (select count(*) from {s}._kongtask_pools)::int
from {s}._kongtask_limits
order by key_kind, key
for update

-- fragment: limited_key_of_job
-- Whether a job (with its task row `tasks` and queue row `queues`) falls
-- under one of the limited keys in `tasks`, `queues`, `flags`.
(tasks.identifier = any(%(tasks)s::text[])
 or queues.queue_name = any(%(queues)s::text[])
 or (jobs.flags ?| %(flags)s::text[]) is true)

-- name: locked_limited_jobs
-- The jobs of limited keys locked now (a lock older than the expiry is a dead
-- worker's and counts for nothing): their task, queue and limited flags. The
-- caller counts them per key.
select tasks.identifier, queues.queue_name,
       array(select flag from unnest(%(flags)s::text[]) as flag where jobs.flags ? flag)
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
where jobs.locked_at is not null
and jobs.locked_at > now() - %(expiry)s::interval
and {limited_key_of_job}

-- fragment: limited_runnable
-- Runnable jobs of limited keys with room (`open_*`), none of a key without
-- room (`closed_*`), none paused (the caller leaves paused tasks out of
-- `task_ids` and names paused queues in `excluded_queues`). Tasks come as ids
-- and every test is on the job row, each kind guarded by whether it has keys
-- at all (folded away when planning; `only_tasks`: the open keys are tasks,
-- and `task_ids` holds just those), so the planner sees how many jobs match
-- and walks the jobs index in claim order instead of sorting the backlog.
from {s}._private_jobs as jobs
where {runnable_for_pool}
and (%(only_tasks)s::boolean
     or jobs.task_id = any(%(open_task_ids)s::int[])
     or (cardinality(%(open_queues)s::text[]) > 0 and jobs.job_queue_id = any(array(
         select queues.id from {s}._private_job_queues as queues
         where queues.queue_name = any(%(open_queues)s::text[]))))
     or (cardinality(%(open_flags)s::text[]) > 0
         and (jobs.flags ?| %(open_flags)s::text[]) is true))
and jobs.task_id <> all(%(closed_task_ids)s::int[])
and (cardinality(%(closed_queues)s::text[]) = 0 or jobs.job_queue_id is null
     or jobs.job_queue_id <> all(array(
         select queues.id from {s}._private_job_queues as queues
         where queues.queue_name = any(%(closed_queues)s::text[]))))
and (cardinality(%(closed_flags)s::text[]) = 0
     or (jobs.flags ?| %(closed_flags)s::text[]) is not true)

-- name: limited_candidates
-- The limited_runnable jobs in claim order with their keys, locked until the
-- transaction ends, so no other claim takes them meanwhile.
with candidates as (
    select jobs.id, jobs.task_id, jobs.job_queue_id, jobs.flags, jobs.priority, jobs.run_at
    {limited_runnable}
    order by jobs.priority asc, jobs.run_at asc, jobs.id asc
    limit %(scan)s
    for update of jobs skip locked
)
select candidates.id, tasks.identifier, queues.queue_name,
       array(select flag from unnest(%(limited_flags)s::text[]) as flag
             where candidates.flags ? flag)
from candidates
join {s}._private_tasks as tasks on tasks.id = candidates.task_id
left join {s}._private_job_queues as queues on queues.id = candidates.job_queue_id
order by candidates.priority asc, candidates.run_at asc, candidates.id asc

-- name: claim_limited_runnable
-- The limited claim's short way, when every open key has room for the whole
-- batch and none has a rate: claim up to `batch` limited_runnable jobs as
-- get_jobs does, in one statement.
with candidates as (
    select {candidate_columns}
    {limited_runnable}
    order by jobs.priority asc, jobs.run_at asc
    limit %(scan)s
    for update of jobs skip locked
),
{lock_candidates}
select claimed.*, 0 as seen
from claimed
order by claimed.priority, claimed.run_at, claimed.id

-- name: claim_limited_shared
-- The limited claim's fast way while every key has ample room: one statement
-- (its own transaction) that locks the limit rows shared, so such claims run
-- side by side and wait only for an exclusive one (lock_limits). It claims
-- only if every row is still the version this statement's snapshot read (an
-- exclusive claim that committed while this one waited rewrote the rows it
-- locked, and the jobs it took are not in this snapshot's count), has no rate
-- and no jobs waiting, and has room for `shared_max` jobs from every kongtask
-- pool (kongtask/jobs/limits.py says why that holds); then it takes up to
-- `scan` limited_runnable jobs as claim_limited_runnable does. It answers at
-- least one row, whose last column says whether the rows let it claim (1) or
-- not (0); with no job claimed, the job columns are null.
with limit_rows as (
    select limits.key_kind, limits.key, limits.concurrency, limits.rate_count,
           limits.waiting, limits.xmin as version
    from {s}._kongtask_limits as limits
    for share
),
locked as materialized (
    select jobs.task_id, jobs.job_queue_id, jobs.flags
    from {s}._private_jobs as jobs
    where jobs.locked_at > now() - %(expiry)s::interval
),
running as (
    select keys.key_kind, keys.key, count(*) as running
    from (
        select 'task' as key_kind, tasks.identifier as key
        from locked join {s}._private_tasks as tasks on tasks.id = locked.task_id
        union all
        select 'queue', queues.queue_name
        from locked join {s}._private_job_queues as queues on queues.id = locked.job_queue_id
        union all
        select 'flag', flag.key
        from locked, jsonb_object_keys(locked.flags) as flag(key)
        where jsonb_typeof(locked.flags) = 'object'
    ) as keys
    group by keys.key_kind, keys.key
),
gate as (
    -- Counted once for every key (not once per limit row): the plan's cost stays
    -- far below where PostgreSQL would compile it (JIT), which costs more than it runs.
    select coalesce(bool_and(coalesce(
        limit_rows.rate_count is null
        and not limit_rows.waiting
        and limit_rows.version = seen.xmin
        and (limit_rows.concurrency is null
             or limit_rows.concurrency - coalesce(running.running, 0)
                >= %(shared_max)s::int * (select count(*) from {s}._kongtask_pools)),
        false
    )), false) as open
    from limit_rows
    left join {s}._kongtask_limits as seen
        on seen.key_kind = limit_rows.key_kind and seen.key = limit_rows.key
    left join running
        on running.key_kind = limit_rows.key_kind and running.key = limit_rows.key
),
candidates as (
    select {candidate_columns}
    {limited_runnable}
    and (select gate.open from gate)
    order by jobs.priority asc, jobs.run_at asc
    limit %(scan)s
    for update of jobs skip locked
),
{lock_candidates}
select claimed.*, gate.open::int as seen
from gate
left join claimed on true
order by claimed.priority, claimed.run_at, claimed.id

-- name: claim_limited
-- Lock the jobs the limited claim picked (at most one per named queue, rows
-- locked by limited_candidates) and their queues, as get_jobs does.
with candidates as (
    select {candidate_columns}
    from {s}._private_jobs as jobs
    where jobs.id = any(%(ids)s::bigint[]) and jobs.is_available = true
),
{lock_candidates}
select claimed.*, 0 as seen
from claimed
order by claimed.priority, claimed.run_at, claimed.id

-- name: record_limited_claim
-- After an exclusive claim of limited jobs: the recent starts of rate-limited
-- keys that started more, and which keys are out of room with jobs waiting
-- (rows that change only; every row when `touch`: the claim took jobs, and a
-- shared claim waiting on these rows must see they changed, see
-- claim_limited_shared).
update {s}._kongtask_limits as limits
set rate_starts = coalesce(rows.starts, limits.rate_starts),
    waiting = coalesce(rows.waiting, false)
from {s}._kongtask_limits as current
left join json_to_recordset(%(rows)s::json) as rows(
    kind text, key text, starts timestamptz[], waiting boolean
) on rows.kind = current.key_kind and rows.key = current.key
where limits.key_kind = current.key_kind and limits.key = current.key
and (%(touch)s::boolean or rows.starts is not null
     or current.waiting is distinct from coalesce(rows.waiting, false))

-- fragment: announce_release
-- A pool finished limited jobs: tell the others if a key is out of room with
-- jobs waiting (they may claim the next now); otherwise say nothing.
select pg_notify('kongtask:limits', json_build_object(
    'schema', %(schema)s::text, 'what', 'released'
)::text)
where exists (select 1 from {s}._kongtask_limits where waiting)

-- name: notify_released
{announce_release}

-- name: notify_limits
-- Tell every pool on the channel: `what` is `changed` (limits or pauses
-- changed: refresh) or `released` (a limited job finished: room may be free).
select pg_notify('kongtask:limits', json_build_object(
    'schema', %(schema)s::text, 'what', %(what)s::text
)::text)

-- name: listen_limits
-- Limit and pause changes, and limited jobs finishing (see notify_limits).
LISTEN "kongtask:limits"

-- name: locked_index_exists
-- Whether the index of locked jobs is there (see create_locked_index).
select exists (
    select 1 from pg_catalog.pg_indexes
    where schemaname = %(schema)s::text and indexname = '_kongtask_jobs_locked_idx'
)

-- name: create_locked_index
-- The index the limited claims count locked jobs with, created with the first
-- limit (not by a migration: a schema without limits does not pay for it on
-- every claim). Only claimed rows have an entry, so it stays as small as what
-- the fleet holds. Building it scans the jobs table once and blocks writes
-- to it meanwhile.
create index if not exists _kongtask_jobs_locked_idx
on {s}._private_jobs using btree (locked_at)
where (locked_at is not null)

-- name: set_limit
-- Create or replace the limit on one key (a rate keeps its recent starts
-- when its count is unchanged).
insert into {s}._kongtask_limits as limits
    (key_kind, key, concurrency, rate_count, rate_interval_s)
values (%(kind)s::text, %(key)s::text, %(concurrency)s::int, %(rate_count)s::int,
        %(rate_interval_s)s::double precision)
on conflict (key_kind, key) do update
set concurrency = excluded.concurrency,
    rate_count = excluded.rate_count,
    rate_interval_s = excluded.rate_interval_s,
    rate_starts = case when limits.rate_count = excluded.rate_count
                       then limits.rate_starts else '{{}}' end,
    updated_at = now()

-- name: clear_limit
delete from {s}._kongtask_limits where key_kind = %(kind)s::text and key = %(key)s::text

-- name: list_limits
-- Every limit with how many jobs of its key are locked now (a lock older than
-- the expiry counts for nothing).
select limits.key_kind, limits.key, limits.concurrency, limits.rate_count,
       limits.rate_interval_s, limits.updated_at,
       (select count(*) from {s}._private_jobs as jobs
        join {s}._private_tasks as tasks on tasks.id = jobs.task_id
        left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
        where jobs.locked_at > now() - %(expiry)s::interval
        and case limits.key_kind
            when 'task' then tasks.identifier = limits.key
            when 'queue' then queues.queue_name = limits.key
            else jobs.flags ? limits.key
        end)::int as running
from {s}._kongtask_limits as limits
order by limits.key_kind, limits.key

-- name: pause_key
-- Pause a task or queue (pausing it again keeps who paused it first, and when).
insert into {s}._kongtask_pauses (key_kind, key, paused_by)
values (%(kind)s::text, %(key)s::text, %(by)s::text)
on conflict (key_kind, key) do nothing

-- name: resume_key
delete from {s}._kongtask_pauses where key_kind = %(kind)s::text and key = %(key)s::text

-- name: list_pauses
select key_kind, key, paused_by, paused_at from {s}._kongtask_pauses order by key_kind, key

-- name: live_pool_tasks
-- The task identifiers each live kongtask pool serves (null: a pool that did
-- not record them, an older kongtask).
select pools.tasks
from {s}._kongtask_pools as pools
where pools.last_seen > now() - %(live_bound_s)s * interval '1 second'

-- name: limited_jobs_of_unknown_pools
-- Jobs of limited keys locked by a holder with no live liveness record (a
-- Node graphile-worker, which ignores limits, or a dead pool), per key and
-- holder.
select limits.key_kind, limits.key, jobs.locked_by, count(*)::int
from {s}._kongtask_limits as limits
join {s}._private_jobs as jobs on jobs.locked_at > now() - %(expiry)s::interval
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
where case limits.key_kind
          when 'task' then tasks.identifier = limits.key
          when 'queue' then queues.queue_name = limits.key
          else jobs.flags ? limits.key
      end
and not exists (
    select 1 from {s}._kongtask_pools as pools
    where pools.pool_id = jobs.locked_by
    and pools.last_seen > now() - %(live_bound_s)s * interval '1 second'
)
group by limits.key_kind, limits.key, jobs.locked_by
order by limits.key_kind, limits.key, jobs.locked_by
