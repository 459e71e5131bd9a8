"""Schema parity with the real graphile-worker 0.17.3 from npm.

A database migrated by kongtask must be indistinguishable (apart from function
bodies) from one migrated by Node graphile-worker, either side must accept the
other's database without changing it, and both sets of SQL functions must
leave identical rows behind for the same sequence of calls.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from kongtask.db.migrate import LATEST_MIGRATION, migrate
from tests.conftest import DatabaseFactory, load_catalog_tool, to_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodepeer import require_graphile_worker, run_graphile_worker

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]


catalog_tool = load_catalog_tool()


@pytest.fixture(scope="module")
def node_cli() -> list[str]:
    """graphile-worker 0.17.3's CLI (installed into the test cache on first use)."""
    return require_graphile_worker()


@pytest.fixture
def parity_database(databases: DatabaseFactory) -> Iterator[Callable[[], str]]:
    """A factory of empty databases (URIs) on the test server, dropped after the test.

    The test server is the one every other test uses (the embedded server by
    default), so both sides are compared on the same PostgreSQL version.
    """
    created: list[str] = []

    def create() -> str:
        conninfo = databases.create(prefix="mig")
        created.append(conninfo)
        return to_uri(conninfo)

    yield create
    for conninfo in created:
        databases.drop(conninfo)


def _node_migrate(url: str, schema: str) -> None:
    completed = run_graphile_worker(["--schema-only", "--schema", schema], database_url=url)
    assert "Schema updated" in completed.stdout + completed.stderr


def _kongtask_migrate(url: str, schema: str) -> tuple[int, ...]:
    with psycopg.connect(url, autocommit=True) as conn:
        return migrate(conn, schema).applied


def _state(url: str, schema: str) -> dict[str, Any]:
    """The schema's catalog plus its migrations rows with their timestamps."""
    with psycopg.connect(url, autocommit=True) as conn:
        state = catalog_tool.dump_catalog(conn, schema)
        state["migration_rows"] = [
            (row[0], str(row[1]), row[2])
            for row in conn.execute(
                sql.SQL("select id, ts, breaking from {}.migrations order by id").format(
                    sql.Identifier(schema)
                )
            )
        ]
    return state


def _assert_same(left: dict[str, Any], right: dict[str, Any], what: str) -> None:
    differences = catalog_tool.diff_catalogs(left, right)
    assert not differences, f"{what}: {len(differences)} difference(s):\n" + "\n".join(differences)


SCHEMAS = ["graphile_worker", "gw_custom", 'My "odd" schema']


@pytest.mark.parametrize("schema", SCHEMAS)
def test_catalogs_are_identical(
    node_cli: list[str], parity_database: Callable[[], str], schema: str
) -> None:
    node_url, kongtask_url = parity_database(), parity_database()
    _node_migrate(node_url, schema)
    assert _kongtask_migrate(kongtask_url, schema) == tuple(range(1, LATEST_MIGRATION + 1))

    node_catalog = catalog_tool.dump_catalog(node_url, schema)
    kongtask_catalog = catalog_tool.dump_catalog(kongtask_url, schema)

    assert len(node_catalog["functions"]) == 7
    assert len(node_catalog["migrations"]) == LATEST_MIGRATION
    _assert_same(node_catalog, kongtask_catalog, "node (left) vs kongtask (right)")


def test_kongtask_accepts_a_node_database_unchanged(
    node_cli: list[str], parity_database: Callable[[], str]
) -> None:
    url = parity_database()
    _node_migrate(url, "graphile_worker")
    before = _state(url, "graphile_worker")

    assert _kongtask_migrate(url, "graphile_worker") == ()

    _assert_same(before, _state(url, "graphile_worker"), "before vs after kongtask")


def test_node_accepts_a_kongtask_database_unchanged(
    node_cli: list[str], parity_database: Callable[[], str]
) -> None:
    url = parity_database()
    _kongtask_migrate(url, "gw_custom")
    before = _state(url, "gw_custom")

    _node_migrate(url, "gw_custom")

    _assert_same(before, _state(url, "gw_custom"), "before vs after graphile-worker")


# -- both sets of functions, same calls, same rows ----------------------------------

FUTURE = datetime.fromisoformat("2200-01-01T00:00:00+00:00")

# (SQL, parameters) run in order on each database; each result row is recorded.
WALK: list[tuple[str, tuple[Any, ...]]] = [
    # GRAPHILE_WORKER.md 3.13: replace -> preserve_run_at -> unsafe_dedupe -> replace.
    (
        "select * from graphile_worker.add_job('walk', '{\"a\":1}', run_at => %s,"
        " job_key => 'UNIQUE')",
        (FUTURE,),
    ),
    (
        "select * from graphile_worker.add_job('walk', '{\"a\":2}', run_at => %s,"
        " job_key => 'UNIQUE', job_key_mode => 'preserve_run_at')",
        (FUTURE + timedelta(seconds=1),),
    ),
    (
        "select * from graphile_worker.add_job('walk', '{\"a\":3}', run_at => %s,"
        " job_key => 'UNIQUE', job_key_mode => 'unsafe_dedupe')",
        (FUTURE + timedelta(seconds=2),),
    ),
    (
        "select * from graphile_worker.add_job('walk', '{\"a\":4}', run_at => %s,"
        " job_key => 'UNIQUE', job_key_mode => 'replace')",
        (FUTURE + timedelta(seconds=3),),
    ),
    # Array payloads accumulate under one key; a queue and flags come and go.
    (
        "select * from graphile_worker.add_job('batch', '[1]', 'q1', %s, 3, 'B', 5,"
        " array['x','y'])",
        (FUTURE,),
    ),
    (
        "select * from graphile_worker.add_job('batch', '[2, 3]', run_at => %s, job_key => 'B')",
        (FUTURE,),
    ),
    # A batch through add_jobs, with preserve_run_at.
    (
        "select * from graphile_worker.add_jobs(array["
        "('many', '{\"n\":1}', 'q2', %s, 2, 'M1', 1, array['f'])::graphile_worker.job_spec,"
        "('many', null, null, %s, null, null, null, null)::graphile_worker.job_spec,"
        "('other', '[]', 'q2', %s, null, 'M2', null, null)::graphile_worker.job_spec"
        "], true)",
        (FUTURE, FUTURE, FUTURE),
    ),
    (
        "select * from graphile_worker.add_jobs(array["
        "('many', '{\"n\":2}', null, %s, null, 'M1', null, null)::graphile_worker.job_spec"
        "], true)",
        (FUTURE + timedelta(hours=1),),
    ),
    # A job that has failed once is fully reset, run_at included, even when preserving.
    (
        "update graphile_worker._private_jobs set attempts = 1, last_error = 'boom'"
        " where key = 'M1' returning key",
        (),
    ),
    (
        "select * from graphile_worker.add_jobs(array["
        "('many', '{\"n\":3}', null, %s, null, 'M1', null, null)::graphile_worker.job_spec"
        "], true)",
        (FUTURE + timedelta(hours=2),),
    ),
    # A locked job keeps running but loses its key; a new job takes it.
    (
        "update graphile_worker._private_jobs set locked_at = now(), locked_by = 'pool-a'"
        " where key = 'M2' returning key",
        (),
    ),
    (
        "select * from graphile_worker.add_job('other', '{}', run_at => %s, job_key => 'M2')",
        (FUTURE,),
    ),
    # A permanently failed job is evicted the same way.
    (
        "select * from graphile_worker.permanently_fail_jobs("
        "array(select id from graphile_worker._private_jobs where key = 'B'), 'given up')",
        (),
    ),
    (
        "select * from graphile_worker.add_job('batch', '[9]', run_at => %s, job_key => 'B')",
        (FUTURE,),
    ),
    # unsafe_dedupe on a permanently failed job only bumps its revision.
    (
        "select * from graphile_worker.permanently_fail_jobs("
        "array(select id from graphile_worker._private_jobs where key = 'UNIQUE'))",
        (),
    ),
    (
        "select * from graphile_worker.add_job('walk', '{\"z\":1}', run_at => %s,"
        " job_key => 'UNIQUE', job_key_mode => 'unsafe_dedupe')",
        (FUTURE,),
    ),
    (
        "select * from graphile_worker.add_job('fresh', '{\"z\":2}', run_at => %s,"
        " job_key => 'D', job_key_mode => 'unsafe_dedupe')",
        (FUTURE,),
    ),
    # Rescheduling, completing, removing, unlocking.
    (
        "select * from graphile_worker.reschedule_jobs("
        "array(select id from graphile_worker._private_jobs where key in ('D', 'M1')),"
        " run_at => %s, priority => 7, attempts => 1, max_attempts => 9)",
        (FUTURE + timedelta(days=1),),
    ),
    (
        "select * from graphile_worker.complete_jobs("
        "array(select id from graphile_worker._private_jobs where key = 'D' or key is null))",
        (),
    ),
    ("select * from graphile_worker.remove_job('M1')", ()),
    ("select * from graphile_worker.remove_job('no such key')", ()),
    (
        "update graphile_worker._private_jobs set locked_at = now(), locked_by = 'pool-b'"
        " where key = 'M2' returning key",
        (),
    ),
    ("select * from graphile_worker.remove_job('M2')", ()),
    ("select graphile_worker.force_unlock_workers(array['pool-a', 'pool-b'])", ()),
]

# Calls that must fail identically (SQLSTATE).
FAILING: list[str] = [
    "select graphile_worker.add_job('x', job_key => 'k', job_key_mode => 'nonsense')",
    "select graphile_worker.add_job('x', max_attempts => 0)",
    "select graphile_worker.add_job('x', job_key => '')",
    "select graphile_worker.add_jobs(array["
    "('x', null, null, null, null, 'dup', null, null)::graphile_worker.job_spec,"
    "('x', null, null, null, null, 'dup', null, null)::graphile_worker.job_spec])",
]

_VOLATILE = {"id", "created_at", "updated_at", "job_queue_id", "task_id"}


def _normalize(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """Drop ids and bookkeeping times; a time close to now becomes "now"."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key in _VOLATILE:
            continue
        if isinstance(value, datetime) and abs(value - now) < timedelta(hours=1):
            value = "now"
        out[key] = value
    return out


def _run_walk(url: str) -> dict[str, Any]:
    results: list[Any] = []
    errors: list[str | None] = []
    with psycopg.connect(url, autocommit=True) as conn:
        now = conn.execute("select now()").fetchone()[0]  # type: ignore[index]
        listener = psycopg.connect(url, autocommit=True)
        try:
            listener.execute('listen "jobs:insert"')
            with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
                for statement, params in WALK:
                    cur.execute(statement, params)
                    rows = [_normalize(r, now) for r in cur.fetchall()]
                    # graphile-worker's add_jobs returns rows in plan order, not spec order
                    # (kongtask's keeps spec order), so compare each call's rows as a set.
                    rows.sort(key=lambda r: json.dumps(r, default=str, sort_keys=True))
                    results.append(rows)
            for statement in FAILING:
                try:
                    conn.execute(statement)
                    errors.append(None)
                except psycopg.Error as error:
                    errors.append(error.sqlstate)
            conn.execute('notify "jobs:insert", \'{"end":true}\'')
            counts: list[int] = []
            deadline = time.monotonic() + 10
            done = False
            while not done and time.monotonic() < deadline:
                for notify in listener.notifies(timeout=deadline - time.monotonic()):
                    payload = json.loads(notify.payload)
                    if payload.get("end"):
                        done = True
                        break
                    assert set(payload) == {"r", "count"}, payload
                    counts.append(payload["count"])
            assert done, "the end marker notification never arrived"
        finally:
            listener.close()
        with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
            cur.execute(
                "select j.*, t.identifier as task, q.queue_name"
                " from graphile_worker._private_jobs j"
                " join graphile_worker._private_tasks t on t.id = j.task_id"
                " left join graphile_worker._private_job_queues q on q.id = j.job_queue_id"
                " order by t.identifier, j.key nulls first, j.revision, j.run_at, j.attempts"
            )
            jobs = [_normalize(r, now) for r in cur.fetchall()]
            cur.execute(
                "select * from graphile_worker.jobs order by task_identifier, key, revision"
            )
            view = [_normalize(r, now) for r in cur.fetchall()]
        tasks = [
            r
            for (r,) in conn.execute(
                "select identifier from graphile_worker._private_tasks order by 1"
            )
        ]
        queues = conn.execute(
            "select queue_name, locked_at, locked_by from graphile_worker._private_job_queues"
            " order by 1"
        ).fetchall()
    return {
        "results": results,
        "errors": errors,
        "notify_counts": counts,
        "jobs": jobs,
        "view": view,
        "tasks": tasks,
        "queues": queues,
    }


def test_functions_leave_identical_rows(
    node_cli: list[str], parity_database: Callable[[], str]
) -> None:
    node_url, kongtask_url = parity_database(), parity_database()
    _node_migrate(node_url, "graphile_worker")
    _kongtask_migrate(kongtask_url, "graphile_worker")

    on_node = _run_walk(node_url)
    on_kongtask = _run_walk(kongtask_url)

    # The walk itself must mean something: the 3.13 vector and real evictions happened.
    assert [r[0]["revision"] for r in on_node["results"][:4]] == [0, 1, 2, 3]
    assert on_node["errors"] == ["GWBKM", "23514", "23514", "21000"]
    assert len(on_node["jobs"]) == 4
    _assert_same(
        json.loads(json.dumps(on_node, default=str)),
        json.loads(json.dumps(on_kongtask, default=str)),
        "rows from graphile-worker's functions (left) vs kongtask's (right)",
    )


# -- Node's own client and worker on a kongtask database -----------------------------

_ADD_JOB_SCRIPT = textwrap.dedent(
    """
    const { makeWorkerUtils } = require(process.argv[1]);
    (async () => {
      const utils = await makeWorkerUtils({ connectionString: process.env.DATABASE_URL });
      try {
        const job = await utils.addJob("node_task", { from: "node" }, { jobKey: "nk" });
        console.log(JSON.stringify({ id: job.id, key: job.key }));
      } finally {
        await utils.release();
      }
    })().catch((e) => { console.error(e); process.exit(1); });
    """
)

_TASK_JS = textwrap.dedent(
    """
    module.exports = async (payload, helpers) => {
      await helpers.query(
        "insert into public.node_ran (payload) values ($1)", [JSON.stringify(payload)]
      );
    };
    """
)


def test_node_adds_and_runs_a_job_on_a_kongtask_database(
    node_cli: list[str], parity_database: Callable[[], str], tmp_path: Path
) -> None:
    url = parity_database()
    _kongtask_migrate(url, "graphile_worker")
    before = _state(url, "graphile_worker")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("create table public.node_ran (payload json not null)")

    node, cli = node_cli
    package = Path(cli).resolve().parents[1]
    added = subprocess.run(
        [node, "-e", _ADD_JOB_SCRIPT, str(package)],
        env={**os.environ, "DATABASE_URL": url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert added.returncode == 0, added.stderr
    job = json.loads(added.stdout.strip().splitlines()[-1])
    assert job["key"] == "nk"

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "node_task.js").write_text(_TASK_JS, encoding="utf-8")
    run_graphile_worker(["--once"], database_url=url, cwd=tmp_path)

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("select payload::text from public.node_ran").fetchall() == [
            ('{"from":"node"}',)
        ]
        assert conn.execute("select count(*) from graphile_worker._private_jobs").fetchone() == (0,)
    after = _state(url, "graphile_worker")
    _assert_same(before, after, "schema before vs after Node used it")


def test_node_and_kongtask_migrating_at_once_agree(
    node_cli: list[str], parity_database: Callable[[], str]
) -> None:
    reference_url, url = parity_database(), parity_database()
    _node_migrate(reference_url, "graphile_worker")
    node = subprocess.Popen(
        [*node_cli, "--schema-only"],
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Start as soon as Node has created its bookkeeping, to meet it mid-way.
        deadline = time.monotonic() + 30
        with psycopg.connect(url, autocommit=True) as conn:
            while node.poll() is None and time.monotonic() < deadline:
                row = conn.execute("select to_regclass('graphile_worker.migrations')").fetchone()
                if row is not None and row[0] is not None:
                    break
        applied = _kongtask_migrate(url, "graphile_worker")
        output, _ = node.communicate(timeout=60)
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
    assert node.returncode == 0, output
    assert applied in ((), tuple(range(1, LATEST_MIGRATION + 1)))
    _assert_same(
        catalog_tool.dump_catalog(reference_url, "graphile_worker"),
        catalog_tool.dump_catalog(url, "graphile_worker"),
        "Node alone (left) vs Node and kongtask at once (right)",
    )
