"""How kongtask finds its database and schema.

The order follows graphile-worker so both can be pointed at one database the
same way: an explicit connection string, else ``DATABASE_URL``, else the libpq
``PG*`` variables when ``PGDATABASE`` is set. Where graphile-worker gives up,
kongtask starts its embedded PostgreSQL instead (see :mod:`kongtask.db.embedded`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote

import psycopg
from psycopg.conninfo import conninfo_to_dict

from kongtask.errors import ConfigurationError
from kongtask.settings import DEFAULT_SCHEMA

__all__ = [
    "DEFAULT_SCHEMA",
    "MAX_SCHEMA_BYTES",
    "RedactingFilter",
    "RedactingStream",
    "check_schema_name",
    "connection_secrets",
    "describe_conninfo",
    "open_database",
    "redact",
    "resolve_connection_string",
    "resolve_schema",
]

logger = logging.getLogger(__name__)

#: The schema graphile-worker and kongtask use unless told otherwise.
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
    """Return ``schema`` if every statement kongtask runs can carry it, else raise an error.

    The schema always enters SQL as a quoted identifier, which can hold almost
    anything; the rule refuses exactly what it cannot: an empty name, NUL, text
    that is not valid Unicode, more than 63 bytes of UTF-8 (PostgreSQL would
    truncate it), the ``pg_`` prefix (reserved for system schemas), ``%``
    (psycopg reads it as a parameter placeholder in every statement with
    values), and a ``$`` … ``$`` pair that could close a dollar-quoted function
    body (``$$``, ``$body$``, ``$x1$``). Anything else (spaces, quotes, mixed
    case, ``;``, a single ``$``) works. ``source`` says where the name came
    from (the argument, the environment); the error is a ``ConfigurationError``.
    """
    if not isinstance(schema, str):
        raise ConfigurationError(
            f"schema must be a string, not {type(schema).__name__}", name="schema", value=schema
        )
    if not schema:
        raise ConfigurationError("schema must not be empty", name="schema", value=schema)
    problem = _schema_name_problem(schema)
    if problem is not None:
        raise ConfigurationError(
            f"schema {schema!r} (from {source}) {problem}", name="schema", value=schema
        )
    return schema


# What would end a dollar-quoted string whatever its tag: $, an optional tag
# (PostgreSQL's lexer: an ASCII letter, underscore or any non-ASCII character,
# then those or digits), $.
# (Written as ASCII ranges and "anything not ASCII": a class spelled up to U+10FFFF
# takes milliseconds to compile at every start.)
_DOLLAR_QUOTE = re.compile(r"\$(?:(?:[A-Za-z_]|[^\x00-\x7f])(?:[A-Za-z0-9_]|[^\x00-\x7f])*)?\$")


def _schema_name_problem(schema: str) -> str | None:
    """Why ``schema`` cannot be used (the end of a sentence), or None."""
    if "\x00" in schema:
        return "contains a NUL character"
    try:
        size = len(schema.encode("utf-8"))
    except UnicodeEncodeError as exc:
        return f"is not valid Unicode text (lone surrogate at position {exc.start})"
    if size > MAX_SCHEMA_BYTES:
        return f"is {size} bytes long; PostgreSQL identifiers are at most {MAX_SCHEMA_BYTES} bytes"
    if schema.startswith("pg_"):
        return "starts with 'pg_', which PostgreSQL reserves for system schemas"
    if "%" in schema:
        return (
            "contains '%', which the database driver would read as a parameter placeholder "
            "in kongtask's statements"
        )
    match = _DOLLAR_QUOTE.search(schema)
    if match is not None:
        return (
            f"contains {match.group()!r} at position {match.start()}, which would end a "
            "dollar-quoted function body in the schema's migration (two '$' signs with only "
            "letters, digits, underscores or non-ASCII characters between them)"
        )
    return None


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
    :func:`kongtask.db.embedded.default_data_dir`) runs for the duration of the
    ``with`` block and is stopped on exit unless another process still uses it.
    A malformed connection string raises :class:`ConfigurationError` naming its
    source.
    """
    conninfo, source = _resolve(connection_string, environ)
    if conninfo is not None:
        try:
            description = describe_conninfo(conninfo)
        except psycopg.ProgrammingError as exc:
            # libpq's message may quote the string, password included
            # ('invalid percent-encoded token: "s3cret%zz"'): redact it, and
            # do not chain the original, whose text would show in a traceback.
            raise ConfigurationError(
                redact(
                    f"{source} is not a valid PostgreSQL connection string: {str(exc).strip()}",
                    conninfo,
                    environ=environ,
                ),
                name=source,
                value=None,  # the string may hold a password
            ) from None
        # A password with a bare '@' in a URI leaks into the host: redact that too.
        logger.info(
            "using database %s (from %s)", redact(description, conninfo, environ=environ), source
        )
        yield conninfo
        return
    # Imported only when it is used: a worker given a database never needs it.
    from kongtask.db.embedded import EmbeddedPostgres, default_data_dir

    server = EmbeddedPostgres(
        data_dir if data_dir is not None else default_data_dir(environ=environ)
    )
    logger.info(
        "no connection string, DATABASE_URL or PGDATABASE: using the embedded PostgreSQL in %s",
        server.data_dir,
    )
    with server as embedded_conninfo:
        yield embedded_conninfo


# --- keeping passwords out of every message -----------------------------------------

REDACTED = "***"

_URI_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)[^\s/]*@", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(?P<head>\b(?:password|PGPASSWORD)\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|\S+)", re.IGNORECASE
)
# Shorter fragments are replaced only where libpq quotes them ("ab"), so a
# short password does not turn every message into asterisks.
_MIN_BARE_SECRET = 3


def connection_secrets(
    conninfos: Iterable[str | None] = (), *, environ: Mapping[str, str] | None = None
) -> frozenset[str]:
    """Every string that could reveal a password in ``conninfos`` and the environment.

    That is the password each connection string parses to, and also, read
    leniently, what a malformed string would hold as one (libpq echoes parts of
    a string it cannot parse, and a bare ``@`` in a URI password spills the rest
    into the host name), plus ``PGPASSWORD`` and ``DATABASE_URL``'s own.
    """
    env = os.environ if environ is None else environ
    found: set[str] = set()
    for conninfo in [*conninfos, env.get("DATABASE_URL")]:
        if conninfo:
            found.update(_secrets_of(conninfo))
    if env.get("PGPASSWORD"):
        found.add(env["PGPASSWORD"])
    return frozenset(secret for secret in found if secret)


def _secrets_of(conninfo: str) -> set[str]:
    found: set[str] = set()
    try:
        password = conninfo_to_dict(conninfo).get("password")
    except psycopg.Error:
        password = None
    if isinstance(password, str):
        found.add(password)
    if "://" in conninfo:
        rest = conninfo.split("://", 1)[1]
        userinfo = rest[: rest.rfind("@")] if "@" in rest else ""
        if ":" in userinfo:
            raw = userinfo.split(":", 1)[1]
            found.update([raw, unquote(raw), *raw.split("@")])
    for match in re.finditer(r"\bpassword\s*=\s*", conninfo):
        tail = conninfo[match.end() :]
        if tail.startswith("'"):
            end = re.search(r"(?<!\\)'", tail[1:])
            value = tail[1 : end.start() + 1] if end else tail[1:]
            found.add(value)
            found.add(value.replace("\\'", "'").replace("\\\\", "\\"))
        else:
            # Up to the next keyword=: a space in an unquoted password makes libpq
            # complain about (and quote) the words after it.
            value = re.split(r"\s+\w+\s*=", tail, maxsplit=1)[0]
            found.update([value, *value.split()])
    return found


def redact(text: str, *conninfos: str | None, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with every password replaced by ``***``.

    Passwords are recognised by shape (``scheme://user:PASSWORD@``,
    ``password=PASSWORD``, ``PGPASSWORD=PASSWORD``) and by value: the
    :func:`connection_secrets` of ``conninfos`` and of the environment, so that
    a fragment libpq quotes from a malformed string is caught as well.
    """
    return _redact(text, connection_secrets(conninfos, environ=environ))


def _redact(text: str, secrets: Iterable[str]) -> str:
    for secret in _longest_first(secrets):
        if secret not in text:
            continue
        if len(secret) >= _MIN_BARE_SECRET:
            text = text.replace(secret, REDACTED)
        else:
            text = text.replace(f'"{secret}"', f'"{REDACTED}"')
    if "://" in text:
        text = _URI_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", text)
    if "=" in text:
        text = _KEYWORD_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}", text)
    return text


def _longest_first(secrets: Iterable[str]) -> tuple[str, ...]:
    """Longest first, so a secret containing another is replaced whole (kept sorted once)."""
    if isinstance(secrets, tuple):
        return secrets
    return tuple(sorted(secrets, key=len, reverse=True))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message and traceback.

    Install it on a handler (filters on a logger do not reach its children).
    The secrets are read once, from ``conninfos`` and the environment.
    """

    def __init__(
        self, conninfos: Iterable[str | None] = (), *, environ: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self._secrets = _longest_first(connection_secrets(conninfos, environ=environ))

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg, record.args = _redact(message, self._secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = _redact(record.stack_info, self._secrets)
        return True


class RedactingStream:
    """A text stream that redacts what is written before passing it on.

    The CLI wraps ``sys.stdout`` and ``sys.stderr`` in it, so nothing it prints
    (messages, log lines, argparse errors, a library's warnings) carries a
    password. Everything but ``write`` is the wrapped stream's.
    """

    def __init__(self, stream: TextIO, secrets: Iterable[str]) -> None:
        self._stream = stream
        self._secrets = _longest_first(secrets)

    def write(self, text: str) -> int:
        self._stream.write(_redact(text, self._secrets))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
