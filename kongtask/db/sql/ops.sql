-- Inspection (kongtask status, kongtask jobs, metrics, the dashboard).
-- Format: see jobs.sql.

-- fragment: job_state
-- A job's state as operators name it, from its columns alone (so every
-- listing and count agrees): running = locked by a pool; failed = attempts
-- used up (permanently failed); retrying = failed before and waiting for its
-- next attempt; scheduled = never tried and run_at in the future; ready =
-- runnable now (perhaps behind a locked named queue).
case
    when jobs.locked_at is not null then 'running'
    when jobs.attempts >= jobs.max_attempts then 'failed'
    when jobs.attempts > 0 then 'retrying'
    when jobs.run_at > now() then 'scheduled'
    else 'ready'
end

-- name: status_counts
-- Job counts by task, named queue (NULL for none), state and locking pool.
select tasks.identifier as task, queues.queue_name as queue,
       {job_state} as state,
       jobs.locked_by as locked_by, count(*)::int as jobs
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
group by 1, 2, 3, 4
order by 1, 2 nulls first, 3, 4 nulls first

-- name: locked_queues
-- Named queues currently locked, and by whom.
select queue_name, locked_by, locked_at
from {s}._private_job_queues
where locked_at is not null
order by queue_name

-- name: pools
-- kongtask pools (from their heartbeat table), newest heartbeat first, with
-- whether each counts as live (heartbeat within the bound, in seconds).
select pool_id, hostname, pid, concurrency, started_at, last_seen, version, stuck_threads,
       last_seen > now() - make_interval(secs => %(live_bound_s)s) as live
from {s}._kongtask_pools
order by last_seen desc, pool_id

-- name: known_crontabs
-- Every identifier the cron protocol knows, with its last firing.
select identifier, known_since, last_execution
from {s}._private_known_crontabs
order by identifier

-- fragment: job_list_filters
-- The jobs with their task and queue rows, filtered by task, named queue,
-- state and ids (a NULL filter matches all): list_jobs and the dashboard's list.
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
left join {s}._private_job_queues as queues on queues.id = jobs.job_queue_id
where (%(task)s::text is null or tasks.identifier = %(task)s::text)
  and (%(queue)s::text is null or queues.queue_name = %(queue)s::text)
  and (%(state)s::text is null or {job_state} = %(state)s::text)
  and (%(ids)s::bigint[] is null or jobs.id = any(%(ids)s::bigint[]))

-- name: list_jobs
-- Jobs filtered by task, named queue and state, oldest run_at first; each row
-- is job_columns plus its queue name and state. NULL filters match all.
select {job_columns}, queues.queue_name, {job_state} as state
{job_list_filters}
order by jobs.run_at, jobs.id
limit %(limit)s

-- name: dashboard_jobs
-- The dashboard's job list: list_jobs' filters plus a search (NULL matches
-- all): the id written out, or a case-insensitive LIKE pattern over the key,
-- task, queue, payload text and last error; one page of rows (oldest run_at
-- first) each carrying how many rows match in all.
select {job_columns}, queues.queue_name, {job_state} as state,
       count(*) over ()::bigint as total
{job_list_filters}
  and (%(pattern)s::text is null
       or jobs.id::text = %(text)s::text
       or jobs.key ilike %(pattern)s::text
       or tasks.identifier ilike %(pattern)s::text
       or queues.queue_name ilike %(pattern)s::text
       or jobs.payload::text ilike %(pattern)s::text
       or jobs.last_error ilike %(pattern)s::text)
order by jobs.run_at, jobs.id
limit %(limit)s offset %(offset)s

-- name: dashboard_task_stats
-- Per minute and task over the last hour, every pool summed (the pools'
-- heartbeats write _kongtask_task_stats): jobs finished, attempts failed,
-- and the pickup latency (mean and max, seconds).
select minute, task, sum(finished)::int as finished, sum(failed)::int as failed,
       (sum(latency_sum_s) / nullif(sum(latency_count), 0))::float8 as latency_mean_s,
       max(latency_max_s)::float8 as latency_max_s,
       sum(latency_count)::int as latency_count
from {s}._kongtask_task_stats
where minute > now() - interval '1 hour'
group by minute, task
order by minute, task

-- name: unserved_tasks
-- Tasks with runnable jobs (unlocked, attempts left, due) that no live
-- kongtask pool serves (the dashboard's warning, `kongtask status`): none lists
-- the task, and none predates the list (a null list counts as serving every task). A Node graphile-worker keeps no
-- such record, so a task only it serves is listed too.
select tasks.identifier as task, count(*)::bigint as ready
from {s}._private_jobs as jobs
join {s}._private_tasks as tasks on tasks.id = jobs.task_id
where jobs.locked_at is null and jobs.attempts < jobs.max_attempts and jobs.run_at <= now()
  and not exists (
      select 1 from {s}._kongtask_pools as pools
      where pools.last_seen > now() - make_interval(secs => %(live_bound_s)s)
        and (pools.tasks is null or tasks.identifier = any(pools.tasks)))
group by tasks.identifier
order by 2 desc, 1

-- name: dashboard_cron_gaps
-- Minutes a cron item missed (last_execution moved past them unscheduled),
-- newest first.
select identifier, first_missed, ended_by, recorded_at
from {s}._kongtask_cron_gaps
where (%(identifier)s::text is null or identifier = %(identifier)s::text)
order by first_missed desc
limit %(limit)s

-- name: dashboard_cron_lag
-- Per cron item, over its recent firings written on time (not backfilled):
-- the last and the largest delay between the minute and the job's writing,
-- and how many minutes were skipped, per rule. Rows with an infinite time
-- (written by another client) have no lag: PostgreSQL cannot subtract them.
select identifier,
       (array_agg(extract(epoch from written_at - scheduled_at) order by scheduled_at desc)
          filter (where not backfilled and outcome <> 'skipped'
                  and isfinite(written_at) and isfinite(scheduled_at)))[1]::float8 as last_lag_s,
       max(extract(epoch from written_at - scheduled_at))
          filter (where not backfilled and outcome <> 'skipped'
                  and isfinite(written_at) and isfinite(scheduled_at))::float8 as max_lag_s,
       count(*) filter (where outcome = 'skipped')::int as skipped,
       count(*) filter (where backfilled)::int as backfilled,
       string_agg(distinct rule, ', ') filter (where outcome = 'skipped') as skip_rules
from {s}._kongtask_cron_history
where scheduled_at > now() - interval '24 hours'
group by identifier

-- name: dashboard_job_crashes
-- Jobs kongtask watched when a pool crashed (or holds under watch now), with
-- the job's task and whether it is still queued; most crashes first.
select crashes.job_id, crashes.crashes, crashes.running_pool, crashes.running_since,
       crashes.last_crash_at, tasks.identifier as task, jobs.attempts, jobs.max_attempts,
       jobs.last_error, jobs.id is not null as queued
from {s}._kongtask_job_crashes as crashes
left join {s}._private_jobs as jobs on jobs.id = crashes.job_id
left join {s}._private_tasks as tasks on tasks.id = jobs.task_id
where crashes.crashes > 0 or crashes.running_pool is not null
order by crashes.crashes desc, crashes.last_crash_at desc nulls last, crashes.job_id
limit %(limit)s

-- name: retry_jobs
-- Make jobs run now: run_at = now() and, for a job whose attempts are used
-- up, one more attempt (max_attempts = attempts + 1), keeping its history.
-- Locked jobs are left alone unless their lock is stale (as the schema's own
-- admin functions do). Workers are woken with the notification add_jobs
-- sends (same channel and payload shape), so they claim at once.
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
select {job_columns}
from retried as jobs
{task_of_job}
cross join (select count(*) from woken) as notified

-- name: failures_by_minute
-- Per minute of the last hour: how many jobs recorded a failure then (their
-- latest failure; a job failing twice in the hour counts in its last minute).
select date_trunc('minute', updated_at) as minute, count(*)::int as failures
from {s}._private_jobs
where last_error is not null and locked_at is null
  and updated_at > now() - interval '1 hour'
group by 1
order by 1

-- name: jobs_deleted_total
-- Rows ever deleted from the jobs table (completed, removed or cleaned up),
-- from PostgreSQL's statistics: sampled over time it gives the throughput.
select coalesce(n_tup_del, 0)::bigint, now()
from pg_stat_user_tables
where schemaname = %(schema)s::text and relname = '_private_jobs'

-- name: ping
-- The database answers, with its clock: the readiness probe, the `now` of
-- status reports and the cut-off of cron history retention.
select now()

-- name: set_statement_timeout
-- A connection's statement_timeout for the rest of its session (the
-- dashboard's deadline on a borrowed pool connection), e.g. '1500ms'.
select set_config('statement_timeout', %(timeout)s::text, false)

-- name: drop_schema
-- Removes the schema and everything in it: the pytest plugin's teardown of the
-- schema it made for one test.
drop schema if exists {s} cascade
