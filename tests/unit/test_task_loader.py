"""Task handlers load from files, modules and folders the way the CLI documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from kongtask import TaskLoadError
from kongtask.jobs.task_loader import default_tasks_path, load_tasks


def test_file_with_tasks_mapping(tmp_path: Path) -> None:
    file = tmp_path / "jobs.py"
    file.write_text(
        "def _send(payload, helpers):\n    return 'sent'\n\n"
        "def unrelated():\n    pass\n\n"
        "tasks = {'email:send': _send}\n"
    )
    tasks = load_tasks(str(file))
    assert list(tasks) == ["email:send"]
    assert tasks["email:send"]({}, None) == "sent"


def test_file_without_mapping_exposes_public_functions(tmp_path: Path) -> None:
    file = tmp_path / "plain.py"
    file.write_text(
        "from os.path import join\n"
        "def hello(payload, helpers):\n    return payload\n"
        "def _private(payload, helpers):\n    pass\n"
    )
    assert sorted(load_tasks(str(file))) == ["hello"]


def test_folder_names_nested_tasks_with_slashes(tmp_path: Path) -> None:
    (tmp_path / "email").mkdir()
    (tmp_path / "email" / "send-welcome.py").write_text(
        "def task(payload, helpers):\n    return 1\n"
    )
    (tmp_path / "ping.py").write_text("def task(payload, helpers):\n    return 2\n")
    (tmp_path / "_shared.py").write_text("VALUE = 3\n")
    tasks = load_tasks(str(tmp_path))
    assert sorted(tasks) == ["email/send-welcome", "ping"]
    assert tasks["email/send-welcome"]({}, None) == 1


def test_folder_file_without_task_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text("def run(payload, helpers):\n    pass\n")
    with pytest.raises(TaskLoadError, match="does not define a 'task' function"):
        load_tasks(str(tmp_path))


def test_import_error_is_reported_with_the_file(tmp_path: Path) -> None:
    file = tmp_path / "bad.py"
    file.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(TaskLoadError, match=r"bad\.py.*boom"):
        load_tasks(str(file))


def test_a_syntax_error_in_a_module_the_tasks_import_names_that_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = tmp_path / "kt_broken_helper_mod.py"
    helper.write_text("LIMIT = 3\nif LIMIT >\n    pass\n")
    tasks = tmp_path / "t.py"
    tasks.write_text("import kt_broken_helper_mod\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskLoadError) as raised:
        load_tasks(str(tasks))
    assert str(raised.value) == (
        f'"{helper}", line 2 (imported by tasks file "{tasks}"): invalid syntax (SyntaxError)'
    )


def test_non_callable_in_mapping(tmp_path: Path) -> None:
    file = tmp_path / "m.py"
    file.write_text("tasks = {'x': 42}\n")
    with pytest.raises(TaskLoadError, match="'x' is not callable"):
        load_tasks(str(file))


def test_dotted_module_and_missing_things(tmp_path: Path) -> None:
    assert "dumps" in load_tasks("json")
    with pytest.raises(TaskLoadError, match="could not import"):
        load_tasks("surely_not_a_module_xyz")
    with pytest.raises(TaskLoadError, match="does not exist"):
        load_tasks(str(tmp_path / "missing.py"))


def test_default_tasks_path(tmp_path: Path) -> None:
    assert default_tasks_path(tmp_path) is None
    (tmp_path / "tasks.py").write_text("")
    assert default_tasks_path(tmp_path) == str(tmp_path / "tasks.py")
