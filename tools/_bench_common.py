"""Shared pieces of the benchmarks: a scratch database and graphile-worker from npm."""

from __future__ import annotations

import compileall
import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

GRAPHILE_WORKER_VERSION = "0.17.3"
DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("KONGTASK_BENCH_CACHE", Path.home() / ".cache" / "kongtask-bench"))


def installed_python(folder: Path) -> str:
    """A Python with kongtask installed in ``folder`` as ``pip install`` leaves it: from a
    wheel of this checkout, compiled, without the editable-install hook a development
    environment runs at every interpreter start (14-20 ms here, the zygote's start
    included); every other package comes from this interpreter's environment."""
    wheels = folder / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    env = folder / "venv"
    venv.create(env, with_pip=False, symlinks=True)
    paths = {"base": str(env), "platbase": str(env)}
    site = Path(sysconfig.get_path("purelib", vars=paths))
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (site / "zz-kongtask-bench-dependencies.pth").write_text("\n".join(ours) + "\n")
    (wheel,) = wheels.glob("kongtask-*.whl")
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run(
        [*install, str(wheel)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    compileall.compile_dir(str(site / "kongtask"), quiet=1)
    return str(env / "bin" / "python")


def load_average() -> str:
    """The machine's load average over 1, 5 and 15 minutes, as printed by the benchmarks."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def server_url() -> str:
    """The server to create scratch databases on (``KONGTASK_BENCH_URL``, ``DATABASE_URL``)."""
    return os.environ.get("KONGTASK_BENCH_URL") or os.environ.get("DATABASE_URL") or DEFAULT_SERVER


@contextmanager
def scratch_database(server: str) -> Iterator[str]:
    """Create a fresh database (with the schema migrated) and drop it afterwards."""
    from kongtask.db.migrate import migrate

    name = f"kongtask_bench_{secrets.token_hex(6)}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = make_conninfo(server, dbname=name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            migrate(conn, "graphile_worker")
        yield url
    finally:
        with psycopg.connect(server, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


def to_uri(conninfo: str) -> str:
    """A ``postgresql://`` URI for Node's client."""
    params = conninfo_to_dict(conninfo)
    host = params.get("host", "127.0.0.1")
    port = params.get("port", "5432")
    user = params.get("user", "postgres")
    password = params.get("password")
    auth = f"{user}:{password}@" if password else f"{user}@"
    if str(host).startswith("/"):
        return f"postgresql://{auth}/{params['dbname']}?host={host}&port={port}"
    return f"postgresql://{auth}{host}:{port}/{params['dbname']}"


def graphile_worker_dir() -> Path:
    """A folder with graphile-worker 0.17.3 installed from npm (installed on first use)."""
    target = CACHE_DIR / f"graphile-worker-{GRAPHILE_WORKER_VERSION}"
    # The test suite's copy, when it has one, is the same package.
    tests_copy = Path.home() / ".cache" / "kongtask-tests" / target.name
    if not target.exists() and (tests_copy / "node_modules").is_dir():
        target = tests_copy
    cli = target / "node_modules" / "graphile-worker" / "dist" / "cli.js"
    if not cli.exists():
        if shutil.which("npm") is None:
            raise SystemExit("npm is needed for --compare-graphile-worker")
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                "npm",
                "install",
                "--silent",
                "--prefix",
                str(target),
                f"graphile-worker@{GRAPHILE_WORKER_VERSION}",
            ],
            check=True,
        )
    return target


def percentile(sorted_values: list[float], fraction: float) -> float:
    """The value below which ``fraction`` of the (sorted) values fall (nearest rank)."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def fresh_jobs_table(url: str) -> None:
    """Empty the jobs table without dead rows and refresh the planner's statistics.

    ``truncate`` gives the table a new, empty file (no dead rows from an
    earlier drain), and ``vacuum analyze`` leaves both sides with the same
    statistics, so neither drain pays for the other's bloat.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("truncate graphile_worker._private_jobs")
        conn.execute("vacuum analyze graphile_worker._private_jobs")


def enqueue_noop_jobs(url: str, count: int, task: str = "noop") -> None:
    """Add ``count`` jobs through the schema's ``add_jobs`` (untimed), then analyze."""
    import json

    specs = json.dumps([{"identifier": task, "payload": {"id": i}} for i in range(count)])
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "select count(*) from graphile_worker.add_jobs(array("
            "select json_populate_recordset(null::graphile_worker.job_spec, %s::json)))",
            (specs,),
        )
        conn.execute("vacuum analyze graphile_worker._private_jobs")


def summary(values: list[float]) -> tuple[float, float]:
    """(min, median) of a list of figures."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return ordered[0], median


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds: utime + stime + cutime + cstime) of a local process."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    ticks = sum(int(value) for value in fields[11:15])
    return int(fields[1]), ticks / _CLOCK_TICKS


def postmaster_pid(url: str) -> int | None:
    """The local postmaster's pid (parent of this session's backend), or None.

    None when the server is not on this machine (or in another PID namespace):
    the backend's pid must be a local process whose parent is a postgres process.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        # Read while the session (and so its backend process) is still there.
        backend = _proc_stat(int(row[0])) if row is not None else None
    if backend is None:
        return None
    parent = backend[0]
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as cmdline:
            command = cmdline.read()
    except OSError:
        return None
    if b"postgres" not in command and b"postmaster" not in command:
        return None
    return parent


def cluster_cpu_seconds(postmaster: int) -> float | None:
    """CPU seconds the whole PostgreSQL cluster has used so far.

    The postmaster's own time plus its reaped children's (``cutime``/``cstime``:
    backends that exited), plus every live child's (backends, background
    workers, with their reaped children). None if the postmaster is gone or
    unreadable. Every database on the server counts, so on a shared server the
    figure includes other clients' work.
    """
    own = _proc_stat(postmaster)
    if own is None:
        return None
    total = own[1]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            child = _proc_stat(int(entry))
            if child is not None and child[0] == postmaster:
                total += child[1]
    return total
