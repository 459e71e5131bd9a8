-- kongtask's own tables, outside graphile-worker's contract (a Node worker never
-- reads them). Recorded in :KONGTASK_SCHEMA._kongtask_migrations, not in migrations.

-- One row per live kongtask worker pool: its heartbeat lets the other pools
-- tell a dead pool from a live one without asking pg_stat_activity (which
-- cannot tell through pgbouncer).
create table :KONGTASK_SCHEMA._kongtask_pools (
  pool_id text primary key,
  hostname text not null,
  pid int not null,
  concurrency int not null,
  started_at timestamptz not null default now(),
  last_seen timestamptz not null default now(),
  version text not null
);

-- Jobs that were running, as suspects, in a pool that died: how many times
-- each has killed its worker. A job becomes a suspect when a dead pool's locks
-- are released (its last_error then says so); a suspect runs only after this
-- row names its pool in running_pool, so the next release can blame it.
create table :KONGTASK_SCHEMA._kongtask_job_crashes (
  job_id bigint primary key,
  crashes int not null default 0,
  running_pool text,
  running_since timestamptz,
  last_crash_at timestamptz
);
