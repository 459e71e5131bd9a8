"""The embedded PostgreSQL really starts, stops, keeps its data and widens no folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

import kongtask
from kongtask.db.conninfo import open_database
from kongtask.db.embedded import EmbeddedPostgres
from kongtask.errors import EmbeddedServerError

IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="needs root (pgserver's system-user mode)")
user_only = pytest.mark.skipif(IS_ROOT, reason="needs an ordinary user (run without root)")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def parent() -> Iterator[Path]:
    """A world-traversable folder under /tmp (pytest's tmp_path is 0700 when root)."""
    folder = Path(tempfile.mkdtemp(prefix="kt_embedded_", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for pid_file in folder.glob("*/postmaster.pid"):  # a failed test's leftover server
            pid = int(pid_file.read_text().split()[0])
            subprocess.run(["kill", "-TERM", str(pid)], check=False)
            assert_gone(pid)
        shutil.rmtree(folder, ignore_errors=True)


def assert_gone(pid: int | None) -> None:
    """Wait (with a deadline) until ``pid`` has exited.

    A zombie counts as exited: it runs nothing, and here PID 1 reaps slowly.
    """
    assert pid is not None
    deadline = time.monotonic() + 10
    try:
        process = psutil.Process(pid)
        while process.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"postgres {pid} still running"
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(0.05)
    except psutil.NoSuchProcess:
        return


def assert_stopped(data_dir: Path, pid: int | None) -> None:
    assert not (data_dir / "postmaster.pid").exists()
    assert not (data_dir / ".s.PGSQL.5432").exists()
    assert_gone(pid)


def test_start_stop_and_restart_keeps_the_data(parent: Path) -> None:
    data_dir = parent / "pg"
    server = EmbeddedPostgres(data_dir)
    conninfo = server.start()
    pid = server.pid
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("create table kept (value text)")
        conn.execute("insert into kept values ('first run')")
    assert (data_dir / ".s.PGSQL.5432").is_socket()
    server.stop()
    assert_stopped(data_dir, pid)
    assert server.conninfo is None

    version_inode = (data_dir / "PG_VERSION").stat().st_ino  # initdb would replace it
    with EmbeddedPostgres(data_dir) as conninfo, psycopg.connect(conninfo) as conn:
        assert conn.execute("select value from kept").fetchall() == [("first run",)]
    assert (data_dir / "PG_VERSION").stat().st_ino == version_inode
    assert not (data_dir / "postmaster.pid").exists()


def test_second_handle_keeps_the_server_until_the_last_stops(parent: Path) -> None:
    data_dir = parent / "pg"
    first, second = EmbeddedPostgres(data_dir), EmbeddedPostgres(data_dir)
    conninfo = first.start()
    assert second.start() == conninfo
    pid = first.pid
    first.stop()
    with psycopg.connect(conninfo) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    second.stop()
    assert_stopped(data_dir, pid)


def test_open_database_runs_the_embedded_server_for_the_block(parent: Path) -> None:
    data_dir = parent / "pg"
    with open_database(environ={"KONGTASK_DATA_DIR": str(data_dir)}) as conninfo:
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("select current_user").fetchone() == ("postgres",)
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    assert_stopped(data_dir, pid)


@pytest.mark.parametrize("owner", ["dead", "alive"])
def test_stale_postmaster_pid_after_a_crash_is_cleared(parent: Path, owner: str) -> None:
    data_dir = parent / "pg"
    with EmbeddedPostgres(data_dir):
        pass
    if owner == "dead":
        finished = subprocess.Popen(["true"])
        finished.wait()
        stale_pid = finished.pid
    else:
        stale_pid = os.getpid()  # alive, but not a postgres: PostgreSQL would refuse to start
    lines = [str(stale_pid), str(data_dir), "1700000000", "5432", str(data_dir), "", "0 0", "ready"]
    (data_dir / "postmaster.pid").write_text("\n".join(lines) + "\n")
    (data_dir / ".s.PGSQL.5432.lock").write_text("\n".join(lines[:3]) + "\n")
    server = EmbeddedPostgres(data_dir)
    with psycopg.connect(server.start()) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
    assert server.pid != stale_pid
    pid = server.pid
    server.stop()
    assert_stopped(data_dir, pid)


def test_handles_of_crashed_processes_do_not_keep_the_server_alive(parent: Path) -> None:
    data_dir = parent / "pg"
    with EmbeddedPostgres(data_dir):
        pass
    finished = subprocess.Popen(["true"])
    finished.wait()
    (data_dir / ".handle_pids.json").write_text(json.dumps([finished.pid]))
    server = EmbeddedPostgres(data_dir)
    server.start()
    pid = server.pid
    server.stop()
    assert_stopped(data_dir, pid)


def test_a_non_empty_foreign_folder_is_refused(parent: Path) -> None:
    data_dir = parent / "pg"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedServerError, match=r"not empty.*notes\.txt"):
        EmbeddedPostgres(data_dir).start()
    assert sorted(p.name for p in data_dir.iterdir()) == ["notes.txt"]


@root_only
def test_root_refuses_a_data_folder_under_a_private_parent(parent: Path) -> None:
    private = parent / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    data_dir = private / "deeper" / "pg"
    with pytest.raises(EmbeddedServerError) as info:
        EmbeddedPostgres(data_dir).start()
    message = str(info.value)
    assert str(private) in message
    assert "KONGTASK_DATA_DIR=/var/lib/kongtask/pg" in message
    assert mode(private) == 0o700
    assert mode(parent) == 0o755
    assert not (private / "deeper").exists()


@root_only
def test_root_refuses_a_parent_that_pgserver_would_make_readable(parent: Path) -> None:
    """o+x alone is not enough: pgserver adds g+rx,o+rx, which would still change 0711."""
    traversable = parent / "home"
    traversable.mkdir()
    traversable.chmod(0o711)
    with pytest.raises(EmbeddedServerError, match="0711"):
        EmbeddedPostgres(traversable / "pg").start()
    assert mode(traversable) == 0o711


@root_only
def test_root_runs_the_server_as_the_pgserver_user(parent: Path) -> None:
    data_dir = parent / "pg"
    with EmbeddedPostgres(data_dir) as conninfo:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert psutil.Process(pid).username() == "pgserver"
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert mode(parent) == 0o755


@root_only
def test_root_refuses_a_data_folder_initialized_by_another_user(parent: Path) -> None:
    data_dir = parent / "pg"
    data_dir.mkdir()
    (data_dir / "PG_VERSION").write_text("18\n")
    shutil.chown(data_dir, user="nobody")
    with pytest.raises(EmbeddedServerError, match="belongs to nobody"):
        EmbeddedPostgres(data_dir).start()
    assert data_dir.owner() == "nobody"  # pgserver would have chowned it to itself


CHILD = """
import json, logging, sys
from pathlib import Path
from kongtask.db.embedded import EmbeddedPostgres
logging.basicConfig(level=logging.WARNING)
server = EmbeddedPostgres(Path(sys.argv[1]))
conninfo = server.start()
print(json.dumps({"pid": server.pid, "conninfo": conninfo}), flush=True)
sys.stdin.readline()
server.stop()
print("stopped", flush=True)
"""


def _python_for(user: str) -> str | None:
    """An interpreter of our version that ``user`` may run (the venv's may live under /root)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (
        sys.executable,
        f"/usr/bin/python{version}",
        f"/usr/local/bin/python{version}",
    ):
        probe = subprocess.run(
            ["runuser", "-u", user, "--", candidate, "-c", "import sys; print(sys.version[:4])"],
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    return None


@root_only
def test_an_ordinary_user_runs_the_server_as_themself_and_widens_nothing(parent: Path) -> None:
    user = "nobody"
    python = _python_for(user)
    if python is None or shutil.which("runuser") is None:
        pytest.skip(f"no python {sys.version_info[:2]} that {user} can run, or no runuser")
    home = parent / "home"
    home.mkdir()
    shutil.chown(home, user=user)
    home.chmod(0o700)
    data_dir = home / "pg"
    # The child imports a copy of kongtask that user can read: the checkout may
    # live in a folder closed to others (say /root).
    source = parent / "src"
    shutil.copytree(
        Path(kongtask.__file__).parent,
        source / "kongtask",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for item in [source, *source.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    path = os.pathsep.join([str(source), sysconfig.get_paths()["purelib"]])
    probe = subprocess.run(
        ["runuser", "-u", user, "--", "env", f"PYTHONPATH={path}", python, "-c", "import psycopg"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"{user} cannot import the installed packages in {path}: {probe.stderr}")
    with subprocess.Popen(
        [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            f"PYTHONPATH={path}",
            python,
            "-c",
            CHILD,
            str(data_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdin is not None
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            started = json.loads(line)
            postmaster = psutil.Process(started["pid"])
            assert postmaster.username() == user
            assert data_dir.owner() == user
            with psycopg.connect(started["conninfo"]) as conn:  # root may use nobody's socket
                assert conn.execute("select 1").fetchone() == (1,)
            assert mode(home) == 0o700
            assert mode(parent) == 0o755
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "stopped"
            assert child.wait(30) == 0
        finally:
            if child.poll() is None:
                child.kill()
    assert_stopped(data_dir, started["pid"])
    assert mode(home) == 0o700


@user_only
def test_as_ordinary_user_the_server_is_ours_and_nothing_is_widened(parent: Path) -> None:
    home = parent / "home"
    home.mkdir(mode=0o700)
    home.chmod(0o700)
    data_dir = home / "pg"
    with EmbeddedPostgres(data_dir) as conninfo:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        assert psutil.Process(pid).uids().real == os.getuid()
        with psycopg.connect(conninfo) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
    assert mode(home) == 0o700
    assert_stopped(data_dir, pid)


@user_only
def test_as_ordinary_user_a_folder_of_someone_else_is_refused() -> None:
    with pytest.raises(EmbeddedServerError, match="belongs to root"):
        EmbeddedPostgres(Path("/")).start()
