-- How many executor threads of a pool are stuck in a handler that ran past its
-- timeout (its slot was given to a new thread); written with each heartbeat and
-- shown by `kongtask status`.
alter table :KONGTASK_SCHEMA._kongtask_pools
  add column stuck_threads int not null default 0;
