"""The kongtask command in a subprocess: migrate, version, flag errors."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg

from kongtask import __version__
from tests.conftest import to_uri


def kongtask(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kongtask", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def migrations(conninfo: str, schema: str = "graphile_worker") -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            psycopg.sql.SQL("select id, breaking from {}.migrations order by id").format(
                psycopg.sql.Identifier(schema)
            )
        ).fetchall()


def test_schema_only_migrates_and_says_so(empty_db_url: str) -> None:
    result = kongtask("-c", to_uri(empty_db_url), "--schema-only")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Schema updated"
    rows = migrations(empty_db_url)
    assert [row[0] for row in rows] == list(range(1, 20))
    assert {row[0] for row in rows if row[1]} == {1, 3, 11, 13, 14, 16, 19}


def test_schema_flag_and_environment(empty_db_url: str) -> None:
    result = kongtask("-c", to_uri(empty_db_url), "-s", "from_flag", "--schema-only")
    assert result.returncode == 0, result.stderr
    env = {"GRAPHILE_WORKER_SCHEMA": "from_env", "DATABASE_URL": to_uri(empty_db_url)}
    result = kongtask("--schema-only", env=env)
    assert result.returncode == 0, result.stderr
    assert len(migrations(empty_db_url, "from_flag")) == 19
    assert len(migrations(empty_db_url, "from_env")) == 19


def test_version() -> None:
    result = kongtask("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kongtask {__version__}"


def test_unknown_flag_is_an_error() -> None:
    result = kongtask("--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_conflicting_flags() -> None:
    result = kongtask("--once", "--schema-only")
    assert result.returncode == 2
    assert "Cannot specify both --once and --schema-only" in result.stderr


def test_bad_number_is_an_error() -> None:
    result = kongtask("-j", "zero")
    assert result.returncode == 2
    assert "--jobs expects an integer" in result.stderr


def test_bad_connection_fails_cleanly_without_traceback() -> None:
    result = kongtask("-c", "postgresql://postgres@127.0.0.1:1/nothing", "--schema-only")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "kongtask: error:" in result.stderr
