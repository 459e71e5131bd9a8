"""The migrations produce exactly the committed schema snapshot.

``tests/schema_snapshot.json`` is the catalog (tools/catalog.py) of a schema
installed by graphile-worker 0.17.3 itself; the interop parity tests refresh
the comparison against the live npm package, this one guards it without Node.
Regenerate with ``python tools/catalog.py URL graphile_worker > tests/schema_snapshot.json``
on a database that graphile-worker 0.17.3 migrated.
"""

from __future__ import annotations

import json

import psycopg

from kongtask.migrate import migrate
from tests.conftest import REPO, load_catalog_tool


def test_migrations_match_the_committed_snapshot(empty_db_url: str) -> None:
    tool = load_catalog_tool()
    with psycopg.connect(empty_db_url, autocommit=True) as conn:
        migrate(conn, "graphile_worker")
    ours = json.loads(json.dumps(tool.dump_catalog(empty_db_url, "graphile_worker"), default=str))
    snapshot = json.loads((REPO / "tests" / "schema_snapshot.json").read_text())
    assert tool.diff_catalogs(snapshot, ours) == []
