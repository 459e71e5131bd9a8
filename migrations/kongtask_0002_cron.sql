-- kongtask's cron state, outside graphile-worker's contract (a Node worker never
-- reads these tables). Recorded in :KONGTASK_SCHEMA._kongtask_migrations.

-- Cron items added at run time (WorkerUtils.add_cron_item, `kongtask cron add`):
-- every kongtask node on this schema schedules them beside its own crontab. The
-- item is kept as its crontab line, so it is parsed by the same rules as a file.
create table :KONGTASK_SCHEMA._kongtask_cron_items (
  identifier text primary key,
  line text not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);

-- One row per (identifier, minute) that a kongtask node scheduled or skipped, and,
-- once a kongtask worker has run the job, its outcome. The unique key is also what
-- lets two nodes fill the same gap (below) without doubling a minute.
create table :KONGTASK_SCHEMA._kongtask_cron_history (
  id bigint generated always as identity primary key,
  identifier text not null,
  task text not null,
  scheduled_at timestamptz not null,
  backfilled boolean not null default false,
  outcome text not null default 'scheduled'
    check (outcome in ('scheduled', 'skipped', 'success', 'failure', 'permanent_failure')),
  rule text,
  job_id bigint,
  node text not null,
  written_at timestamptz not null default now(),
  finished_at timestamptz,
  duration_s double precision,
  attempts int,
  error text,
  unique (identifier, scheduled_at)
);
create index _kongtask_cron_history_job_id_idx
  on :KONGTASK_SCHEMA._kongtask_cron_history (job_id) where job_id is not null;
create index _kongtask_cron_history_scheduled_at_idx
  on :KONGTASK_SCHEMA._kongtask_cron_history (scheduled_at);

-- Due minutes that last_execution moved past without anyone scheduling them (a node
-- that does not backfill started after an outage): first_missed <= minute < ended_by.
-- A node that backfills fills them within its fill window, as if last_execution had
-- stayed put.
create table :KONGTASK_SCHEMA._kongtask_cron_gaps (
  identifier text not null,
  first_missed timestamptz not null,
  ended_by timestamptz not null,
  recorded_at timestamptz not null default now(),
  primary key (identifier, first_missed)
);
