"""The migrations produce exactly the committed schema snapshot.

``tests/schema_snapshot.json`` is the catalog (tools/catalog.py) of a schema
installed by graphile-worker 0.17.3 itself; the interop parity tests refresh
the comparison against the live npm package, this one guards it without Node.
The snapshot holds on every server version: the catalog reports a plain NOT
NULL as the column's flag, not as the constraint row PostgreSQL 18 adds.
Regenerate with ``python tools/catalog.py URL graphile_worker > tests/schema_snapshot.json``
on a database that graphile-worker 0.17.3 migrated.
"""

from __future__ import annotations

import json

import psycopg

from kongtask.db.migrate import migrate
from tests.conftest import REPO, load_catalog_tool


def test_migrations_match_the_committed_snapshot(empty_db_url: str) -> None:
    tool = load_catalog_tool()
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        migrate(conn, "graphile_worker")
    ours = json.loads(json.dumps(tool.dump_catalog(empty_db_url, "graphile_worker"), default=str))
    snapshot = json.loads((REPO / "tests" / "schema_snapshot.json").read_text())
    assert tool.diff_catalogs(snapshot, ours) == []


def test_not_null_changes_still_show_on_every_server_version(empty_db_url: str) -> None:
    """Leaving PostgreSQL 18's plain not-null constraints out of the catalog hides no change."""
    tool = load_catalog_tool()
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        migrate(conn, "graphile_worker")
        before = tool.dump_catalog(conn, "graphile_worker")
        conn.execute("alter table graphile_worker._private_jobs alter column run_at drop not null")
        dropped = tool.diff_catalogs(before, tool.dump_catalog(conn, "graphile_worker"))
        # One difference, the column's flag (on PostgreSQL 18 not also a vanished constraint).
        assert len(dropped) == 1, dropped
        assert dropped[0].startswith("~ relations._private_jobs.columns[")
        assert dropped[0].endswith("].not_null: true != false")
        if conn.info.server_version < 180000:
            return
        # PostgreSQL 18 only: a NOT VALID not-null constraint is more than the flag.
        conn.execute(
            "alter table graphile_worker._private_jobs "
            "add constraint run_at_present not null run_at not valid"
        )
        added = tool.diff_catalogs(before, tool.dump_catalog(conn, "graphile_worker"))
        assert any("constraints.run_at_present" in line for line in added), added
