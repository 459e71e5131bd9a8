"""Every statement kongtask runs at run time, loaded from the named files in ``sql/``.

Each file (``jobs.sql``, ``pools.sql``, ``cron.sql``, ``ops.sql``) holds
statements headed ``-- name: <name>`` and shared fragments headed
``-- fragment: <name>``, each followed by comment lines that explain it, then
its body. Bodies name the schema as ``{s}`` and include a fragment as
``{<name>}``; values only ever travel as psycopg parameters. :class:`Queries`
composes a statement once per schema with :class:`psycopg.sql.Identifier`, so
the schema name is always quoted; a body's literal braces are doubled.

The statements follow graphile-worker 0.17.3's effects on the database (see
the module docstrings of their callers), so Python and Node workers can share
one queue.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType

from psycopg import sql

__all__ = ["CRON_ITEMS_CHANNEL", "LOCK_EXPIRY", "SQL_FILES", "Queries", "Templates", "templates"]

#: A lock older than this is considered abandoned by a crashed worker.
LOCK_EXPIRY = "4 hours"

#: The channel on which stored cron item changes are announced (payload: schema).
CRON_ITEMS_CHANNEL = "kongtask:cron_items"

#: The statement files, inside this package's ``sql`` folder.
SQL_FILES = ("jobs.sql", "pools.sql", "cron.sql", "ops.sql", "limits.sql")

_HEADER = re.compile(r"--\s*(name|fragment):\s*(\S*)\s*$")
_NAME = re.compile(r"[a-z][a-z0-9_]+")  # not "s", the schema


@dataclass(frozen=True)
class Templates:
    """The parsed files: statement and fragment bodies by name (comments dropped)."""

    statements: Mapping[str, str]
    fragments: Mapping[str, str]


def parse(text: str, source: str) -> Iterator[tuple[str, str, str, str]]:
    """The entries of one file: (kind, name, body, where) with kind ``name`` or ``fragment``.

    A header with a bad name, a body-less entry or SQL before the first
    header raises ``ValueError`` naming ``source`` and the line.
    """
    kind, name, where, body = "", "", "", list[str]()
    # A last header past the end closes the file's last entry like any other.
    for number, line in enumerate([*text.splitlines(), "-- name: end_of_file"], start=1):
        header = _HEADER.match(line)
        if header:
            if kind and not body:
                what = "statement" if kind == "name" else kind
                raise ValueError(f"{where}: {what} {name!r} has no body")
            if kind:
                yield kind, name, "\n".join(body).strip("\n"), where
            kind, name, where, body = header[1], header[2], f"{source}:{number}", []
            if not _NAME.fullmatch(name):
                raise ValueError(f"{where}: {name!r} is not a lower_case name")
        elif body or (line.strip() and not line.startswith("--")):
            # The comment lines right under a header explain it; the body follows.
            if not kind:
                raise ValueError(f"{source}:{number}: SQL before the first '-- name:' header")
            body.append(line)


def collect(files: Iterable[tuple[str, str]]) -> Templates:
    """The statements and fragments of ``(source, text)`` files; a name used twice is refused."""
    found: dict[str, dict[str, str]] = {"name": {}, "fragment": {}}
    for source, text in files:
        for kind, name, body, where in parse(text, source):
            if name in found["name"] or name in found["fragment"]:
                raise ValueError(f"{where}: {name!r} is defined twice")
            if name == "schema" or hasattr(Queries, name):
                raise ValueError(f"{where}: {name!r} is taken by Queries itself")
            found[kind][name] = body
    return Templates(MappingProxyType(found["name"]), MappingProxyType(found["fragment"]))


@cache
def templates() -> Templates:
    """Every statement and fragment of the package's files, parsed once."""
    folder = resources.files("kongtask.db").joinpath("sql")
    return collect(
        (f"kongtask/db/sql/{name}", folder.joinpath(name).read_text("utf-8")) for name in SQL_FILES
    )


_INCLUDE = re.compile(r"(?<!\{)\{([a-z][a-z0-9_]+)\}(?!\})")


def _expanded(fragments: Mapping[str, str]) -> dict[str, str]:
    """The fragments with the fragments they include (``{name}``) written out."""
    texts = dict(fragments)

    def include(found: re.Match[str]) -> str:
        return texts.get(found[1], found[0])

    for _ in range(len(texts)):
        changed = {name: _INCLUDE.sub(include, text) for name, text in texts.items()}
        if changed == texts:
            break
        texts = changed
    return texts


class Queries:
    """The statements composed for one schema: ``queries.get_jobs`` (cheap to keep).

    A statement is composed on first use and then kept as an instance
    attribute, so later reads are plain attribute lookups on the hot path.
    """

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self._identifier = sql.Identifier(schema)
        self._fragments: dict[str, sql.Composed] | None = None

    def __getattr__(self, name: str) -> sql.Composed:
        if name.startswith("_"):  # copy, pickle and the like probe for dunders
            raise AttributeError(name)
        found = templates()
        if name not in found.statements:
            close = difflib.get_close_matches(name, found.statements, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise AttributeError(f"no statement named {name!r} in kongtask/db/sql{hint}", name=name)
        if self._fragments is None:
            self._fragments = {
                fragment: sql.SQL(text).format(s=self._identifier)
                for fragment, text in _expanded(found.fragments).items()
            }
        composed = sql.SQL(found.statements[name]).format(s=self._identifier, **self._fragments)
        self.__dict__[name] = composed
        return composed
