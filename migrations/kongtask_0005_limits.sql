-- Fleet-wide limits and pauses (kongtask's own tables: a Node graphile-worker
-- never reads them, so it ignores both). Recorded in
-- :KONGTASK_SCHEMA._kongtask_migrations.

-- A limit on one key: a task identifier, a named queue or a job flag value.
-- concurrency: at most this many jobs of the key locked at once across every
-- kongtask pool on the schema. rate_count / rate_interval_s: at most that
-- many starts in any window of that many seconds; rate_starts holds the
-- start times of the last rate_count starts (written by the claim that
-- starts them, under this row's lock).
create table :KONGTASK_SCHEMA._kongtask_limits (
  key_kind text not null check (key_kind in ('task', 'queue', 'flag')),
  key text not null check (length(key) between 1 and 512),
  concurrency int check (concurrency >= 1),
  rate_count int check (rate_count >= 1),
  rate_interval_s double precision check (rate_interval_s > 0),
  rate_starts timestamptz[] not null default '{}',
  waiting boolean not null default false,
  updated_at timestamptz not null default now(),
  primary key (key_kind, key),
  check ((rate_count is null) = (rate_interval_s is null)),
  check (concurrency is not null or rate_count is not null)
);

-- A paused task or named queue: no kongtask pool claims its jobs until it is
-- resumed (jobs already running finish).
create table :KONGTASK_SCHEMA._kongtask_pauses (
  key_kind text not null check (key_kind in ('task', 'queue')),
  key text not null check (length(key) between 1 and 512),
  paused_by text not null,
  paused_at timestamptz not null default now(),
  primary key (key_kind, key)
);

-- The task identifiers a pool serves, so `kongtask status` can say when ready
-- jobs wait for a task no live pool serves (null: a pool that did not say).
alter table :KONGTASK_SCHEMA._kongtask_pools add column tasks text[];
