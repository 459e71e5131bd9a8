"""The kongtask command in a subprocess: migrate, version, flag errors, a first start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask import __version__
from tests.conftest import REPO, to_uri


def kongtask(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kongtask", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        check=False,
    )


@contextmanager
def unanswered_server() -> Iterator[tuple[str, socket.socket]]:
    """A connection URL whose "server" never answers, and its listening socket.

    Nobody accepts: a client's connection waits in the backlog, so after the
    client has exited ``listener.accept()`` tells whether it ever connected.
    """
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield f"postgresql://kt@127.0.0.1:{listener.getsockname()[1]}/app", listener


def assert_never_connected(listener: socket.socket) -> None:
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.accept()[0].close()


def refused_before_connecting(*args: str, cwd: Path) -> list[str]:
    """Run ``kongtask -c URL ARGS`` in ``cwd``; it must exit 1 without connecting.

    Returns the lines it wrote on stderr (stdout must be empty).
    """
    with unanswered_server() as (url, listener):
        result = kongtask("-c", url, "--connect-timeout", "2", *args, cwd=cwd)
        assert_never_connected(listener)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    return result.stderr.splitlines()


def migrations(conninfo: str, schema: str = "graphile_worker") -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo) as conn:
        return conn.execute(
            psycopg.sql.SQL("select id, breaking from {}.migrations order by id").format(
                psycopg.sql.Identifier(schema)
            )
        ).fetchall()


def test_schema_only_migrates_and_says_so(empty_db_url: str) -> None:
    result = kongtask("-c", to_uri(empty_db_url), "--schema-only")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Schema updated"
    rows = migrations(empty_db_url)
    assert [row[0] for row in rows] == list(range(1, 20))
    assert {row[0] for row in rows if row[1]} == {1, 3, 11, 13, 14, 16, 19}


def test_schema_flag_and_environment(empty_db_url: str) -> None:
    result = kongtask("-c", to_uri(empty_db_url), "-s", "from_flag", "--schema-only")
    assert result.returncode == 0, result.stderr
    env = {"GRAPHILE_WORKER_SCHEMA": "from_env", "DATABASE_URL": to_uri(empty_db_url)}
    result = kongtask("--schema-only", env=env)
    assert result.returncode == 0, result.stderr
    assert len(migrations(empty_db_url, "from_flag")) == 19
    assert len(migrations(empty_db_url, "from_env")) == 19


def test_version() -> None:
    result = kongtask("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kongtask {__version__}"


def test_unknown_flag_is_an_error() -> None:
    result = kongtask("--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


def test_conflicting_flags() -> None:
    result = kongtask("--once", "--schema-only")
    assert result.returncode == 2
    assert "Cannot specify both --once and --schema-only" in result.stderr


def test_bad_number_is_an_error() -> None:
    result = kongtask("-j", "zero")
    assert result.returncode == 2
    assert "--jobs expects an integer" in result.stderr


def test_bad_connection_fails_cleanly_without_traceback() -> None:
    result = kongtask("-c", "postgresql://postgres@127.0.0.1:1/nothing", "--schema-only")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "kongtask: error:" in result.stderr


# --- a new user's first hour ---------------------------------------------------------


def test_no_tasks_refuses_to_start_and_says_where_it_looked(tmp_path: Path) -> None:
    assert refused_before_connecting(cwd=tmp_path) == [
        f"kongtask: error: no tasks found: looked for {tmp_path / 'tasks'} (a folder) and "
        f"{tmp_path / 'tasks.py'}; give --tasks PATH "
        "(for a cron node without tasks: kongtask cron run --crontab FILE)"
    ]


def test_a_crontab_without_tasks_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "crontab").write_text("* * * * * hello\n")
    [line] = refused_before_connecting(cwd=tmp_path)
    assert line.startswith("kongtask: error: no tasks found: looked for ")
    assert line.endswith("(for a cron node without tasks: kongtask cron run --crontab FILE)")


@pytest.mark.parametrize(
    ("layout", "flag", "found"),
    [
        ("folder", None, "no .py file defining 'task' in {path}"),
        ("folder", "tasks", "no .py file defining 'task' in {path}"),
        (
            "file",
            "tasks.py",
            "{path} defines no tasks (neither 'tasks' entries nor public functions)",
        ),
    ],
)
def test_tasks_that_define_nothing_are_refused(
    tmp_path: Path, layout: str, flag: str | None, found: str
) -> None:
    if layout == "folder":
        path = tmp_path / "tasks"
        path.mkdir()
        (path / "_private.py").write_text("def task(payload, helpers):\n    pass\n")
    else:
        path = tmp_path / "tasks.py"
        path.write_text("import os\nLIMIT = 3\n")
    lines = refused_before_connecting(*(["--tasks", flag] if flag else []), cwd=tmp_path)
    shown = path if flag is None else Path(flag)
    assert lines == [
        f"kongtask: error: no tasks found: {found.format(path=shown)}; "
        "give --tasks PATH (for a cron node without tasks: kongtask cron run --crontab FILE)"
    ]


def test_a_taken_metrics_port_fails_before_connecting(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text("def hello(payload, helpers):\n    pass\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        lines = refused_before_connecting("--metrics-port", str(port), cwd=tmp_path)
    assert lines == [
        f"kongtask: error: --metrics-port {port}: address already in use (host 127.0.0.1)"
    ]


def test_a_syntax_error_in_a_tasks_file_names_file_line_and_error(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.py"
    tasks.write_text("import os\n\ndef hello(payload, helpers:\n    pass\n")
    # Not a repr of the exception's arguments: "SyntaxError('...', ('/x/tasks.py', 3, ...))".
    assert refused_before_connecting("--tasks", str(tasks), cwd=tmp_path) == [
        f"kongtask: error: tasks file \"{tasks}\", line 3: '(' was never closed (SyntaxError)"
    ]


def test_an_error_raised_while_importing_tasks_names_the_line(tmp_path: Path) -> None:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "hello.py").write_text("import os\nLIMIT = int(os.environ['NO_SUCH_VARIABLE'])\n")
    assert refused_before_connecting(cwd=tmp_path) == [
        f'kongtask: error: tasks file "{folder / "hello.py"}", line 2: '
        "KeyError: 'NO_SUCH_VARIABLE'"
    ]


@pytest.mark.parametrize(
    ("args", "prog", "error"),
    [
        (["--bogus"], "kongtask", "unrecognized arguments: --bogus"),
        (["-j", "zero"], "kongtask", "argument -j/--jobs: --jobs expects an integer, got 'zero'"),
        (["--once", "--schema-only"], "kongtask", "Cannot specify both --once and --schema-only"),
        (["status", "--bogus"], "kongtask status", "unrecognized arguments: --bogus"),
        (["jobs"], "kongtask jobs", "the following arguments are required: COMMAND"),
        (["jobs", "list", "--state", "x"], "kongtask jobs list", "argument --state: invalid"),
        (["crontab", "next", "f", "-n", "0"], "kongtask crontab", "-n must be between 1 and"),
        (["cron", "history", "-n", "0"], "kongtask cron", "--limit must be at least 1, got 0"),
        (["admin"], "kongtask admin", "the following arguments are required: COMMAND"),
        (["dashboard", "--port", "x"], "kongtask dashboard", "argument --port: invalid int"),
    ],
)
def test_argument_errors_are_one_line_and_a_hint(args: list[str], prog: str, error: str) -> None:
    result = kongtask(*args)
    assert result.returncode == 2
    assert "usage:" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(f"{prog}: error: {error}"), lines
    assert lines[1] == f"try '{prog} --help'"


def test_the_license_is_mit_and_ships_with_the_package() -> None:
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the kongtask authors" in text
    dist = metadata.distribution("kongtask")
    assert dist.metadata["License"] == "MIT"
    # Reinstall ('pip install -e .') if this fails on a checkout installed earlier.
    assert "LICENSE" in (dist.metadata.get_all("License-File") or [])
    shipped = [f for f in dist.files or [] if f.name == "LICENSE"]
    assert [f.read_text() for f in shipped] == [text]
