-- kongtask migration 000019: the graphile-worker 0.17 database, built in one step.
--
-- Brings an empty schema to the end state of graphile-worker's migration 19 so a
-- Node graphile-worker 0.17.x sees the database as fully migrated. The runner
-- (kongtask/migrate.py) records ids 1..19 in the "migrations" table before this
-- text runs, and replaces every schema token (a colon followed by KONGTASK_SCHEMA)
-- with the quoted schema identifier. Object names (tables, constraints, indexes,
-- sequences) are part of the shared contract and must not change; this file is
-- immutable once released.

-- Task identifiers; a job refers to its task by id (no foreign key, for speed).
create table :KONGTASK_SCHEMA._private_tasks (
  id integer generated always as identity (sequence name :KONGTASK_SCHEMA.tasks_id_seq)
    constraint tasks_pkey primary key,
  identifier text not null
    constraint tasks_identifier_key unique
    constraint tasks_identifier_check check (length(identifier) <= 128)
);

-- Named queues: a queue is locked while one of its jobs runs, so its jobs run in series.
create table :KONGTASK_SCHEMA._private_job_queues (
  id integer generated always as identity (sequence name :KONGTASK_SCHEMA.job_queues_id_seq)
    constraint job_queues_pkey1 primary key,
  queue_name text not null
    constraint job_queues_queue_name_key unique
    constraint job_queues_queue_name_check check (length(queue_name) <= 128),
  locked_at timestamptz,
  locked_by text,
  is_available boolean generated always as (locked_at is null) stored not null
);

-- The jobs. is_available is what the fetch query and both partial indexes key on.
create table :KONGTASK_SCHEMA._private_jobs (
  id bigint generated always as identity (sequence name :KONGTASK_SCHEMA.jobs_id_seq1)
    constraint jobs_pkey1 primary key,
  job_queue_id integer,
  task_id integer not null,
  payload json not null default '{}'::json,
  priority smallint not null default 0,
  run_at timestamptz not null default now(),
  attempts smallint not null default 0,
  max_attempts smallint not null default 25
    constraint jobs_max_attempts_check check (max_attempts >= 1),
  last_error text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  key text
    constraint jobs_key_key1 unique
    constraint jobs_key_check check (length(key) > 0 and length(key) <= 512),
  locked_at timestamptz,
  locked_by text,
  revision integer not null default 0,
  flags jsonb,
  is_available boolean
    generated always as (locked_at is null and attempts < max_attempts) stored not null
);

create index jobs_main_index
  on :KONGTASK_SCHEMA._private_jobs using btree (priority, run_at)
  include (id, task_id, job_queue_id)
  where (is_available = true);

create index jobs_no_queue_index
  on :KONGTASK_SCHEMA._private_jobs using btree (priority, run_at)
  include (id, task_id)
  where (is_available = true and job_queue_id is null);

-- Distributed cron bookkeeping: last_execution is advanced in the same transaction
-- that inserts a firing's job, which is what stops two schedulers firing twice.
create table :KONGTASK_SCHEMA._private_known_crontabs (
  identifier text constraint known_crontabs_pkey primary key,
  known_since timestamptz not null,
  last_execution timestamptz
);

alter table :KONGTASK_SCHEMA._private_tasks enable row level security;
alter table :KONGTASK_SCHEMA._private_job_queues enable row level security;
alter table :KONGTASK_SCHEMA._private_jobs enable row level security;
alter table :KONGTASK_SCHEMA._private_known_crontabs enable row level security;

-- One job to add, as taken by add_jobs().
create type :KONGTASK_SCHEMA.job_spec as (
  identifier text,
  payload json,
  queue_name text,
  run_at timestamptz,
  max_attempts smallint,
  job_key text,
  priority smallint,
  flags text[]
);

-- The public, read-only face of the jobs (no payload, no internal ids).
create view :KONGTASK_SCHEMA.jobs as
  select
    job.id,
    queue.queue_name,
    task.identifier as task_identifier,
    job.priority,
    job.run_at,
    job.attempts,
    job.max_attempts,
    job.last_error,
    job.created_at,
    job.updated_at,
    job.key,
    job.locked_at,
    job.locked_by,
    job.revision,
    job.flags
  from :KONGTASK_SCHEMA._private_jobs as job
  inner join :KONGTASK_SCHEMA._private_tasks as task on task.id = job.task_id
  left join :KONGTASK_SCHEMA._private_job_queues as queue on queue.id = job.job_queue_id;

-- add_jobs: insert (or, by job key, replace) many jobs in one statement.
-- A keyed job that is locked or permanently failed loses its key first (and will not
-- be retried) so a fresh job takes the key; an unlocked one is updated in place, with
-- array payloads appended to, and run_at kept when preserving an unattempted job's time.
create function :KONGTASK_SCHEMA.add_jobs(
  specs :KONGTASK_SCHEMA.job_spec[],
  job_key_preserve_run_at boolean default false
) returns setof :KONGTASK_SCHEMA._private_jobs
language plpgsql volatile
as $body$
begin
  insert into :KONGTASK_SCHEMA._private_tasks (identifier)
    select distinct spec.identifier
    from unnest(specs) as spec
    on conflict do nothing;

  insert into :KONGTASK_SCHEMA._private_job_queues (queue_name)
    select distinct spec.queue_name
    from unnest(specs) as spec
    where spec.queue_name is not null
    on conflict do nothing;

  update :KONGTASK_SCHEMA._private_jobs as existing
    set key = null, attempts = existing.max_attempts, updated_at = now()
    from unnest(specs) as spec
    where spec.job_key is not null
      and existing.key = spec.job_key
      and existing.is_available is not true;

  -- The random number keeps PostgreSQL from folding notifications within a transaction.
  perform pg_notify(
    'jobs:insert',
    format('{"r":%s,"count":%s}', random(), coalesce(array_length(specs, 1), 0))
  );

  return query
    insert into :KONGTASK_SCHEMA._private_jobs as cur (
      job_queue_id, task_id, payload, run_at, max_attempts, key, priority, flags
    )
    select
      queue.id,
      task.id,
      coalesce(spec.payload, '{}'::json),
      coalesce(spec.run_at, now()),
      coalesce(spec.max_attempts, 25::smallint),
      spec.job_key,
      coalesce(spec.priority, 0::smallint),
      (select jsonb_object_agg(flag, true) from unnest(spec.flags) as flag)
    from unnest(specs) with ordinality as spec (
      identifier, payload, queue_name, run_at, max_attempts, job_key, priority, flags, ord
    )
    inner join :KONGTASK_SCHEMA._private_tasks as task on task.identifier = spec.identifier
    left join :KONGTASK_SCHEMA._private_job_queues as queue on queue.queue_name = spec.queue_name
    order by spec.ord
    on conflict (key) do update set
      job_queue_id = excluded.job_queue_id,
      task_id = excluded.task_id,
      payload = (
        case
          when json_typeof(cur.payload) = 'array' and json_typeof(excluded.payload) = 'array'
          then (
            select coalesce(json_agg(item.value order by item.part, item.ord), '[]'::json)
            from (
              select 1 as part, a.ord, a.value
                from json_array_elements(cur.payload) with ordinality as a (value, ord)
              union all
              select 2 as part, b.ord, b.value
                from json_array_elements(excluded.payload) with ordinality as b (value, ord)
            ) as item
          )
          else excluded.payload
        end
      ),
      max_attempts = excluded.max_attempts,
      priority = excluded.priority,
      flags = excluded.flags,
      run_at = (
        case
          when job_key_preserve_run_at and cur.attempts = 0 then cur.run_at
          else excluded.run_at
        end
      ),
      revision = cur.revision + 1,
      attempts = 0,
      last_error = null,
      updated_at = now()
    where cur.locked_at is null
    returning *;
end;
$body$;

-- add_job: add one job. 'replace' and 'preserve_run_at' go through add_jobs;
-- 'unsafe_dedupe' leaves an existing keyed job alone apart from bumping its revision.
create function :KONGTASK_SCHEMA.add_job(
  identifier text,
  payload json default null,
  queue_name text default null,
  run_at timestamptz default null,
  max_attempts integer default null,
  job_key text default null,
  priority integer default null,
  flags text[] default null,
  job_key_mode text default 'replace'
) returns :KONGTASK_SCHEMA._private_jobs
language plpgsql volatile
as $body$
declare
  result_row :KONGTASK_SCHEMA._private_jobs;
begin
  if add_job.job_key is null
    or add_job.job_key_mode is null
    or add_job.job_key_mode in ('replace', 'preserve_run_at')
  then
    select added.* into result_row
    from :KONGTASK_SCHEMA.add_jobs(
      array[
        cast(row(
          add_job.identifier,
          add_job.payload,
          add_job.queue_name,
          add_job.run_at,
          add_job.max_attempts::smallint,
          add_job.job_key,
          add_job.priority::smallint,
          add_job.flags
        ) as :KONGTASK_SCHEMA.job_spec)
      ],
      add_job.job_key_mode = 'preserve_run_at'
    ) as added
    limit 1;
    return result_row;
  elsif add_job.job_key_mode = 'unsafe_dedupe' then
    insert into :KONGTASK_SCHEMA._private_tasks (identifier)
      values (add_job.identifier)
      on conflict do nothing;
    if add_job.queue_name is not null then
      insert into :KONGTASK_SCHEMA._private_job_queues (queue_name)
        values (add_job.queue_name)
        on conflict do nothing;
    end if;

    insert into :KONGTASK_SCHEMA._private_jobs as cur (
      job_queue_id, task_id, payload, run_at, max_attempts, key, priority, flags
    )
    select
      (select queue.id
         from :KONGTASK_SCHEMA._private_job_queues as queue
         where queue.queue_name = add_job.queue_name),
      task.id,
      coalesce(add_job.payload, '{}'::json),
      coalesce(add_job.run_at, now()),
      coalesce(add_job.max_attempts::smallint, 25::smallint),
      add_job.job_key,
      coalesce(add_job.priority::smallint, 0::smallint),
      (select jsonb_object_agg(flag, true) from unnest(add_job.flags) as flag)
    from :KONGTASK_SCHEMA._private_tasks as task
    where task.identifier = add_job.identifier
    on conflict (key) do update set
      revision = cur.revision + 1,
      updated_at = now()
    returning * into result_row;

    if result_row.revision = 0 then
      perform pg_notify('jobs:insert', format('{"r":%s,"count":1}', random()));
    end if;
    return result_row;
  else
    raise exception 'Invalid job_key_mode value, expected ''replace'', ''preserve_run_at'' or ''unsafe_dedupe''.'
      using errcode = 'GWBKM';
  end if;
end;
$body$;

-- remove_job: delete a job by key unless it is running (a lock younger than 4 hours);
-- a running job instead loses its key and will not be retried. Unknown key: all NULLs.
create function :KONGTASK_SCHEMA.remove_job(job_key text)
returns :KONGTASK_SCHEMA._private_jobs
language plpgsql volatile strict
as $body$
declare
  result_row :KONGTASK_SCHEMA._private_jobs;
begin
  delete from :KONGTASK_SCHEMA._private_jobs as job
    where job.key = remove_job.job_key
      and (job.locked_at is null or job.locked_at < now() - interval '4 hours')
    returning * into result_row;
  if result_row.id is not null then
    perform pg_notify('jobs:insert', format('{"r":%s,"count":-1}', random()));
    return result_row;
  end if;

  update :KONGTASK_SCHEMA._private_jobs as job
    set key = null, attempts = job.max_attempts, updated_at = now()
    where job.key = remove_job.job_key
    returning * into result_row;
  return result_row;
end;
$body$;

-- complete_jobs: administrative completion (deletion) of jobs that are not running.
create function :KONGTASK_SCHEMA.complete_jobs(job_ids bigint[])
returns setof :KONGTASK_SCHEMA._private_jobs
language sql volatile
as $body$
  delete from :KONGTASK_SCHEMA._private_jobs as job
    where job.id = any(complete_jobs.job_ids)
      and (job.locked_at is null or job.locked_at < now() - interval '4 hours')
    returning *;
$body$;

-- permanently_fail_jobs: mark jobs that are not running as failed for good.
create function :KONGTASK_SCHEMA.permanently_fail_jobs(
  job_ids bigint[],
  error_message text default null
) returns setof :KONGTASK_SCHEMA._private_jobs
language sql volatile
as $body$
  update :KONGTASK_SCHEMA._private_jobs as job
    set
      last_error = coalesce(permanently_fail_jobs.error_message, 'Manually marked as failed'),
      attempts = job.max_attempts,
      updated_at = now()
    where job.id = any(permanently_fail_jobs.job_ids)
      and (job.locked_at is null or job.locked_at < now() - interval '4 hours')
    returning *;
$body$;

-- reschedule_jobs: change the timing and retry budget of jobs that are not running;
-- a NULL argument leaves that column as it is.
create function :KONGTASK_SCHEMA.reschedule_jobs(
  job_ids bigint[],
  run_at timestamptz default null,
  priority integer default null,
  attempts integer default null,
  max_attempts integer default null
) returns setof :KONGTASK_SCHEMA._private_jobs
language sql volatile
as $body$
  update :KONGTASK_SCHEMA._private_jobs as job
    set
      run_at = coalesce(reschedule_jobs.run_at, job.run_at),
      priority = coalesce(reschedule_jobs.priority::smallint, job.priority),
      attempts = coalesce(reschedule_jobs.attempts::smallint, job.attempts),
      max_attempts = coalesce(reschedule_jobs.max_attempts::smallint, job.max_attempts),
      updated_at = now()
    where job.id = any(reschedule_jobs.job_ids)
      and (job.locked_at is null or job.locked_at < now() - interval '4 hours')
    returning *;
$body$;

-- force_unlock_workers: release every job and queue locked by the given (dead) workers.
create function :KONGTASK_SCHEMA.force_unlock_workers(worker_ids text[])
returns void
language sql volatile
as $body$
  update :KONGTASK_SCHEMA._private_jobs as job
    set locked_at = null, locked_by = null
    where job.locked_by = any(force_unlock_workers.worker_ids);
  update :KONGTASK_SCHEMA._private_job_queues as queue
    set locked_at = null, locked_by = null
    where queue.locked_by = any(force_unlock_workers.worker_ids);
$body$;
