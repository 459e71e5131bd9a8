"""WorkerSettings validates every option and names the parameter at fault."""

from __future__ import annotations

from typing import Any

import pytest

from kongtask.errors import ConfigurationError
from kongtask.settings import ConnectionSettings, WorkerSettings, default_local_queue_size


def test_defaults_follow_graphile_worker() -> None:
    settings = WorkerSettings()
    assert settings.schema == "graphile_worker"
    assert settings.concurrency == 1
    assert settings.poll_interval_s == 2.0
    assert settings.max_pool_size == 10
    assert settings.graceful_shutdown_abort_timeout_s == 5.0
    assert settings.local_queue_ttl_s == 300.0
    assert (settings.min_reset_locked_interval_s, settings.max_reset_locked_interval_s) == (
        480,
        600,
    )
    assert settings.lock_expiry == "4 hours"
    assert settings.local_queue_size == default_local_queue_size(1) == 16


def test_local_queue_default_scales_with_concurrency() -> None:
    assert WorkerSettings(concurrency=24).local_queue_size == 96
    assert WorkerSettings(concurrency=24, local_queue_size=500).batch_size == 500


def test_forbidden_flags_become_a_tuple() -> None:
    assert WorkerSettings(forbidden_flags=["a", "b"]).forbidden_flags == ("a", "b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("concurrency", 0),
        ("concurrency", 1.5),
        ("concurrency", True),
        ("poll_interval_s", 0),
        ("poll_interval_s", float("nan")),
        ("poll_interval_s", "2"),
        ("max_pool_size", 2),
        ("prepared_statements", "yes"),
        ("graceful_shutdown_abort_timeout_s", -1),
        ("install_signal_handlers", 1),
        ("local_queue_size", 0),
        ("local_queue_ttl_s", float("inf")),
        ("size_claims", "no"),
        ("forbidden_flags", "flag"),
        ("forbidden_flags", ["ok", ""]),
        ("schema", ""),
        ("schema", "x" * 64),
        ("lock_expiry", "4 hours; drop table x"),
        ("min_reset_locked_interval_s", 0),
    ],
)
def test_bad_values_name_the_parameter(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerSettings(**{name: value})
    assert info.value.name == name
    assert name in str(info.value)


def test_reset_interval_bounds_must_be_ordered() -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerSettings(min_reset_locked_interval_s=10, max_reset_locked_interval_s=5)
    assert info.value.name == "max_reset_locked_interval_s"


def test_settings_are_frozen() -> None:
    settings = WorkerSettings()
    with pytest.raises(AttributeError):
        settings.concurrency = 2  # type: ignore[misc]


def test_liveness_and_timeout_defaults() -> None:
    settings = WorkerSettings()
    assert (settings.heartbeat_interval_s, settings.pool_dead_after_s) == (10.0, 60.0)
    assert settings.dead_pool_check_interval_s == 2.0
    assert WorkerSettings(dead_pool_check_interval_s=None).dead_pool_check_interval_s is None
    assert settings.crash_quarantine_after == 3
    assert settings.vacuum_after_dead_rows == 50_000
    assert WorkerSettings(vacuum_after_dead_rows=None).vacuum_after_dead_rows is None
    connection = settings.connection
    assert connection == ConnectionSettings()
    assert (connection.connect_timeout_s, connection.statement_timeout_s) == (10.0, 30.0)
    assert (connection.keepalives_idle_s, connection.keepalives_interval_s) == (10, 5)
    assert (connection.keepalives_count, connection.tcp_user_timeout_s) == (3, 30.0)
    assert connection.pgbouncer is False and settings.pgbouncer is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("heartbeat_interval_s", 0),
        ("pool_dead_after_s", float("nan")),
        ("crash_quarantine_after", 0),
        ("crash_quarantine_after", 2.5),
        ("vacuum_after_dead_rows", 999),
        ("vacuum_after_dead_rows", 1e5),
        ("vacuum_after_dead_rows", 0),
        ("dead_pool_check_interval_s", 0),
        ("dead_pool_check_interval_s", "2"),
    ],
)
def test_bad_liveness_values_name_the_parameter(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerSettings(**{name: value})
    assert info.value.name == name


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("connect_timeout_s", 0),
        ("statement_timeout_s", -1),
        ("keepalives_idle_s", 0),
        ("keepalives_interval_s", 1.5),
        ("keepalives_count", "3"),
        ("tcp_user_timeout_s", float("inf")),
        ("pgbouncer", "yes"),
    ],
)
def test_bad_connection_values_name_the_parameter(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        ConnectionSettings(**{name: value})
    assert info.value.name == name


def test_a_dead_pool_bound_under_two_heartbeats_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerSettings(heartbeat_interval_s=10, pool_dead_after_s=15)
    assert info.value.name == "pool_dead_after_s"
    assert "twice" in str(info.value)
