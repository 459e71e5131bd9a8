"""kongtask's pytest plugin: a fresh schema, a ManualClock, Runners and WorkerUtils per test.

Installing kongtask registers it (the ``pytest11`` entry point), so a project's
tests ask for the fixtures by name; ``-p no:kongtask`` turns it off. Every
fixture name starts with ``kongtask_`` so none clashes with a project's own.

The database is the ``kongtask_database_url`` ini option, else the
``KONGTASK_TEST_DATABASE_URL`` environment variable, else an embedded server
(the ``embedded`` extra) started once per session. Each test gets its own
schema there, migrated at the start and dropped at the end, so jobs and cron
state never leak between tests and tests pass in any order, repeatedly.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import psycopg
import pytest

if TYPE_CHECKING:
    from kongtask.runner import Runner
    from kongtask.testing import ManualClock
    from kongtask.worker_utils import WorkerUtils

__all__ = ["KongtaskDatabase", "WorkerFactory"]

_INI_URL = "kongtask_database_url"
_ENV_URL = "KONGTASK_TEST_DATABASE_URL"


@dataclass(frozen=True)
class KongtaskDatabase:
    """Where a test's kongtask lives: a connection string and a schema of its own."""

    url: str
    schema: str


#: ``kongtask_worker(tasks, **options)``: starts a Runner on the test's schema and clock.
WorkerFactory = Callable[..., "Runner"]


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare the ini option naming the test database."""
    parser.addini(
        _INI_URL,
        f"PostgreSQL connection string for kongtask's fixtures (else ${_ENV_URL}, "
        "else an embedded server)",
        default="",
    )


@pytest.fixture(scope="session")
def kongtask_database_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The connection string of the server the kongtask fixtures use (one per session)."""
    url = str(pytestconfig.getini(_INI_URL) or "") or os.environ.get(_ENV_URL, "")
    if url:
        yield url
        return
    from kongtask.db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def kongtask_db(kongtask_database_url: str) -> Iterator[KongtaskDatabase]:
    """A freshly migrated kongtask schema for this test alone, dropped afterwards."""
    from kongtask.db.migrate import migrate
    from kongtask.db.statements import Queries

    schema = f"kongtask_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(kongtask_database_url, autocommit=True) as conn:
        migrate(conn, schema)
    try:
        yield KongtaskDatabase(kongtask_database_url, schema)
    finally:
        with psycopg.connect(kongtask_database_url, autocommit=True) as conn:
            conn.execute(Queries(schema).drop_schema)


@pytest.fixture
def kongtask_clock() -> Iterator[ManualClock]:
    """A ManualClock starting now: time, cron minutes and retries move only on ``advance``."""
    from kongtask.testing import ManualClock

    clock = ManualClock(datetime.now(UTC))
    try:
        yield clock
    finally:
        clock.close()


@pytest.fixture
def kongtask_worker(
    kongtask_db: KongtaskDatabase, kongtask_clock: ManualClock
) -> Iterator[WorkerFactory]:
    """Start Runners bound to the test's schema and clock: ``kongtask_worker(tasks, **options)``.

    Options are :func:`kongtask.run`'s; each Runner is stopped after the test,
    and a fatal error it met fails the test then.
    """
    from kongtask.testing import running

    with ExitStack() as stack:

        def start(tasks: Any, /, **options: Any) -> Runner:
            options.setdefault("connection_string", kongtask_db.url)
            options.setdefault("schema", kongtask_db.schema)
            options.setdefault("clock", kongtask_clock)
            return stack.enter_context(running(tasks=tasks, **options))

        yield start


@pytest.fixture
def kongtask_utils(kongtask_db: KongtaskDatabase) -> Iterator[WorkerUtils]:
    """An open WorkerUtils on the test's schema (closed afterwards)."""
    from kongtask.worker_utils import WorkerUtils

    with WorkerUtils(kongtask_db.url, schema=kongtask_db.schema) as utils:
        yield utils
