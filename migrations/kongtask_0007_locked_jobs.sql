-- The jobs locked now, indexed: the limited claims, `kongtask limits list`
-- and `status` count them per limited key without reading the whole backlog.
-- Only claimed rows have an entry (a job is inserted unlocked and deleted or
-- unlocked when it finishes), so the index stays as small as the fleet's
-- running and buffered jobs plus what vacuum has yet to reclaim.
create index _kongtask_jobs_locked_idx
  on :KONGTASK_SCHEMA._private_jobs using btree (locked_at)
  where (locked_at is not null);
