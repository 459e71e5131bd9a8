"""Declared tasks without a database: their job specs, a worker's task map and the CLI loader."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import kongtask
from kongtask import ConfigurationError, InvalidJobError, JobSpec, TaskLoadError
from kongtask.declared import declared
from kongtask.jobs.enqueue import _checked_batch
from kongtask.jobs.task_loader import load_tasks
from kongtask.runner import _check_tasks


@kongtask.task(queue="reports", priority=5, max_attempts=3, job_key_mode="preserve_run_at")
def build_report(payload: Any, helpers: Any) -> str:
    return f"report {payload['n']}"


@kongtask.task
def ping(payload: Any, helpers: Any) -> str:
    return "pong"


def test_spec_takes_the_declared_defaults() -> None:
    spec = build_report.spec({"n": 1})
    assert (spec.identifier, spec.queue_name, spec.priority, spec.max_attempts) == (
        "build_report",
        "reports",
        5,
        3,
    )
    # job_key_mode concerns keyed jobs only.
    assert spec.job_key_mode is None
    assert build_report.spec(job_key="r:1").job_key_mode == "preserve_run_at"


def test_arguments_given_win_over_the_declaration() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    spec = build_report.spec(
        {"n": 2},
        queue_name="urgent",
        priority=-1,
        max_attempts=9,
        job_key="r:2",
        job_key_mode="replace",
        run_at=at,
        flags=["slow"],
    )
    assert (spec.queue_name, spec.priority, spec.max_attempts, spec.job_key_mode) == (
        "urgent",
        -1,
        9,
        "replace",
    )
    assert (spec.run_at, spec.flags, spec.job_key) == (at, ("slow",), "r:2")


def test_an_undeclared_default_stays_unset() -> None:
    spec = ping.spec()
    assert (spec.identifier, spec.queue_name, spec.priority, spec.max_attempts) == (
        "ping",
        None,
        None,
        None,
    )


def test_a_mapping_spec_may_name_its_task_by_declaration() -> None:
    spec = JobSpec.coerce({"identifier": build_report, "payload": {"n": 3}, "priority": 1})
    assert (spec.identifier, spec.queue_name, spec.priority) == ("build_report", "reports", 1)
    # In a batch the bad field is still named with its index.
    with pytest.raises(InvalidJobError, match="index 1: priority") as info:
        _checked_batch([build_report.spec(), {"identifier": build_report, "priority": "x"}], False)
    assert info.value.field == "priority"


def test_a_keyed_batch_job_of_a_task_declaring_a_mode_is_refused() -> None:
    # add_jobs has one mode for the whole call; the declaration's mode cannot apply.
    with pytest.raises(InvalidJobError, match="job_key_preserve_run_at"):
        _checked_batch([build_report.spec(job_key="k")], True)
    assert _checked_batch([build_report.spec()], False) != []


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"priority": 40000}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"queue": ""}, "queue"),
        ({"job_key_mode": "merge"}, "job_key_mode"),
        ({"name": "x" * 129}, "name"),
    ],
)
def test_a_bad_declaration_fails_when_made(options: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigurationError, match=f"task .*: {name} ") as info:
        kongtask.task(**options)(ping.fn)
    assert info.value.name == name


def test_worker_tasks_from_a_list_are_keyed_by_name() -> None:
    tasks = _check_tasks([build_report, ping])
    assert tasks == {"build_report": build_report, "ping": ping}
    assert tasks["ping"]({}, None) == "pong"
    assert _check_tasks(iter([ping])) == {"ping": ping}


def test_worker_tasks_mapping_may_hold_declared_tasks() -> None:
    def plain(payload: Any, helpers: Any) -> None:
        pass

    assert _check_tasks({"build_report": build_report, "plain": plain}) == {
        "build_report": build_report,
        "plain": plain,
    }


def test_a_declared_task_under_another_key_is_refused_naming_both() -> None:
    with pytest.raises(ConfigurationError, match=r"'report'.*'build_report'") as info:
        _check_tasks({"report": build_report})
    assert info.value.name == "tasks"


def test_a_task_listed_twice_is_refused() -> None:
    other = kongtask.task(name="ping")(build_report.fn)
    with pytest.raises(ConfigurationError, match=r"tasks\[1\].*'ping' a second time"):
        _check_tasks([ping, other])


def test_a_list_of_plain_functions_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"tasks\[0\] is not a declared task"):
        _check_tasks([build_report.fn])
    with pytest.raises(ConfigurationError, match="mapping of task identifier"):
        _check_tasks("ping")


def test_the_handler_checks_apply_to_the_declared_function() -> None:
    def gen(payload: Any, helpers: Any) -> Any:
        yield payload

    async def agen(payload: Any, helpers: Any) -> Any:
        yield payload

    async def coro(payload: Any, helpers: Any) -> None:
        pass

    with pytest.raises(ConfigurationError, match="generator function"):
        _check_tasks([kongtask.task(gen)])
    with pytest.raises(ConfigurationError, match="async generator function"):
        _check_tasks([kongtask.task(agen)])
    assert list(_check_tasks([kongtask.task(coro)])) == ["coro"]  # async handlers run


def test_the_loader_picks_up_declared_tasks_by_their_names(tmp_path: Path) -> None:
    file = tmp_path / "declared_jobs.py"
    file.write_text(
        "import kongtask\n"
        "from kongtask.testing import running\n"  # an imported name is not a task
        "@kongtask.task(name='reports:build', priority=2)\n"
        "def build(payload, helpers):\n    return 'built'\n"
        "def hello(payload, helpers):\n    return 'hi'\n"
    )
    tasks = load_tasks(str(file))
    assert sorted(tasks) == ["hello", "reports:build"]
    declaration = declared(tasks["reports:build"])
    assert declaration is not None and declaration.priority == 2
    assert tasks["reports:build"]({}, None) == "built"


def test_the_loader_leaves_declared_tasks_imported_from_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "shared_declared.py").write_text(
        "import kongtask\n@kongtask.task\ndef shared(payload, helpers):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "shared_declared", raising=False)
    file = tmp_path / "worker_tasks.py"
    file.write_text(
        "import kongtask\n"
        "from shared_declared import shared\n"
        "@kongtask.task\ndef own(payload, helpers):\n    shared.defer\n"
    )
    assert list(load_tasks(str(file))) == ["own"]
    sys.modules.pop("shared_declared", None)


def test_the_loader_takes_a_tasks_list(tmp_path: Path) -> None:
    file = tmp_path / "listed.py"
    file.write_text(
        "import kongtask\n"
        "@kongtask.task\ndef a(payload, helpers):\n    pass\n"
        "@kongtask.task\ndef b(payload, helpers):\n    pass\n"
        "tasks = [a]\n"
    )
    assert list(load_tasks(str(file))) == ["a"]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            "@kongtask.task(name='x')\ndef a(p, h):\n    pass\ntasks = {'y': a}\n",
            "maps 'y' to the declared task 'x'",
        ),
        (
            "@kongtask.task(name='x')\ndef a(p, h):\n    pass\ntasks = [a, a]\n",
            r"tasks\[1\] declares task 'x' a second time",
        ),
        ("def a(p, h):\n    pass\ntasks = [a]\n", r"tasks\[0\] is not a declared task"),
        (
            "@kongtask.task(name='a')\ndef b(p, h):\n    pass\ndef a(p, h):\n    pass\n",
            "'a' and 'b' both define task 'a'",
        ),
    ],
)
def test_the_loader_refuses_conflicting_declarations(
    tmp_path: Path, source: str, message: str
) -> None:
    file = tmp_path / "conflict.py"
    file.write_text("import kongtask\n" + source)
    with pytest.raises(TaskLoadError, match=message):
        load_tasks(str(file))


def test_a_folder_task_must_be_declared_under_its_path(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "send.py").write_text(
        "import kongtask\n@kongtask.task(name='email/send', max_attempts=2)\n"
        "def task(payload, helpers):\n    return 'sent'\n"
    )
    tasks = load_tasks(str(tmp_path))
    assert list(tasks) == ["email/send"]
    assert tasks["email/send"]({}, None) == "sent"

    (tmp_path / "ping.py").write_text(
        "import kongtask\n@kongtask.task\ndef task(payload, helpers):\n    pass\n"
    )
    with pytest.raises(TaskLoadError, match=r"declares task 'task'.*name='ping'"):
        load_tasks(str(tmp_path))
