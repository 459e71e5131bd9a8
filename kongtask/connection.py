"""How kongtask finds its database and schema.

The order follows graphile-worker so both can be pointed at one database the
same way: an explicit connection string, else ``DATABASE_URL``, else the libpq
``PG*`` variables when ``PGDATABASE`` is set. Where graphile-worker gives up,
kongtask starts its embedded PostgreSQL instead (see :mod:`kongtask.embedded`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg.conninfo import conninfo_to_dict

from kongtask.embedded import EmbeddedPostgres, default_data_dir
from kongtask.errors import ConfigurationError

__all__ = [
    "DEFAULT_SCHEMA",
    "MAX_SCHEMA_BYTES",
    "check_schema_name",
    "describe_conninfo",
    "open_database",
    "resolve_connection_string",
    "resolve_schema",
]

logger = logging.getLogger(__name__)

#: The schema graphile-worker and kongtask use unless told otherwise.
DEFAULT_SCHEMA = "graphile_worker"
#: PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
MAX_SCHEMA_BYTES = 63

_SHOWN_KEYS = ("host", "hostaddr", "port", "dbname", "user")


def _resolve(
    connection_string: str | None, environ: Mapping[str, str] | None
) -> tuple[str | None, str]:
    """Return the conninfo (as :func:`resolve_connection_string`) and where it came from."""
    env = os.environ if environ is None else environ
    if connection_string is not None:
        if not isinstance(connection_string, str):
            raise ConfigurationError(
                f"connection_string must be a string, not {type(connection_string).__name__}",
                name="connection_string",
                value=connection_string,
            )
        if not connection_string:
            raise ConfigurationError(
                "connection_string is empty; pass a PostgreSQL URI or conninfo, or None to use "
                "DATABASE_URL, the PG* variables or the embedded server",
                name="connection_string",
                value=connection_string,
            )
        return connection_string, "connection_string"
    # An empty variable counts as unset, as in graphile-worker.
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"], "DATABASE_URL"
    if env.get("PGDATABASE"):
        return "", "PGDATABASE"
    return None, "embedded"


def resolve_connection_string(
    connection_string: str | None = None, *, environ: Mapping[str, str] | None = None
) -> str | None:
    """Decide which database to use without connecting.

    Returns the explicit argument, else ``DATABASE_URL``, else ``""`` (libpq
    reads the ``PG*`` variables) when ``PGDATABASE`` is set, else ``None``,
    meaning "start the embedded server". ``environ`` defaults to ``os.environ``.
    """
    return _resolve(connection_string, environ)[0]


def resolve_schema(schema: str | None = None, *, environ: Mapping[str, str] | None = None) -> str:
    """Return the schema to use: the argument, else ``GRAPHILE_WORKER_SCHEMA``, else the default.

    The name must be non-empty, free of NUL and at most 63 bytes of UTF-8, since
    PostgreSQL would silently truncate a longer one and two workers would then
    disagree about where the jobs are.
    """
    env = os.environ if environ is None else environ
    source = "schema"
    if schema is None:
        schema = env.get("GRAPHILE_WORKER_SCHEMA") or DEFAULT_SCHEMA
        source = "GRAPHILE_WORKER_SCHEMA" if env.get("GRAPHILE_WORKER_SCHEMA") else "default"
    return check_schema_name(schema, source)


def check_schema_name(schema: object, source: str = "schema") -> str:
    """Return ``schema`` if it can name a PostgreSQL schema, else raise ``ConfigurationError``.

    ``source`` says where the name came from (the argument, the environment).
    """
    if not isinstance(schema, str):
        raise ConfigurationError(
            f"schema must be a string, not {type(schema).__name__}", name="schema", value=schema
        )
    if not schema:
        raise ConfigurationError("schema must not be empty", name="schema", value=schema)
    if "\x00" in schema:
        raise ConfigurationError(
            f"schema {schema!r} (from {source}) contains a NUL character",
            name="schema",
            value=schema,
        )
    size = len(schema.encode("utf-8"))
    if size > MAX_SCHEMA_BYTES:
        raise ConfigurationError(
            f"schema {schema!r} (from {source}) is {size} bytes long; PostgreSQL identifiers "
            f"are at most {MAX_SCHEMA_BYTES} bytes",
            name="schema",
            value=schema,
        )
    return schema


def describe_conninfo(conninfo: str) -> str:
    """A loggable description of a conninfo or URI: host, port, database and user, never a password.

    An empty conninfo means libpq's defaults from the ``PG*`` variables.
    """
    if not conninfo:
        return "libpq defaults (PG* environment variables)"
    params = conninfo_to_dict(conninfo)
    shown = [f"{key}={params[key]}" for key in _SHOWN_KEYS if params.get(key) not in (None, "")]
    return " ".join(shown) if shown else "libpq defaults"


@contextmanager
def open_database(
    connection_string: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    data_dir: Path | None = None,
) -> Iterator[str]:
    """Yield a conninfo string to connect to, starting the embedded server if need be.

    When nothing is configured the embedded PostgreSQL (in ``data_dir``, else
    :func:`kongtask.embedded.default_data_dir`) runs for the duration of the
    ``with`` block and is stopped on exit unless another process still uses it.
    A malformed connection string raises :class:`ConfigurationError` naming its
    source.
    """
    conninfo, source = _resolve(connection_string, environ)
    if conninfo is not None:
        try:
            description = describe_conninfo(conninfo)
        except psycopg.ProgrammingError as exc:
            # The message from libpq never repeats the password-bearing string.
            raise ConfigurationError(
                f"{source} is not a valid PostgreSQL connection string: {exc}",
                name=source,
                value=None,  # the string may hold a password
            ) from exc
        logger.info("using database %s (from %s)", description, source)
        yield conninfo
        return
    server = EmbeddedPostgres(
        data_dir if data_dir is not None else default_data_dir(environ=environ)
    )
    logger.info(
        "no connection string, DATABASE_URL or PGDATABASE: using the embedded PostgreSQL in %s",
        server.data_dir,
    )
    with server as embedded_conninfo:
        yield embedded_conninfo
