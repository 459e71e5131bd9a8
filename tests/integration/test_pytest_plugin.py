"""kongtask's pytest plugin: registered by installation, its fixtures, and the docs' example.

The example test on the testing page (docs/testing.md) is extracted and run by pytest in a child
process (``pytester``), twice over in one session and then again in the
opposite order, so its cron and retry tests pass in any order and repeatedly
in one minute.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask import Runner, WorkerUtils
from kongtask.testing import ManualClock
from kongtask.testing.plugin import KongtaskDatabase, WorkerFactory

pytest_plugins = ["pytester"]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "testing.md"
MARKER = "<!-- kongtask: the test suite runs this example -->"


def readme_example() -> str:
    """The Python block that follows the marker on the testing page."""
    text = PAGE.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1, "docs/testing.md must mark exactly one plugin example"
    found = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.DOTALL)
    assert found is not None
    return found.group(1)


def configure(pytester: pytest.Pytester, server_conninfo: str) -> None:
    """Point the child pytest at this suite's server through the plugin's ini option."""
    pytester.makeini(f"[pytest]\nkongtask_database_url = {server_conninfo}\n")


def schema_exists(conninfo: str, schema: str) -> bool:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_namespace where nspname = %s", (schema,)
        ).fetchone()
    assert row is not None
    return bool(row[0])


def test_installing_kongtask_registers_the_plugin(pytestconfig: pytest.Config) -> None:
    names = {entry.name: entry.value for entry in entry_points(group="pytest11")}
    assert names.get("kongtask") == "kongtask.testing.plugin"
    assert pytestconfig.pluginmanager.has_plugin("kongtask")


def test_the_fixtures_share_one_fresh_schema_and_clock(
    kongtask_db: KongtaskDatabase,
    kongtask_clock: ManualClock,
    kongtask_worker: WorkerFactory,
    kongtask_utils: WorkerUtils,
) -> None:
    assert kongtask_db.schema.startswith("kongtask_test_")
    assert kongtask_utils.schema == kongtask_db.schema
    assert kongtask_utils.list_jobs() == []
    seen: list[Any] = []
    worker = kongtask_worker({"note": lambda payload, helpers: seen.append(payload)})
    assert isinstance(worker, Runner)
    job = kongtask_utils.add_job("note", {"n": 1}, run_at=kongtask_clock.now().replace(year=2099))
    worker.join()
    assert seen == []  # not due by the worker's clock
    kongtask_utils.reschedule_jobs([job.id], run_at=kongtask_clock.now())
    worker.join()
    assert seen == [{"n": 1}]


def test_the_readme_example_passes_twice_in_one_session_and_again(
    pytester: pytest.Pytester, server_conninfo: str
) -> None:
    configure(pytester, server_conninfo)
    example = readme_example()
    pytester.makepyfile(test_readme_first=example, test_readme_second=example)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(passed=6)
    # Again at once, every test in the opposite order (pytest keeps the order given).
    names = re.findall(r"^def (test_\w+)", example, re.MULTILINE)
    assert len(names) == 3
    reverse = [
        f"test_readme_{module}.py::{name}"
        for module in ("second", "first")
        for name in reversed(names)
    ]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-v", *reverse, timeout=120)
    result.assert_outcomes(passed=6)
    ran = re.findall(r"^(test_readme_\w+\.py::\w+) PASSED", result.stdout.str(), re.MULTILINE)
    assert ran == reverse


def test_each_test_gets_its_own_schema_dropped_afterwards_and_its_workers_stopped(
    pytester: pytest.Pytester, server_conninfo: str
) -> None:
    configure(pytester, server_conninfo)
    record = pytester.path / "seen.txt"
    pytester.makepyfile(
        f"""
        RECORD = {str(record)!r}

        def remember(kongtask_db, kongtask_worker, kongtask_utils):
            worker = kongtask_worker({{"noop": lambda payload, helpers: None}})
            kongtask_utils.add_job("noop")
            worker.join()
            with open(RECORD, "a") as out:
                out.write(kongtask_db.schema + " " + worker.pool_id + "\\n")

        def test_one(kongtask_db, kongtask_worker, kongtask_utils):
            remember(kongtask_db, kongtask_worker, kongtask_utils)

        def test_two(kongtask_db, kongtask_worker, kongtask_utils):
            remember(kongtask_db, kongtask_worker, kongtask_utils)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=120)
    result.assert_outcomes(passed=2)
    lines = [line.split() for line in record.read_text().splitlines()]
    schemas = {schema for schema, _ in lines}
    assert len(schemas) == 2
    for schema in schemas:
        assert not schema_exists(server_conninfo, schema)
