-- Per-minute outcome counts by task, written by each kongtask pool with its
-- heartbeat (completed jobs are deleted, so the queue itself cannot say how
-- many finished): the dashboard charts throughput, failures and pickup
-- latency from it. A Node graphile-worker neither writes nor reads it. Rows
-- older than 24 hours are pruned by the heartbeats.
create table :KONGTASK_SCHEMA._kongtask_task_stats (
  minute timestamptz not null,
  task text not null,
  pool_id text not null,
  finished int not null default 0,
  failed int not null default 0,
  -- pickup latency (locked_at - run_at) of the jobs counted: sum, count, max
  latency_sum_s double precision not null default 0,
  latency_count int not null default 0,
  latency_max_s double precision,
  primary key (minute, task, pool_id)
);

