"""The validated options of one worker, as frozen dataclasses.

:class:`WorkerSettings` (the pool), :class:`ConnectionSettings` (how every
connection is guarded) and :class:`OpsSettings` (the ops server). Every option
is checked here, with a message naming the parameter, so the Runner can trust
its settings and a bad value fails before anything starts.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kongtask.errors import ConfigurationError
from kongtask.validate import check_bool, check_int, check_seconds, check_text

__all__ = [
    "DEFAULT_SCHEMA",
    "VACUUM_DEAD_ROWS",
    "ConnectionSettings",
    "OpsSettings",
    "WorkerSettings",
    "default_local_queue_size",
]

DEFAULT_SCHEMA = "graphile_worker"

#: The range ``vacuum_after_dead_rows`` may take (``None`` aside): fewer than 1,000 dead rows
#: never slow a claim enough to vacuum for.
VACUUM_DEAD_ROWS = (1_000, 1_000_000_000)

# A lock expiry as PostgreSQL understands it, e.g. "4 hours" or "90 seconds".
_INTERVAL_RE = re.compile(
    r"^\s*\d+(\.\d+)?\s*(microseconds?|milliseconds?|seconds?|minutes?|hours?|days?|"
    r"ms|s|min|h|d)\s*$"
)


def default_local_queue_size(concurrency: int) -> int:
    """The local buffer size used when none is given: ``max(4 * concurrency, 16)``.

    Four jobs per executor keep every executor fed while the next claim is in
    flight (one claim round trip costs about as much as a handful of no-op
    jobs), and the floor of 16 amortises the claim statement at low
    concurrency. It stays small on purpose: buffered jobs are locked to this
    pool, so a large buffer hoards work other workers could run.
    """
    return max(4 * concurrency, 16)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionSettings:
    """How every connection kongtask opens guards against a network that stops answering.

    ``connect_timeout_s`` bounds opening a connection (libpq's own default is
    none, psycopg's 130 s; libpq rounds it up to whole seconds, at least 2).
    ``statement_timeout_s`` bounds every wait for the server's answer to
    kongtask's own statements: it is enforced by the client (a silent path
    never delivers a server-side timeout, and pgbouncer refuses
    ``options=-c statement_timeout=...``), and the connection is then
    cancelled and closed so the caller retries on a fresh one. The TCP
    settings make the kernel notice a peer that vanished (keepalive probes
    after ``keepalives_idle_s`` of silence, every ``keepalives_interval_s``,
    ``keepalives_count`` of them; ``tcp_user_timeout_s`` for data sent but
    never acknowledged). A value already present in the connection string wins.
    ``pgbouncer`` turns prepared statements off (transaction pooling cannot
    carry them).
    """

    connect_timeout_s: float = 10.0
    statement_timeout_s: float | None = 30.0
    keepalives_idle_s: int = 10
    keepalives_interval_s: int = 5
    keepalives_count: int = 3
    tcp_user_timeout_s: float = 30.0
    pgbouncer: bool = False

    def __post_init__(self) -> None:
        check_seconds("connect_timeout_s", self.connect_timeout_s, allow_minimum=False)
        if self.statement_timeout_s is not None:
            check_seconds("statement_timeout_s", self.statement_timeout_s, allow_minimum=False)
        check_int("keepalives_idle_s", self.keepalives_idle_s, 1, 86_400)
        check_int("keepalives_interval_s", self.keepalives_interval_s, 1, 86_400)
        check_int("keepalives_count", self.keepalives_count, 1, 1_000)
        check_seconds("tcp_user_timeout_s", self.tcp_user_timeout_s, allow_minimum=True)
        check_bool("pgbouncer", self.pgbouncer)


def _default_schema() -> str:
    """``GRAPHILE_WORKER_SCHEMA`` if set, else :data:`DEFAULT_SCHEMA` (read at construction)."""
    # Imported here: kongtask.db.conninfo imports DEFAULT_SCHEMA from this module.
    from kongtask.db.conninfo import resolve_schema

    return resolve_schema()


def _check_schema(schema: object) -> None:
    """The schema rule of :func:`kongtask.db.conninfo.check_schema_name`."""
    from kongtask.db.conninfo import check_schema_name

    check_schema_name(schema)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsSettings:
    """The Runner's ops server: ``/metrics``, ``/healthz`` and ``/readyz``.

    Served on ``metrics_host:metrics_port`` when ``metrics_port`` is set (``0``
    picks a free port); ``None`` serves nothing. The server needs the
    ``prometheus_client`` package (``pip install 'kongtask[metrics]'``).
    """

    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        port = self.metrics_port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535
        ):
            raise ConfigurationError(
                f"metrics_port must be a TCP port number (0-65535) or None, got {port!r}",
                name="metrics_port",
                value=port,
            )
        if port is not None and importlib.util.find_spec("prometheus_client") is None:
            raise ConfigurationError(
                "metrics_port needs the prometheus_client package: pip install 'kongtask[metrics]'",
                name="metrics_port",
                value=port,
            )
        check_text("metrics_host", self.metrics_host, max_length=253)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSettings:
    """What a Runner needs to know besides its tasks and its database.

    Durations are in seconds (``_s``). ``schema`` defaults to
    ``GRAPHILE_WORKER_SCHEMA``, else ``graphile_worker``. ``lock_expiry`` is a
    PostgreSQL interval (``"4 hours"`` like graphile-worker); it is
    configurable so tests can exercise the stale-lock sweep.
    """

    schema: str = field(default_factory=_default_schema)
    concurrency: int = 1
    poll_interval_s: float = 2.0
    forbidden_flags: tuple[str, ...] | None = None
    max_pool_size: int = 10
    prepared_statements: bool = True
    graceful_shutdown_abort_timeout_s: float = 5.0
    install_signal_handlers: bool | None = None
    local_queue_size: int | None = None
    local_queue_ttl_s: float = 300.0
    #: Size each claim from the idle slots and the handlers' measured run time, so a pool
    #: of slow jobs leaves work for pools with free slots (see the performance guide's
    #: claim sizing). ``False``: every claim fills the local queue, as a lone worker
    #: draining quick jobs may prefer.
    size_claims: bool = True
    min_reset_locked_interval_s: float = 480.0
    max_reset_locked_interval_s: float = 600.0
    lock_expiry: str = "4 hours"
    once: bool = False
    #: How often the pool writes its liveness heartbeat and checks for dead pools.
    heartbeat_interval_s: float = 10.0
    #: A kongtask pool whose heartbeat is older than this is dead: its locks are released.
    pool_dead_after_s: float = 60.0
    #: How often the pool checks whether another pool's liveness lock is gone (its process
    #: died). ``None``: the pool holds no liveness lock and checks none; only heartbeats count.
    dead_pool_check_interval_s: float | None = 2.0
    #: A job that killed its worker this many times (running as a suspect) is failed for good.
    crash_quarantine_after: int = 3
    #: Vacuum the jobs table from the worker once it holds this many dead rows (and at least
    #: a fifth of its live ones): autovacuum has then fallen far behind, and every claim walks
    #: the dead rows' index entries. ``None``: leave it to autovacuum.
    vacuum_after_dead_rows: int | None = 50_000
    #: How long one attempt of a task may run (seconds; ``None``: no limit). A task's
    #: own ``timeout_s`` (``@kongtask.task(timeout_s=...)``) wins over this default.
    timeout_s: float | None = None
    #: Timeouts, TCP keepalives and pgbouncer mode of every connection the pool opens.
    connection: ConnectionSettings = field(default_factory=lambda: ConnectionSettings())

    def __post_init__(self) -> None:
        _check_schema(self.schema)
        check_int("concurrency", self.concurrency, 1, 10_000)
        check_seconds("poll_interval_s", self.poll_interval_s, allow_minimum=False)
        if self.forbidden_flags is not None:
            flags = _as_flags(self.forbidden_flags)
            object.__setattr__(self, "forbidden_flags", flags)
        check_int("max_pool_size", self.max_pool_size, 3, 10_000)
        check_bool("prepared_statements", self.prepared_statements)
        check_seconds(
            "graceful_shutdown_abort_timeout_s",
            self.graceful_shutdown_abort_timeout_s,
            allow_minimum=True,
        )
        if self.install_signal_handlers is not None:
            check_bool("install_signal_handlers", self.install_signal_handlers)
        if self.local_queue_size is None:
            object.__setattr__(self, "local_queue_size", default_local_queue_size(self.concurrency))
        else:
            check_int("local_queue_size", self.local_queue_size, 1, 100_000)
        check_seconds("local_queue_ttl_s", self.local_queue_ttl_s, allow_minimum=False)
        check_bool("size_claims", self.size_claims)
        check_seconds(
            "min_reset_locked_interval_s", self.min_reset_locked_interval_s, allow_minimum=False
        )
        check_seconds(
            "max_reset_locked_interval_s", self.max_reset_locked_interval_s, allow_minimum=False
        )
        if self.max_reset_locked_interval_s < self.min_reset_locked_interval_s:
            raise ConfigurationError(
                f"max_reset_locked_interval_s ({self.max_reset_locked_interval_s}) must not be "
                f"smaller than min_reset_locked_interval_s ({self.min_reset_locked_interval_s})",
                name="max_reset_locked_interval_s",
                value=self.max_reset_locked_interval_s,
            )
        if not isinstance(self.lock_expiry, str) or not _INTERVAL_RE.match(self.lock_expiry):
            raise ConfigurationError(
                f"lock_expiry must be an interval such as '4 hours' or '30 seconds', "
                f"got {self.lock_expiry!r}",
                name="lock_expiry",
                value=self.lock_expiry,
            )
        check_bool("once", self.once)
        check_seconds("heartbeat_interval_s", self.heartbeat_interval_s, allow_minimum=False)
        check_seconds("pool_dead_after_s", self.pool_dead_after_s, allow_minimum=False)
        if self.pool_dead_after_s < 2 * self.heartbeat_interval_s:
            raise ConfigurationError(
                f"pool_dead_after_s ({self.pool_dead_after_s}) must be at least twice "
                f"heartbeat_interval_s ({self.heartbeat_interval_s}), or one late heartbeat "
                "would make a live pool look dead",
                name="pool_dead_after_s",
                value=self.pool_dead_after_s,
            )
        if self.dead_pool_check_interval_s is not None:
            check_seconds(
                "dead_pool_check_interval_s", self.dead_pool_check_interval_s, allow_minimum=False
            )
        check_int("crash_quarantine_after", self.crash_quarantine_after, 1, 1_000)
        if self.vacuum_after_dead_rows is not None:
            check_int("vacuum_after_dead_rows", self.vacuum_after_dead_rows, *VACUUM_DEAD_ROWS)
        if self.timeout_s is not None:
            check_seconds("timeout_s", self.timeout_s, allow_minimum=False)
        if not isinstance(self.connection, ConnectionSettings):
            raise ConfigurationError(
                f"connection must be a ConnectionSettings, got {self.connection!r}",
                name="connection",
                value=self.connection,
            )

    @property
    def statement_timeout_s(self) -> float | None:
        """The deadline on kongtask's own statements (see :class:`ConnectionSettings`)."""
        return self.connection.statement_timeout_s

    @property
    def pgbouncer(self) -> bool:
        """True when the connection goes through pgbouncer in transaction pooling."""
        return self.connection.pgbouncer

    @property
    def batch_size(self) -> int:
        """How many jobs one claim statement asks for at most."""
        assert self.local_queue_size is not None  # set in __post_init__
        return self.local_queue_size


def _as_flags(value: Any) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence | set | frozenset):
        raise ConfigurationError(
            f"forbidden_flags must be a list of strings, got {value!r}",
            name="forbidden_flags",
            value=value,
        )
    flags = tuple(value)
    for flag in flags:
        if not isinstance(flag, str) or not flag:
            raise ConfigurationError(
                f"forbidden_flags must hold non-empty strings, got {flag!r}",
                name="forbidden_flags",
                value=value,
            )
    return flags
