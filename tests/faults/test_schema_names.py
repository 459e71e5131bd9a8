"""Schema names: what every statement and function body can carry works; the rest is refused.

The refusals are clear ``ConfigurationError``s (or one CLI line) naming the
schema and the reason, raised before anything is written; odd but safe names
(spaces, quotes, mixed case, a lone ``$``, ``$1$``) run a job end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kongtask import ConfigurationError, WorkerUtils
from kongtask.db.conninfo import check_schema_name, resolve_schema
from kongtask.db.migrate import migrate
from kongtask.runner import Runner, run_once
from tests.conftest import to_uri

pytestmark = pytest.mark.faults

REFUSED = {
    "$body$": "'$body$' at position 0, which would end a dollar-quoted function body",
    "a$$b": "'$$' at position 1",
    "x$tag1$y": "'$tag1$' at position 1",
    "$€$": "'$€$' at position 0",
    "50%": "contains '%', which the database driver would read as a parameter placeholder",
    "a%sb": "contains '%'",
    "pg_mine": "starts with 'pg_', which PostgreSQL reserves for system schemas",
    "caf\udce9": "is not valid Unicode text (lone surrogate at position 3)",
    "é" * 32: "is 64 bytes long; PostgreSQL identifiers are at most 63 bytes",
}

SAFE = ['My "Odd" Schema', "Mixed_Case", "a$ $b", "$1$", "price$", "PG_upper", "é" * 31 + "x"]


def _schemas(db: psycopg.Connection[Any]) -> set[str]:
    rows = db.execute("select nspname from pg_namespace").fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize("schema", sorted(REFUSED))
def test_unsafe_schema_names_are_refused_before_anything_is_written(
    schema: str, db_url: str, db: psycopg.Connection[Any]
) -> None:
    expected = REFUSED[schema]
    before = _schemas(db)
    with pytest.raises(ConfigurationError) as raised:
        check_schema_name(schema)
    assert raised.value.name == "schema" and raised.value.value == schema
    assert expected in str(raised.value)
    with pytest.raises(ConfigurationError, match="from GRAPHILE_WORKER_SCHEMA"):
        resolve_schema(environ={"GRAPHILE_WORKER_SCHEMA": schema})
    with pytest.raises(ConfigurationError):
        WorkerUtils(db_url, schema=schema).open()
    with pytest.raises(ConfigurationError):
        Runner(tasks={}, connection_string=db_url, schema=schema)
    with psycopg.connect(db_url, autocommit=True) as conn, pytest.raises(ConfigurationError):
        migrate(conn, schema)
    assert _schemas(db) == before


def test_the_cli_refuses_an_unsafe_schema_in_one_line(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    before = _schemas(db)
    result = subprocess.run(
        [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--schema-only", "-s", "$body$"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ),
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("kongtask: error: schema '$body$' (from schema) contains")
    assert result.stderr.count("\n") == 1, result.stderr
    assert _schemas(db) == before


@pytest.mark.parametrize("schema", SAFE)
def test_odd_but_safe_schema_names_work_end_to_end(
    schema: str, db_url: str, db: psycopg.Connection[Any]
) -> None:
    with WorkerUtils(db_url, schema=schema) as utils:
        utils.add_job("t", {"schema": schema}, queue_name="q", job_key="k")
        utils.add_jobs([{"identifier": "t", "payload": {"n": 2}}])
    seen: list[Any] = []
    run_once(
        tasks={"t": lambda payload, helpers: seen.append(payload)},
        connection_string=db_url,
        schema=schema,
        install_signal_handlers=False,
    )
    assert sorted(seen, key=str) == sorted([{"schema": schema}, {"n": 2}], key=str)
    assert schema in _schemas(db)
    left = db.execute(
        sql.SQL("select count(*) from {}._private_jobs").format(sql.Identifier(schema))
    ).fetchone()
    assert left == (0,)
