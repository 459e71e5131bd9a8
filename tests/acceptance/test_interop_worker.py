"""Python and Node workers on one queue: the ``kongtask`` CLI and graphile-worker 0.17.3.

The kongtask worker runs as a real ``kongtask -c URL --tasks tasks.py -j 24``
subprocess; graphile-worker runs from npm with a ``tasks/`` folder of ``.js``
files. Every task records what it ran (task, runtime, payload, attempt, and
database timestamps at start and end) into ``interop_runs``, so each test
asserts from the database, whichever side ran the job.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from kongtask import WorkerUtils
from tests.conftest import to_uri

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nodepeer import graphile_worker_dir, require_graphile_worker, run_graphile_worker

pytestmark = pytest.mark.interop

DEADLINE_S = 60.0
STOP_TIMEOUT_S = 30.0

RUNS_TABLE = """
create table if not exists public.interop_runs (
    id bigserial primary key,
    task text not null,
    runtime text not null,
    payload jsonb,
    attempts int not null,
    queue_name text,
    started_at timestamptz not null,
    ended_at timestamptz not null
)
"""

# One recording task body per runtime. ``work_ms`` widens the start/end window
# so that overlapping runs would be visible.
PY_TASKS = '''
"""Tasks for the interop tests: each records its run into public.interop_runs."""

import json
import threading


def _record(task, payload, helpers):
    started = helpers.query("select clock_timestamp() as now")[0]["now"]
    work_ms = (payload or {{}}).get("work_ms", 0) if isinstance(payload, dict) else 0
    if work_ms:
        threading.Event().wait(work_ms / 1000)  # the job's own "work", not a test wait
    helpers.query(
        "insert into public.interop_runs "
        "(task, runtime, payload, attempts, queue_name, started_at, ended_at) "
        "values (%s, 'python', %s::jsonb, %s, %s, %s, clock_timestamp())",
        (task, json.dumps(payload), helpers.job.attempts, helpers.get_queue_name(), started),
    )


def _make(task):
    def handler(payload, helpers):
        _record(task, payload, helpers)

    return handler


def flaky(payload, helpers):
    if helpers.job.attempts < 2:
        raise RuntimeError(f"flaky failed on attempt {{helpers.job.attempts}}")
    _record("flaky", payload, helpers)


tasks = {{name: _make(name) for name in {names!r}}}
{flaky_line}
'''

NODE_TASK = """
module.exports = async (payload, helpers) => {{
  const {{ rows: [{{ now }}] }} = await helpers.query("select clock_timestamp() as now");
  const workMs = (payload && payload.work_ms) || 0;
  if (workMs) await new Promise((resolve) => setTimeout(resolve, workMs));
  await helpers.query(
    "insert into public.interop_runs " +
      "(task, runtime, payload, attempts, queue_name, started_at, ended_at) " +
      "values ($1, 'node', $2::jsonb, $3, (select q.queue_name " +
      "from graphile_worker._private_jobs j join graphile_worker._private_job_queues q " +
      "on q.id = j.job_queue_id where j.id = $4), $5, clock_timestamp())",
    [{task!r}, JSON.stringify(payload), helpers.job.attempts, helpers.job.id, now],
  );
}};
"""

NODE_FLAKY_TASK = """
const record = require("./_record_flaky.js");
module.exports = async (payload, helpers) => {
  if (helpers.job.attempts < 2) {
    throw new Error(`flaky failed on attempt ${helpers.job.attempts}`);
  }
  await record(payload, helpers);
};
"""

NODE_ADD_JOBS = """
const gw = require(process.argv[2]);
const connectionString = process.env.DATABASE_URL;
async function main() {
  const utils = await gw.makeWorkerUtils({ connectionString });
  try {
    await utils.addJob("py_record", { source: "node-addJob" });
    await utils.addJob("py_record", { source: "node-addJob-queued" }, { queueName: "node-q" });
  } finally {
    await utils.release();
  }
  await gw.quickAddJob({ connectionString }, "py_record", { source: "node-quickAddJob" });
  await gw.addJobAdhoc({ connectionString }, "py_record", { source: "node-addJobAdhoc" },
    { priority: 5, maxAttempts: 3 });
}
main().catch((error) => { console.error(error); process.exit(1); });
"""


# --- helpers ------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], timeout: float = DEADLINE_S, what: str = "") -> None:
    """Poll a (database) condition until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        pause.wait(0.05)


def runs(db_url: str, task: str | None = None) -> list[dict[str, Any]]:
    """The recorded runs (optionally of one task), in start order."""
    with psycopg.connect(db_url, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        if task is None:
            return cur.execute("select * from public.interop_runs order by started_at").fetchall()
        return cur.execute(
            "select * from public.interop_runs where task = %s order by started_at", (task,)
        ).fetchall()


def run_count(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select count(*) from public.interop_runs").fetchone()
    assert row is not None
    return int(row[0])


def db_now(db_url: str) -> datetime:
    """The database server's clock (the one job timestamps use)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("select clock_timestamp()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def job_rows(db_url: str) -> list[dict[str, Any]]:
    """Every job left in the queue, with its task identifier and queue name."""
    with psycopg.connect(db_url, autocommit=True) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            "select j.*, t.identifier as task_identifier, q.queue_name "
            "from graphile_worker._private_jobs j "
            "join graphile_worker._private_tasks t on t.id = j.task_id "
            "left join graphile_worker._private_job_queues q on q.id = j.job_queue_id "
            "order by j.id"
        ).fetchall()


def assert_serial(rows: list[dict[str, Any]]) -> None:
    """No two recorded runs overlap in time (database clock)."""
    ordered = sorted(rows, key=lambda row: row["started_at"])
    for before, after in itertools.pairwise(ordered):
        assert before["ended_at"] <= after["started_at"], (
            f"runs overlap: {before['runtime']} {before['payload']} ended {before['ended_at']} "
            f"after {after['runtime']} {after['payload']} started {after['started_at']}"
        )


@pytest.fixture
def runs_db(db_url: str) -> str:
    """A fresh migrated database with the ``interop_runs`` table."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(RUNS_TABLE)
    return db_url


@pytest.fixture
def gw_cli() -> list[str]:
    """graphile-worker's CLI argv prefix (installed from npm on first use)."""
    return require_graphile_worker()


def write_py_tasks(folder: Path, names: list[str], *, flaky: bool = False) -> Path:
    path = folder / "tasks.py"
    flaky_line = 'tasks["flaky"] = flaky' if flaky else ""
    path.write_text(PY_TASKS.format(names=names, flaky_line=flaky_line), encoding="utf-8")
    return path


def write_node_tasks(folder: Path, names: list[str], *, flaky: bool = False) -> Path:
    """A graphile-worker project folder with ``tasks/<name>.js`` for each name."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for name in names:
        (tasks / f"{name}.js").write_text(NODE_TASK.format(task=name), encoding="utf-8")
    if flaky:
        helper = folder / "_record_flaky.js"
        helper.write_text(NODE_TASK.format(task="flaky"), encoding="utf-8")
        (tasks / "flaky.js").write_text(
            NODE_FLAKY_TASK.replace("./_record_flaky.js", str(helper)), encoding="utf-8"
        )
    return folder


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GRAPHILE_WORKER_SCHEMA", None)
    env.pop("DATABASE_URL", None)
    return env


def run_kongtask_once(db_url: str, tasks_file: Path) -> subprocess.CompletedProcess[str]:
    """``kongtask --once`` to completion; fails the test on a non-zero exit."""
    argv = [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks", str(tasks_file)]
    completed = subprocess.run(
        [*argv, "-j", "24", "--once"],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
        cwd=tasks_file.parent,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


class Background:
    """A long-running worker subprocess whose output goes to a file."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "w", encoding="utf-8")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdout=self._out, stderr=subprocess.STDOUT, text=True
        )

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited early ({self.proc.returncode}):\n{self.output()}")

    def stop(self) -> int:
        """SIGTERM, then wait for the exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"worker did not stop within {STOP_TIMEOUT_S}s of SIGTERM:\n{self.output()}"
            ) from None
        finally:
            self._out.close()
        return code


@contextmanager
def kongtask_worker(
    db_url: str, tasks_file: Path, *, jobs: int = 24, poll_ms: int | None = None
) -> Iterator[Background]:
    """``kongtask -c URL --tasks tasks.py -j N`` in the background; SIGTERM must exit 0."""
    argv = [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks", str(tasks_file)]
    argv += ["-j", str(jobs)]
    if poll_ms is not None:
        argv += ["--poll-interval", str(poll_ms)]
    worker = Background(
        argv, cwd=tasks_file.parent, env=cli_env(), log=tasks_file.parent / "kongtask.log"
    )
    try:
        yield worker
    except BaseException:
        worker.stop()
        raise
    code = worker.stop()
    assert code == 0, f"kongtask exited with {code} after SIGTERM:\n{worker.output()}"
    assert "Traceback" not in worker.output(), worker.output()


@contextmanager
def node_worker(
    gw_cli: list[str], db_url: str, project: Path, *, jobs: int = 4, poll_ms: int = 2000
) -> Iterator[Background]:
    """A long-running graphile-worker in ``project`` (its ``tasks/`` folder)."""
    env = cli_env()
    env["DATABASE_URL"] = to_uri(db_url)
    argv = [*gw_cli, "-j", str(jobs), "--poll-interval", str(poll_ms)]
    worker = Background(argv, cwd=project, env=env, log=project / "node.log")
    try:
        yield worker
    finally:
        worker.stop()


def run_node_once(db_url: str, project: Path) -> subprocess.CompletedProcess[str]:
    return run_graphile_worker(["--once", "-j", "4"], database_url=to_uri(db_url), cwd=project)


# --- kongtask runs what others enqueue ------------------------------------------------


def test_kongtask_cli_runs_jobs_from_worker_utils_sql_and_node(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    tasks_file = write_py_tasks(tmp_path, ["py_record"])
    # (a) kongtask's WorkerUtils, (b) the schema's SQL function; added before the
    # worker starts, so the start-up claim finds them.
    with WorkerUtils(runs_db) as utils:
        utils.add_job("py_record", {"source": "worker_utils"})
        utils.add_job("py_record", {"source": "worker_utils-queued"}, queue_name="py-q")
    with psycopg.connect(runs_db, autocommit=True) as conn:
        conn.execute(
            "select graphile_worker.add_job('py_record', json_build_object('source', 'sql'))"
        )
    with kongtask_worker(runs_db, tasks_file) as worker:
        wait_until(lambda: run_count(runs_db) == 3, what="the first three jobs to run")
        worker.check_alive()
        # Added while the worker is running (it must wake on jobs:insert).
        with psycopg.connect(runs_db, autocommit=True) as conn:
            conn.execute(
                "select graphile_worker.add_job('py_record', "
                "json_build_object('source', 'sql-live'), queue_name := 'sql-q', "
                "max_attempts := 7)"
            )
        with WorkerUtils(runs_db) as utils:
            utils.add_job("py_record", {"source": "worker_utils-live"}, priority=-1)
        # (c) Node graphile-worker's addJob, quickAddJob and addJobAdhoc.
        script = tmp_path / "add_jobs.js"
        script.write_text(NODE_ADD_JOBS, encoding="utf-8")
        module = graphile_worker_dir() / "node_modules" / "graphile-worker"
        env = cli_env()
        env["DATABASE_URL"] = to_uri(runs_db)
        subprocess.run(
            [gw_cli[0], str(script), str(module)],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        wait_until(lambda: run_count(runs_db) == 9, what="all nine jobs to run")
    recorded = runs(runs_db)
    assert {row["runtime"] for row in recorded} == {"python"}
    assert sorted(row["payload"]["source"] for row in recorded) == sorted(
        [
            "worker_utils",
            "worker_utils-queued",
            "sql",
            "sql-live",
            "worker_utils-live",
            "node-addJob",
            "node-addJob-queued",
            "node-quickAddJob",
            "node-addJobAdhoc",
        ]
    )
    queues = {row["payload"]["source"]: row["queue_name"] for row in recorded}
    assert queues["worker_utils-queued"] == "py-q"
    assert queues["sql-live"] == "sql-q"
    assert queues["node-addJob-queued"] == "node-q"
    assert queues["node-addJob"] is None
    assert all(row["attempts"] == 1 for row in recorded)
    assert job_rows(runs_db) == []


# --- Node runs what kongtask enqueues ----------------------------------------------


def test_node_runs_jobs_added_by_kongtask_including_a_named_queue(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    project = write_node_tasks(tmp_path, ["node_record"])
    with WorkerUtils(runs_db) as utils:
        utils.add_job("node_record", {"n": 0}, priority=1)
        utils.add_jobs([{"identifier": "node_record", "payload": {"n": n}} for n in (1, 2)])
        utils.add_jobs(
            [
                {
                    "identifier": "node_record",
                    "payload": {"n": n, "work_ms": 30},
                    "queue_name": "q1",
                }
                for n in range(10, 16)
            ]
        )
    # A long-running worker: graphile-worker's --once exits as soon as a fetch
    # comes back empty, which a locked named queue causes while its job runs.
    with node_worker(gw_cli, runs_db, project, poll_ms=100) as worker:
        wait_until(lambda: run_count(runs_db) == 9, what="all nine jobs to run in Node")
        wait_until(lambda: not job_rows(runs_db), what="Node to record them as complete")
        worker.check_alive()
    recorded = runs(runs_db)
    assert {row["runtime"] for row in recorded} == {"node"}
    assert sorted(row["payload"]["n"] for row in recorded) == [0, 1, 2, *range(10, 16)]
    queued = [row for row in recorded if row["queue_name"] == "q1"]
    assert len(queued) == 6
    assert_serial(queued)
    assert job_rows(runs_db) == []
    with psycopg.connect(runs_db, autocommit=True) as conn:
        locked = conn.execute(
            "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
        ).fetchone()
    assert locked == (0,)


def test_a_listening_node_worker_runs_a_bulk_batch_woken_by_its_notification(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    """``add_jobs`` of batches big enough for the bulk path (binary COPY): Node runs every
    job; its one notification wakes a worker that polls every 10 minutes."""
    project = write_node_tasks(tmp_path, ["node_record"])
    count = 300
    with node_worker(gw_cli, runs_db, project, jobs=8, poll_ms=600_000) as worker:
        with WorkerUtils(runs_db) as utils:
            # A first job the worker's start-up fetch takes: once it ran, the
            # worker is idle and listening.
            utils.add_job("node_record", {"n": -1})
            wait_until(lambda: run_count(runs_db) == 1, what="Node's first job")
            wait_until(lambda: not job_rows(runs_db), what="Node to complete its first job")
            specs = [
                {
                    "identifier": "node_record",
                    "payload": {"n": n},
                    "priority": n % 3,
                    "flags": ["f"] if n % 7 == 0 else None,
                }
                for n in range(count)
            ]
            assert len(utils.add_jobs(specs)) == count
        wait_until(lambda: run_count(runs_db) == count + 1, what="Node to run the whole batch")
        wait_until(lambda: not job_rows(runs_db), what="Node to record the batch as complete")
        worker.check_alive()
    # A named queue's jobs (Node polls for them once the queue is locked: poll often).
    with WorkerUtils(runs_db) as utils:
        queued = [
            {"identifier": "node_record", "payload": {"n": n}, "queue_name": "bulk_q"}
            for n in range(count, count + 80)
        ]
        assert len(utils.add_jobs(queued)) == len(queued)
    with node_worker(gw_cli, runs_db, project, jobs=8, poll_ms=100) as worker:
        wait_until(lambda: not job_rows(runs_db), what="Node to run the queued batch")
        worker.check_alive()
    recorded = runs(runs_db)
    assert {row["runtime"] for row in recorded} == {"node"}
    assert sorted(row["payload"]["n"] for row in recorded) == list(range(-1, count + 80))
    in_queue = [row for row in recorded if row["queue_name"] == "bulk_q"]
    assert len(in_queue) == 80
    assert_serial(in_queue)


def test_node_runs_a_traced_job_with_its_payload_untouched(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    from kongtask.contrib import otel

    project = write_node_tasks(tmp_path, ["node_record"])
    provider = TracerProvider()
    with (
        otel.instrument(tracer_provider=provider),
        provider.get_tracer("test").start_as_current_span("request"),
        WorkerUtils(runs_db) as utils,
    ):
        job = utils.add_job("node_record", {"n": 7})
    assert job.flags is not None
    assert [flag for flag in job.flags if flag.startswith(otel.TRACE_FLAG_PREFIX)] != []
    run_node_once(runs_db, project)
    (row,) = runs(runs_db)
    assert (row["runtime"], row["payload"]) == ("node", {"n": 7})
    assert job_rows(runs_db) == []
    provider.shutdown()


def test_a_failure_retries_identically_across_runtimes(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    project = write_node_tasks(tmp_path / "node", [], flaky=True)
    tasks_file = write_py_tasks(tmp_path, [], flaky=True)
    with WorkerUtils(runs_db) as utils:
        node_first = utils.add_job("flaky", {"side": "node-first"}, max_attempts=5)
    node_window = (db_now(runs_db), None)
    run_node_once(runs_db, project)  # attempt 1 fails in Node
    node_window = (node_window[0], db_now(runs_db))
    with WorkerUtils(runs_db) as utils:
        py_first = utils.add_job("flaky", {"side": "python-first"}, max_attempts=5)
    py_window = (db_now(runs_db), None)
    run_kongtask_once(runs_db, tasks_file)  # attempt 1 fails in kongtask
    py_window = (py_window[0], db_now(runs_db))
    rows = {row["id"]: row for row in job_rows(runs_db)}
    assert set(rows) == {node_first.id, py_first.id}
    by_node, by_py = rows[node_first.id], rows[py_first.id]
    for row in (by_node, by_py):
        assert row["attempts"] == 1
        assert row["max_attempts"] == 5
        assert row["last_error"] == "flaky failed on attempt 1"
        assert row["locked_at"] is None and row["locked_by"] is None
        assert row["run_at"] > datetime.now(UTC)
    # Both back off by exp(1) seconds from the moment of the failure.
    backoff = timedelta(seconds=math.exp(1))
    for row, (before, after) in ((by_node, node_window), (by_py, py_window)):
        assert before is not None and after is not None
        assert before + backoff <= row["run_at"] <= after + backoff
    assert runs(runs_db) == []
    # The retry runs on the other side: make both runnable now.
    with WorkerUtils(runs_db) as utils:
        utils.reschedule_jobs([node_first.id], run_at=datetime.now(UTC))
    run_kongtask_once(runs_db, tasks_file)
    with WorkerUtils(runs_db) as utils:
        utils.reschedule_jobs([py_first.id], run_at=datetime.now(UTC))
    run_node_once(runs_db, project)
    recorded = {row["payload"]["side"]: row for row in runs(runs_db)}
    assert recorded["node-first"]["runtime"] == "python"
    assert recorded["python-first"]["runtime"] == "node"
    assert recorded["node-first"]["attempts"] == recorded["python-first"]["attempts"] == 2
    assert job_rows(runs_db) == []


# --- mixed fleets ---------------------------------------------------------------------


def test_mixed_fleet_with_disjoint_tasks_runs_each_on_its_own_side(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    project = write_node_tasks(tmp_path / "node", ["node_only"])
    tasks_file = write_py_tasks(tmp_path, ["py_only"])
    with (
        kongtask_worker(runs_db, tasks_file, poll_ms=200),
        node_worker(gw_cli, runs_db, project, poll_ms=200),
    ):
        with WorkerUtils(runs_db) as utils:
            specs = [{"identifier": "py_only", "payload": {"n": n}} for n in range(20)]
            specs += [{"identifier": "node_only", "payload": {"n": n}} for n in range(20)]
            specs += [
                {"identifier": name, "payload": {"n": 100 + n}, "queue_name": f"{name}-q"}
                for n in range(3)
                for name in ("py_only", "node_only")
            ]
            utils.add_jobs(specs)
        wait_until(lambda: run_count(runs_db) == 46, what="all 46 jobs to run")
        # Stop Node only once its completions are recorded (it may drop them on SIGTERM).
        wait_until(lambda: not job_rows(runs_db), what="every job to be done")
    recorded = runs(runs_db)
    assert {(row["task"], row["runtime"]) for row in recorded} == {
        ("py_only", "python"),
        ("node_only", "node"),
    }
    assert sorted(row["payload"]["n"] for row in recorded if row["task"] == "py_only") == sorted(
        [*range(20), 100, 101, 102]
    )
    assert job_rows(runs_db) == []


def test_mixed_fleet_keeps_a_named_queue_serial_across_runtimes(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    project = write_node_tasks(tmp_path / "node", ["shared"])
    tasks_file = write_py_tasks(tmp_path, ["shared"])
    count = 24

    def queued_runs() -> list[dict[str, Any]]:
        return [row for row in runs(runs_db) if row["queue_name"] == "one"]

    # kongtask starts alone and takes the queue; Node joins while the queue is busy;
    # then kongtask stops (gracefully, mid-queue) and Node finishes the rest. The
    # side that just ran a queue job usually claims the next one, so this makes
    # sure both sides run jobs of the queue.
    with kongtask_worker(runs_db, tasks_file, jobs=8, poll_ms=50) as python_side:
        with WorkerUtils(runs_db) as utils:
            utils.add_jobs(
                [
                    {
                        "identifier": "shared",
                        "payload": {"n": n, "work_ms": 40},
                        "queue_name": "one",
                    }
                    for n in range(count)
                ]
                # Unqueued jobs for both sides to run meanwhile, in parallel.
                + [{"identifier": "shared", "payload": {"n": 100 + n}} for n in range(count)]
            )
        wait_until(lambda: len(queued_runs()) >= 4, what="kongtask to run queued jobs")
        with node_worker(gw_cli, runs_db, project, jobs=8, poll_ms=50):
            wait_until(lambda: len(queued_runs()) >= 10, what="more queued jobs to run")
            assert python_side.stop() == 0, python_side.output()
            assert len(queued_runs()) < count
            # Wait for the jobs to be gone, not just run: graphile-worker 0.17.3 may
            # exit on SIGTERM before it has recorded a finished job as complete.
            wait_until(lambda: not job_rows(runs_db), what="every job to be done")
    recorded = runs(runs_db)
    queued = [row for row in recorded if row["queue_name"] == "one"]
    assert sorted(row["payload"]["n"] for row in queued) == list(range(count))
    assert {row["runtime"] for row in queued} == {"python", "node"}
    assert_serial(queued)
    assert job_rows(runs_db) == []
    with psycopg.connect(runs_db, autocommit=True) as conn:
        locked = conn.execute(
            "select count(*) from graphile_worker._private_job_queues where locked_at is not null"
        ).fetchone()
    assert locked == (0,)


def test_payloads_round_trip_between_runtimes(
    runs_db: str, tmp_path: Path, gw_cli: list[str]
) -> None:
    """Unicode, nesting and numbers enqueued in Python arrive unchanged in Node."""
    project = write_node_tasks(tmp_path, ["node_record"])
    payload = {"text": "héllo ✓ ünïcode", "nested": {"list": [1, 2.5, None, True]}, "n": 7}
    with WorkerUtils(runs_db) as utils:
        utils.add_job("node_record", payload)
    run_node_once(runs_db, project)
    (row,) = runs(runs_db)
    assert row["payload"] == json.loads(json.dumps(payload))
