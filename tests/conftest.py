"""Shared fixtures: a PostgreSQL server, a migrated template, a fresh database per test.

The server is ``KONGTASK_TEST_DATABASE_URL`` or ``DATABASE_URL`` when set,
otherwise the embedded server (the ``embedded`` extra) in its default data
folder. Every integration test gets its own database cloned from a template
that was migrated once per session, so tests never see each other's rows.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

DEFAULT_SCHEMA = "graphile_worker"
REPO = Path(__file__).resolve().parents[1]


def load_catalog_tool() -> ModuleType:
    """Import ``tools/catalog.py`` (tools/ is not a package), once per process."""
    name = "kongtask_tools_catalog"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / "catalog.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def to_uri(conninfo: str) -> str:
    """Render a conninfo as a ``postgresql://`` URI (Node's client only reads URIs)."""
    params = conninfo_to_dict(conninfo)
    user = quote(str(params.pop("user", "postgres")), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(str(password), safe='')}@" if password else f"{user}@"
    host = str(params.pop("host", ""))
    port = params.pop("port", None)
    dbname = quote(str(params.pop("dbname", "postgres")), safe="")
    query = []
    if host.startswith("/"):
        query.append(f"host={quote(host, safe='')}")
        host = ""
    location = f"{host}:{port}" if host and port else host
    if not host and port:
        query.append(f"port={port}")
    query += [f"{key}={quote(str(value), safe='')}" for key, value in params.items()]
    suffix = "?" + "&".join(query) if query else ""
    return f"postgresql://{auth}{location}/{dbname}{suffix}"


class DatabaseFactory:
    """Creates (and later drops) databases on the test server."""

    def __init__(self, server_conninfo: str) -> None:
        self.server_conninfo = server_conninfo
        self._created: list[str] = []

    def conninfo(self, dbname: str) -> str:
        return make_conninfo(self.server_conninfo, dbname=dbname)

    def create(self, *, template: str | None = None, prefix: str = "kt") -> str:
        """Create a database (optionally from ``template``) and return its conninfo."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        statement = sql.SQL("create database {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" template {}").format(sql.Identifier(template))
        with psycopg.connect(self.server_conninfo, autocommit=True) as conn:
            conn.execute(statement)
        self._created.append(name)
        return self.conninfo(name)

    def drop(self, conninfo: str) -> None:
        name = conninfo_to_dict(conninfo)["dbname"]
        with psycopg.connect(self.server_conninfo, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )
        if name in self._created:
            self._created.remove(name)

    def drop_all(self) -> None:
        for name in list(self._created):
            self.drop(self.conninfo(name))


@pytest.fixture(scope="session")
def server_conninfo() -> Iterator[str]:
    """A conninfo for the test server's maintenance database."""
    url = os.environ.get("KONGTASK_TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    from kongtask.db.embedded import EmbeddedPostgres

    server = EmbeddedPostgres()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def databases(server_conninfo: str) -> Iterator[DatabaseFactory]:
    """Creates databases on the test server and drops them all at the end."""
    factory = DatabaseFactory(server_conninfo)
    try:
        yield factory
    finally:
        factory.drop_all()


@pytest.fixture(scope="session")
def template_db(databases: DatabaseFactory) -> str:
    """The name of a database migrated once (default schema), used as a template."""
    from kongtask.db.migrate import migrate

    conninfo = databases.create(prefix="kt_template")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        migrate(conn, DEFAULT_SCHEMA)
    return str(conninfo_to_dict(conninfo)["dbname"])


@pytest.fixture
def db_url(databases: DatabaseFactory, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone (its conninfo)."""
    conninfo = databases.create(template=template_db)
    try:
        yield conninfo
    finally:
        databases.drop(conninfo)


@pytest.fixture
def empty_db_url(databases: DatabaseFactory) -> Iterator[str]:
    """A fresh database with no kongtask schema at all."""
    conninfo = databases.create()
    try:
        yield conninfo
    finally:
        databases.drop(conninfo)


@pytest.fixture
def db(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to this test's fresh database."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        yield conn


#: Environment variables that change what kongtask does (connection, schema,
#: logging): a developer's shell must not change a test's outcome.
_AMBIENT_VARIABLES = (
    "DATABASE_URL",
    "GRAPHILE_WORKER_SCHEMA",
    "NO_LOG_SUCCESS",
    "GRAPHILE_LOGGER_DEBUG",
    "KONGTASK_DEBUG",
    "KONGTASK_LOG_FORMAT",
    "KONGTASK_DATA_DIR",
)


#: The loggers ``kongtask.ops.logs.configure`` (the CLI's log set-up) takes over.
_CONFIGURED_LOGGERS = ("kongtask", "psycopg", "py.warnings")


@pytest.fixture(autouse=True)
def _restore_loggers() -> Iterator[None]:
    """Undo a test's in-process CLI log set-up: its handler writes to that test's captured
    stream, closed once the test ends ("--- Logging error ---" for every later record), and
    it stops kongtask's records from reaching the root logger (and caplog)."""
    saved = []
    for name in _CONFIGURED_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear kongtask's and libpq's variables for every test (tests set what they need)."""
    for name in _AMBIENT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("PG"):
            monkeypatch.delenv(name, raising=False)
