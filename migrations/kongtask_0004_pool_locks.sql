-- A pool's liveness lock: the key of the session-level advisory lock the pool
-- holds on a direct connection for as long as its process lives. Another pool
-- that can take the lock (shared, for one statement) knows at once that the
-- holder's session is gone, without waiting for its heartbeat to age. Null for
-- a pool that holds no such lock (behind pgbouncer without a direct
-- connection, or an older kongtask): only its heartbeat judges it.
-- lock_since is when the pool (last) took the lock, by the database's clock: a
-- lock taken before the server last started is gone with that server, not with
-- the pool, so only locks taken since are judged (after a restart every pool
-- takes its lock again and says so at its next heartbeat).
alter table :KONGTASK_SCHEMA._kongtask_pools add column lock_key bigint,
  add column lock_since timestamptz;
