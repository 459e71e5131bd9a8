"""The supervisor's configuration and the children's command lines (no process started)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

import kongtask
from kongtask.ops.cli.main import _without_processes, main
from kongtask.runtime.processes import ProcessSupervisor


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"processes": 0}, "processes"),
        ({"processes": True}, "processes"),
        ({"processes": "2"}, "processes"),
        ({"processes": 2, "worker_args": "--once"}, "worker_args"),
        ({"processes": 2, "worker_args": ["--processes", "3"]}, "worker_args"),
        ({"processes": 2, "worker_args": ["--processes=3"]}, "worker_args"),
        ({"processes": 2, "worker_args": [1]}, "worker_args"),
        ({"processes": 2, "restart_base_s": 0}, "restart_base_s"),
        ({"processes": 2, "restart_cap_s": -1.0}, "restart_cap_s"),
        ({"processes": 2, "stable_after_s": float("nan")}, "stable_after_s"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(kongtask.ConfigurationError) as caught:
        ProcessSupervisor(**kwargs)
    assert caught.value.name == name
    assert name in str(caught.value)


def test_only_process_zero_keeps_the_crontab() -> None:
    supervisor = kongtask.ProcessSupervisor(3, ["--tasks", "t.py", "--crontab", "c"])
    prefix = [sys.executable, "-m", "kongtask", "--tasks", "t.py", "--crontab", "c"]
    assert supervisor.command(0) == prefix
    assert supervisor.command(1) == [*prefix, "--no-crontab"]
    assert supervisor.command(2) == [*prefix, "--no-crontab"]
    assert not supervisor.once
    assert kongtask.ProcessSupervisor(2, ["--once"]).once


def test_children_get_the_flags_as_typed_less_processes() -> None:
    typed = ["-c", "x", "--processes", "4", "--log-format", "json", "--processes=2", "-j", "3"]
    assert _without_processes(typed) == ["-c", "x", "--log-format", "json", "-j", "3"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--processes", "0"], "--processes must be at least 1"),
        (["--processes", "2", "--schema-only"], "--processes runs workers"),
        (["--processes", "2", "--cleanup", "GC_JOB_QUEUES"], "--processes runs workers"),
    ],
)
def test_cli_refuses_processes_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_processes_on_the_embedded_server(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("DATABASE_URL", "PGDATABASE"):
        monkeypatch.delenv(name, raising=False)
    tasks = tmp_path / "tasks.py"
    tasks.write_text("def work(payload, helpers):\n    pass\n")
    assert main(["--tasks", str(tasks), "--processes", "2"]) == 1
    err = capsys.readouterr().err
    assert "--processes needs a database to share" in err
    assert "Started worker process" not in err
