-- Pool liveness and crash quarantine (kongtask's own tables, see
-- migrations/kongtask_0001_pools.sql), and the dead pools of `kongtask admin
-- unlock-dead`. Format: see jobs.sql.

-- fragment: kongtask_pool_id
-- What a kongtask pool's id looks like (pool-<hex>, or otpool-<hex> for a
-- run-once pool), as a regular expression for `~`: lock holders that match
-- are kongtask pools, which keep a liveness row; others are Node workers.
'^(ot)?pool-[0-9a-f]+$'

-- fragment: dead_before
-- The moment before which a heartbeat (or a lock) is too old for a live pool:
-- now, less the dead-pool bound in seconds (the `dead_after_s` parameter).
now() - %(dead_after_s)s * interval '1 second'

-- name: register_pool
-- A pool announces itself before it claims anything. Timestamps are the
-- database's, never the worker's, so a skewed host clock cannot fake a death.
-- lock_key names the advisory lock the pool holds on its direct connection
-- (null: none, only the heartbeat judges it); lock_since says since when.
-- tasks lists the task identifiers it serves (for `kongtask status`).
insert into {s}._kongtask_pools
    (pool_id, hostname, pid, concurrency, version, lock_key, lock_since, tasks)
values (%(pool_id)s::text, %(hostname)s::text, %(pid)s::int, %(concurrency)s::int,
        %(version)s::text, %(lock_key)s::bigint,
        case when %(lock_key)s::bigint is not null then now() end, %(tasks)s::text[])
on conflict (pool_id) do update
set last_seen = now(), lock_key = excluded.lock_key, lock_since = excluded.lock_since,
    tasks = excluded.tasks

-- name: heartbeat
-- The heartbeat: returns no row when another pool has declared this one dead
-- (and released its locks); the caller then registers again. It also records
-- how many executor threads are stuck in a handler past its timeout.
update {s}._kongtask_pools
set last_seen = now(), stuck_threads = %(stuck_threads)s::int
where pool_id = %(pool_id)s::text
returning pool_id

-- name: deregister_pool
-- A clean stop: the pool has given everything back.
delete from {s}._kongtask_pools where pool_id = %(pool_id)s::text

-- name: take_pool_lock
-- On the pool's own direct connection: hold the pool's liveness lock for the
-- life of the session (true when taken; false when a session already holds it).
select pg_try_advisory_lock(%(lock_key)s::bigint)

-- name: pool_lock_check
-- On the pool's own direct connection: is the session (and its lock) still there?
select 1

-- name: release_dead_pools
-- Release every kongtask pool that is dead, in one statement: its heartbeat is
-- older than the bound, or it names a liveness lock that nobody holds any more
-- (its session ended: the process died; taking the lock shared lasts for this
-- statement only and never blocks, and a live holder keeps it exclusive). A
-- lock taken before the server last started is not judged (every lock went
-- with that server), and the releasing pool never judges its own. Its row goes; a suspect it was running (marked in
-- _kongtask_job_crashes) gets one more crash; its locked jobs are unlocked
-- and marked as suspects through last_error, except those that have now
-- crashed `quarantine_after` times, which are failed for good
-- (attempts = max_attempts); its named queues are unlocked. A released job
-- keeps its run_at, so it runs again before jobs that came due after it.
-- Concurrent releasers serialise on the pool rows, so each death is counted
-- once. Node pools have no row and are never touched here (the 4-hour sweep frees them).
with dead as (
    delete from {s}._kongtask_pools as pools
    where pools.last_seen < {dead_before}
    or (pools.lock_key is not null
        and pools.pool_id <> %(pool_id)s::text
        and pools.lock_since > pg_postmaster_start_time()
        and pg_try_advisory_xact_lock_shared(pools.lock_key))
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

-- name: orphaned_pool_locks
-- Lock holders that look like kongtask pools (pool-/otpool- ids) but have no
-- liveness row, holding locks older than the dead-pool bound: a pool declared
-- dead whose locks were left (or one that stopped without giving them back).
-- A live pool always has a row: it registers before claiming and registers
-- again at once if it was declared dead. Run by the (rare) stale-lock sweep.
with holders as (
    select jobs.locked_by from {s}._private_jobs as jobs
    where jobs.locked_by ~ {kongtask_pool_id}
    and jobs.locked_at < {dead_before}
    union
    select queues.locked_by from {s}._private_job_queues as queues
    where queues.locked_by ~ {kongtask_pool_id}
    and queues.locked_at < {dead_before}
)
select holders.locked_by from holders
where not exists (
    select 1 from {s}._kongtask_pools as pools where pools.pool_id = holders.locked_by
)

-- name: record_child_crash
-- The child process running a job died (the worker lives on): count one crash
-- against the job and clear any running mark; when it has now crashed
-- `quarantine_after` times, use up its attempts so the failure the completer
-- records next is final. Returns the crash count.
with counted as (
    insert into {s}._kongtask_job_crashes as crashes (job_id, crashes, last_crash_at)
    values (%(job_id)s::bigint, 1, now())
    on conflict (job_id) do update
    set crashes = crashes.crashes + 1, running_pool = null, running_since = null,
        last_crash_at = now()
    returning crashes.crashes
),
quarantined as (
    update {s}._private_jobs as jobs
    set attempts = greatest(jobs.attempts, jobs.max_attempts)
    from counted
    where jobs.id = %(job_id)s::bigint
    and jobs.locked_by = %(pool_id)s::text
    and counted.crashes >= %(quarantine_after)s::int
)
select counted.crashes from counted

-- name: gc_job_crashes
-- Crash counts of jobs that no longer exist (completed, or removed).
delete from {s}._kongtask_job_crashes as crashes
where not exists (select 1 from {s}._private_jobs as jobs where jobs.id = crashes.job_id)

-- name: mark_suspect_running
-- A suspect is about to run in this pool: name the pool, so that if the
-- process dies now the next release counts a crash against this job.
insert into {s}._kongtask_job_crashes (job_id, running_pool, running_since)
values (%(job_id)s::bigint, %(pool_id)s::text, now())
on conflict (job_id) do update
set running_pool = excluded.running_pool, running_since = excluded.running_since

-- name: finish_suspect
-- A suspect's handler returned: it did not kill the process. Its success is
-- recorded at once (the job deleted, its queue released) so a crash of the
-- next suspect cannot make it run again; the completer's later delete finds
-- nothing. On failure only the mark is cleared.
with mark as (
    update {s}._kongtask_job_crashes as crashes
    set running_pool = null, running_since = null
    where crashes.job_id = %(job_id)s::bigint
),
finished as (
    delete from {s}._private_jobs as jobs
    where jobs.id = %(job_id)s::bigint and %(succeeded)s::boolean
    and jobs.locked_by = %(pool_id)s::text
    returning jobs.job_queue_id
)
{release_pool_queues}

-- name: dead_pools
-- Lock holders that are not live kongtask pools, for `kongtask admin
-- unlock-dead`: kongtask pool ids with no liveness row or a heartbeat older
-- than the bound (never pg_stat_activity, which pgbouncer makes lie), and,
-- only when asked for, every other holder (Node pools, which keep no row).
with holders as (
    select locked_by, count(*) as jobs, 0 as queues, min(locked_at) as since
    from {s}._private_jobs where locked_by is not null group by locked_by
    union all
    select locked_by, 0, count(*), min(locked_at)
    from {s}._private_job_queues where locked_by is not null group by locked_by
)
select locked_by, sum(jobs)::int, sum(queues)::int, min(since)
from holders
where (%(any_holder)s or locked_by ~ {kongtask_pool_id})
  and not exists (
    select 1 from {s}._kongtask_pools as pools
    where pools.pool_id = holders.locked_by
    and pools.last_seen >= {dead_before}
  )
group by locked_by
order by min(since)

-- name: record_task_stats
-- A pool's outcome counts by task since its last heartbeat, added to the
-- heartbeat's minute (kongtask/jobs/stats.py), and the rows past the kept
-- window pruned. One array per column, one element per task.
with pruned as (
    delete from {s}._kongtask_task_stats
    where minute < now() - %(kept)s::interval
)
insert into {s}._kongtask_task_stats as stats
    (minute, task, pool_id, finished, failed, latency_sum_s, latency_count, latency_max_s)
select date_trunc('minute', now()), counts.task, %(pool_id)s::text, counts.finished,
       counts.failed, counts.latency_sum_s, counts.latency_count, counts.latency_max_s
from unnest(%(tasks)s::text[], %(finished)s::int[], %(failed)s::int[],
            %(latency_sum_s)s::float8[], %(latency_count)s::int[], %(latency_max_s)s::float8[])
    as counts(task, finished, failed, latency_sum_s, latency_count, latency_max_s)
on conflict (minute, task, pool_id) do update
set finished = stats.finished + excluded.finished,
    failed = stats.failed + excluded.failed,
    latency_sum_s = stats.latency_sum_s + excluded.latency_sum_s,
    latency_count = stats.latency_count + excluded.latency_count,
    latency_max_s = greatest(stats.latency_max_s, excluded.latency_max_s)
