"""The statement files: every statement used and composable, every use defined, no inline SQL.

No database here: the integration suites run every statement against PostgreSQL.
"""

from __future__ import annotations

import ast
import re
from importlib import resources
from pathlib import Path

import pytest

import kongtask
from kongtask.db.statements import (
    CRON_ITEMS_CHANNEL,
    SQL_FILES,
    Queries,
    collect,
    parse,
    templates,
)

PACKAGE = Path(kongtask.__file__).parent

# Files allowed to hold SQL of their own: the migration machinery runs the
# migration files and bootstraps its own bookkeeping tables.
OWN_SQL = {PACKAGE / "db" / "migrate.py"}


def _modules() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text("utf-8"))) for path in sorted(PACKAGE.rglob("*.py"))]


def _holds_queries(node: ast.expr) -> bool:
    """``queries``, ``<x>.queries``, ``<x>._queries`` or ``Queries(...)``."""
    if isinstance(node, ast.Name):
        return node.id == "queries"
    if isinstance(node, ast.Attribute):
        return node.attr in ("queries", "_queries")
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Queries"


def statement_uses(tree: ast.Module) -> list[tuple[str, int]]:
    """Each ``<queries>.<name>`` read in ``tree``, with its line."""
    return [
        (node.attr, node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _holds_queries(node.value)
        and node.attr != "schema"  # Queries' one attribute that is not a statement
    ]


def test_use_finder_sees_every_way_the_package_holds_queries() -> None:
    source = (
        "queries.a\nself._queries.b\nself.ctx.queries.c\nQueries(schema).d\n"
        "queries.schema\nother.e\n"
    )
    assert statement_uses(ast.parse(source)) == [("a", 1), ("b", 2), ("c", 3), ("d", 4)]


def test_every_statement_is_used_and_every_use_names_one() -> None:
    statements = templates().statements
    used: set[str] = set()
    unknown: list[str] = []
    for path, tree in _modules():
        for name, line in statement_uses(tree):
            used.add(name)
            if name not in statements:
                unknown.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}")
    assert unknown == []
    assert sorted(set(statements) - used) == []


def test_every_fragment_is_included_somewhere() -> None:
    found = templates()
    bodies = [*found.statements.values(), *found.fragments.values()]
    unused = [name for name in found.fragments if not any(f"{{{name}}}" in b for b in bodies)]
    assert unused == []


def test_every_statement_composes_for_an_awkward_schema() -> None:
    found = templates()
    queries = Queries('we"ird $ schema')
    for name, body in found.statements.items():
        text = getattr(queries, name).as_string(None)
        assert re.search(r"\{[a-z_]+\}", text) is None, f"{name}: a placeholder is left: {text}"
        included = [found.fragments.get(part, "") for part in re.findall(r"\{([a-z_]+)\}", body)]
        if any("{s}" in part for part in [body, *included]):
            assert '"we""ird $ schema"' in text, name  # quoted wherever it appears
            assert 'we"ird $ schema.' not in text, name
        assert getattr(queries, name) is getattr(queries, name), f"{name} is composed once"


def test_fragments_are_included_in_full() -> None:
    text = Queries("s1").complete_jobs.as_string(None)
    assert 'update "s1"._private_job_queues as queues' in text
    assert "queues.id = finished.job_queue_id" in text


def test_an_unknown_statement_names_itself_and_its_close_matches() -> None:
    queries = Queries("graphile_worker")
    with pytest.raises(AttributeError, match=r"'get_job'.*get_jobs"):
        queries.get_job  # noqa: B018 (the read is the test)
    with pytest.raises(AttributeError, match="'release_pool_queues'"):
        queries.release_pool_queues  # noqa: B018 (a fragment is not a statement)
    assert not hasattr(queries, "_private")


def test_the_package_ships_exactly_the_files_it_loads() -> None:
    folder = resources.files("kongtask.db").joinpath("sql")
    shipped = sorted(entry.name for entry in folder.iterdir() if entry.name.endswith(".sql"))
    assert shipped == sorted(SQL_FILES)


def test_the_cron_items_channel_is_the_one_the_statements_use() -> None:
    found = templates()
    assert f"'{CRON_ITEMS_CHANNEL}'" in found.fragments["notify_cron_items"]
    assert f'"{CRON_ITEMS_CHANNEL}"' in found.statements["listen_cron_items"]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("select 1\n", r"x\.sql:1: SQL before the first '-- name:' header"),
        (
            "-- name: a_b\n-- only a comment\n\n-- name: c_d\nselect 1\n",
            r"x\.sql:1: statement 'a_b' has no body",
        ),
        ("-- name: Bad\nselect 1\n", r"x\.sql:1: 'Bad' is not a lower_case name"),
        ("-- fragment: s\nselect 1\n", r"x\.sql:1: 's' is not a lower_case name"),
    ],
)
def test_a_malformed_file_is_refused_with_file_and_line(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        list(parse(text, "x.sql"))


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            [("a.sql", "-- name: one_thing\nselect 1\n"), ("b.sql", "-- fragment: one_thing\n1\n")],
            r"b\.sql:1: 'one_thing' is defined twice",
        ),
        ([("a.sql", "-- name: schema\nselect 1\n")], r"a\.sql:1: 'schema' is taken by Queries"),
    ],
)
def test_a_name_is_refused_when_taken(files: list[tuple[str, str]], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        collect(files)


def test_parse_keeps_the_body_and_drops_the_explanation() -> None:
    text = (
        "-- a file comment\n\n-- name: one_thing\n-- why it exists\nselect 1\n-- inside\nfrom t\n\n"
    )
    assert list(parse(text, "x.sql")) == [
        ("name", "one_thing", "select 1\n-- inside\nfrom t", "x.sql:3")
    ]


def test_no_inline_sql_outside_the_statement_files() -> None:
    found = []
    for path, tree in _modules():
        if path in OWN_SQL:
            continue
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            first = node.args[0] if node.args else None
            # The empty statement is connecting.py's ping (no SQL, just a round trip).
            literal = isinstance(first, ast.JoinedStr) or (
                isinstance(first, ast.Constant) and first.value != ""
            )
            if node.func.attr in ("execute", "executemany") and literal:
                found.append(f"{path.name}:{node.lineno}")
            if node.func.attr == "SQL" and path.name != "statements.py":
                found.append(f"{path.name}:{node.lineno}")
    assert found == []
