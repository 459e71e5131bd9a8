"""The timeouts kongtask adds to every connection string, and where the user's own win."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from kongtask.db.connecting import guarded_conninfo, prepare_threshold
from kongtask.settings import ConnectionSettings


def test_timeouts_and_keepalives_are_added() -> None:
    params = conninfo_to_dict(guarded_conninfo("host=db dbname=app", ConnectionSettings()))
    assert params["connect_timeout"] == "10"
    assert params["keepalives"] == "1"
    assert (params["keepalives_idle"], params["keepalives_interval"]) == ("10", "5")
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "30000"
    assert (params["host"], params["dbname"]) == ("db", "app")


def test_values_in_the_connection_string_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    url = "postgresql://u:pw@db/app?connect_timeout=3&keepalives_idle=99&tcp_user_timeout=0"
    params = conninfo_to_dict(guarded_conninfo(url, ConnectionSettings(connect_timeout_s=20)))
    assert (params["connect_timeout"], params["keepalives_idle"]) == ("3", "99")
    assert params["tcp_user_timeout"] == "0"
    assert params["password"] == "pw"


def test_the_environment_connect_timeout_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "7")
    params = conninfo_to_dict(guarded_conninfo("", ConnectionSettings()))
    assert "connect_timeout" not in params


def test_extra_parameters_always_apply() -> None:
    conninfo = "host=db application_name=mine"
    guarded = guarded_conninfo(conninfo, ConnectionSettings(), application_name="p")
    params = conninfo_to_dict(guarded)
    assert params["application_name"] == "p"


def test_a_fractional_connect_timeout_rounds_up() -> None:
    guarded = guarded_conninfo("host=db", ConnectionSettings(connect_timeout_s=2.2))
    params = conninfo_to_dict(guarded)
    assert params["connect_timeout"] == "3"


def test_pgbouncer_turns_prepared_statements_off() -> None:
    assert prepare_threshold(ConnectionSettings()) == 0
    assert prepare_threshold(ConnectionSettings(), prepared_statements=False) is None
    assert prepare_threshold(ConnectionSettings(pgbouncer=True)) is None
