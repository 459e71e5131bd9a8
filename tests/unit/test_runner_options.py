"""The Runner's options: typed settings objects, unknown options refused by name, and
one connection-string rule for Runner, Scheduler and WorkerUtils."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api

import kongtask
from kongtask import (
    ConfigurationError,
    ConnectionSettings,
    OpsSettings,
    Runner,
    Scheduler,
    WorkerSettings,
    WorkerUtils,
)
from kongtask.runner import RUNNER_OPTIONS
from kongtask.testing import running

ROOT = Path(__file__).resolve().parents[2]
TASKS = {"noop": lambda payload, helpers: None}


def _enter_running(**options: Any) -> None:
    with running(**options):
        pass


STARTERS: list[Callable[..., Any]] = [Runner, kongtask.run, kongtask.run_once, _enter_running]


@pytest.mark.parametrize("start", STARTERS)
def test_an_unknown_option_is_refused_by_name_with_close_matches(start: Callable[..., Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        start(tasks=TASKS, concurency=2)
    assert info.value.name == "concurency"
    assert str(info.value) == "unknown option 'concurency'; did you mean concurrency?"


def test_an_option_like_no_other_lists_them_all() -> None:
    with pytest.raises(ConfigurationError) as info:
        Runner(tasks=TASKS, zzz=1)
    assert info.value.name == "zzz"
    assert "the options are" in str(info.value)
    assert "concurrency" in str(info.value) and "metrics_port" in str(info.value)


def test_missing_tasks_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        Runner(concurrency=2)  # type: ignore[call-arg]
    assert info.value.name == "tasks"


def test_every_settings_field_is_an_option() -> None:
    for kind in (WorkerSettings, ConnectionSettings, OpsSettings):
        assert {f.name for f in fields(kind)} <= RUNNER_OPTIONS, kind.__name__


def test_the_settings_objects_configure_the_runner() -> None:
    runner = Runner(
        tasks=TASKS,
        settings=WorkerSettings(concurrency=3, schema="app_jobs"),
        connection=ConnectionSettings(pgbouncer=True, statement_timeout_s=4.0),
        ops=OpsSettings(metrics_port=0, metrics_host="0.0.0.0"),
    )
    assert (runner.settings.concurrency, runner.settings.schema) == (3, "app_jobs")
    assert runner.settings.connection == ConnectionSettings(pgbouncer=True, statement_timeout_s=4.0)
    assert runner.ops_settings == OpsSettings(metrics_port=0, metrics_host="0.0.0.0")


def test_the_keyword_options_build_the_same_settings() -> None:
    runner = Runner(
        tasks=TASKS,
        concurrency=3,
        schema="app_jobs",
        pgbouncer=True,
        statement_timeout_s=4.0,
        metrics_port=0,
        metrics_host="0.0.0.0",
    )
    assert runner.settings == WorkerSettings(
        concurrency=3,
        schema="app_jobs",
        connection=ConnectionSettings(pgbouncer=True, statement_timeout_s=4.0),
    )
    assert runner.ops_settings == OpsSettings(metrics_port=0, metrics_host="0.0.0.0")


def test_connection_keywords_complete_a_settings_object_without_connection() -> None:
    runner = Runner(tasks=TASKS, settings=WorkerSettings(concurrency=2), pgbouncer=True)
    assert runner.settings.concurrency == 2
    assert runner.settings.connection.pgbouncer is True


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"settings": WorkerSettings(), "concurrency": 2}, "concurrency"),
        ({"connection": ConnectionSettings(), "pgbouncer": True}, "pgbouncer"),
        ({"ops": OpsSettings(), "metrics_port": 0}, "metrics_port"),
        (
            {
                "settings": WorkerSettings(connection=ConnectionSettings(pgbouncer=True)),
                "connection": ConnectionSettings(connect_timeout_s=3),
            },
            "connection",
        ),
        ({"settings": {"concurrency": 2}}, "settings"),
        ({"connection": WorkerSettings()}, "connection"),
        ({"ops": None, "metrics_port": "9400"}, "metrics_port"),
    ],
)
def test_a_setting_given_twice_or_of_the_wrong_kind_is_refused(
    options: dict[str, Any], name: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Runner(tasks=TASKS, **options)
    assert info.value.name == name
    assert name in str(info.value)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"metrics_port": 70000}, "metrics_port"),
        ({"metrics_port": True}, "metrics_port"),
        ({"metrics_host": ""}, "metrics_host"),
        ({"metrics_host": 5}, "metrics_host"),
    ],
)
def test_bad_ops_settings_name_the_parameter(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        OpsSettings(**options)
    assert info.value.name == name
    assert name in str(info.value)


def test_the_default_schema_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHILE_WORKER_SCHEMA", "from_env")
    assert WorkerSettings().schema == "from_env"
    assert Runner(tasks=TASKS).settings.schema == "from_env"
    assert Runner(tasks=TASKS, schema=None).settings.schema == "from_env"
    assert WorkerSettings(schema="mine").schema == "mine"


def test_a_schema_postgresql_cannot_carry_is_refused_by_the_settings() -> None:
    with pytest.raises(ConfigurationError) as info:
        WorkerSettings(schema="x$$y")
    assert info.value.name == "schema"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Runner(tasks=TASKS, connection_string=5), "a string or None"),
        (lambda: Scheduler(connection_string=5), "a string or None"),
        (lambda: WorkerUtils(5), "a string, a psycopg.Connection or None"),  # type: ignore[arg-type]
    ],
)
def test_one_connection_string_rule(make: Callable[[], Any], expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        make()
    assert str(info.value) == f"connection_string must be {expected}, got int"
    assert info.value.name == "connection_string"


def test_an_empty_listen_connection_string_is_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        Runner(tasks=TASKS, listen_connection_string="")
    assert str(info.value) == (
        "listen_connection_string must be a non-empty connection string or None, "
        "got an empty string"
    )


def test_mypy_flags_every_bad_call() -> None:
    """Every option is typed: mypy refuses exactly the lines marked ``refused``."""
    path = ROOT / "tests" / "typecheck" / "bad_runner_options.py"
    lines = path.read_text().splitlines()
    marked = {number for number, line in enumerate(lines, 1) if "# refused" in line}
    # mypy raises the interpreter's recursion limit and leaves it raised, which
    # would change what later tests in this process can decode.
    limit = sys.getrecursionlimit()
    try:
        out, err, _ = mypy_api.run(
            [str(path), "--config-file", str(ROOT / "pyproject.toml"), "--no-error-summary"]
        )
    finally:
        sys.setrecursionlimit(limit)
    flagged = {int(m) for m in re.findall(r"bad_runner_options\.py:(\d+): error", out)}
    assert marked and flagged == marked, out + err
    assert 'Unexpected keyword argument "concurency"' in out
