"""``kongtask --processes N``: real worker processes under one real supervisor process.

Every scenario starts ``python -m kongtask ... --processes N`` (the supervisor),
whose children are full CLI workers writing to the same log file; handlers
record their pid in the ledger. The supervisor's own log lines ("Started
worker process I (pid P)", "... was killed by SIGKILL ...") say which child is
which.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import to_uri

from .ledger import (
    WorkerProcess,
    check_ledger,
    enqueue,
    install_ledger,
    make_specs,
    scalar,
    wait_until,
    write_tasks,
)

pytestmark = pytest.mark.faults

_READY = re.compile(r"Worker connected and looking for jobs\.\.\. \(pool (\S+),")
_STARTED = re.compile(r"^(\S+) .*Started worker process (\d+) \(pid (\d+)\)", re.M)


def _supervisor(
    db_url: str, tasks: Path, tmp_path: Path, *args: str, processes: int = 2
) -> WorkerProcess:
    return WorkerProcess.cli(
        db_url,
        tasks,
        tmp_path / "supervisor.log",
        jobs=1,
        # One job claimed at a time: two slow jobs go to two children, not one.
        args=["--processes", str(processes), "--local-queue-size", "1", *args],
    )


def _started(sup: WorkerProcess) -> list[tuple[datetime, int, int]]:
    """(when, index, pid) of every child start the supervisor logged, in order."""
    return [
        (datetime.fromisoformat(when.replace("Z", "+00:00")), int(index), int(pid))
        for when, index, pid in _STARTED.findall(sup.log())
    ]


def _wait_ready(sup: WorkerProcess, count: int, timeout_s: float = 60.0) -> None:
    def ready() -> bool:
        if sup.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {sup.proc.returncode}:\n{sup.log()}")
        return len(_READY.findall(sup.log())) >= count

    try:
        wait_until(ready, timeout_s=timeout_s, what=f"{count} worker(s) to say they are ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the log:\n{sup.log()[-4000:]}") from None


def _current_pids(sup: WorkerProcess) -> dict[int, int]:
    """Index -> pid of the latest start of each child."""
    return {index: pid for _, index, pid in _started(sup)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_processes_share_the_queue_and_drain_on_sigterm(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path)
    try:
        _wait_ready(sup, 2)
        children = _current_pids(sup)
        assert sorted(children) == [0, 1] and sup.pid not in children.values()
        enqueue(db, make_specs(60, ms=30))
        wait_until(
            lambda: scalar(db, "select count(*) from public.completions") == 60,
            what="the 60 jobs to complete",
        )
        pids = {row[0] for row in db.execute("select distinct pid from public.ledger")}
        assert pids == set(children.values()), (pids, children)
        check_ledger(db, range(60)).assert_clean()

        # SIGTERM with a slow job running in each child: both finish it, all exit 0.
        enqueue(db, make_specs(4, start=100, ms=1500, mark_start=True))
        wait_until(
            lambda: (
                scalar(db, "select count(distinct pid) from public.ledger where phase = 'start'")
                == 2
            ),
            what="each child to start a slow job",
        )
        sup.send(signal.SIGTERM)
        assert sup.wait(30) == 0, sup.log()
        assert "Supervisor: every worker process has exited (status 0)" in sup.log()
        assert not any(_alive(pid) for pid in children.values())
        started = {
            row[0] for row in db.execute("select n from public.ledger where phase = 'start'")
        }
        finished = {row[0] for row in db.execute("select n from public.ledger where phase = 'ok'")}
        assert len(started) >= 2 and started <= finished
        left = scalar(
            db, "select count(*) from graphile_worker._private_jobs where locked_at is null"
        )
        assert left == scalar(db, "select count(*) from graphile_worker._private_jobs")
        assert left == 4 - len(started & set(range(100, 104)))
    finally:
        sup.close()


def test_a_sigkilled_child_is_restarted_with_back_off(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path)
    try:
        _wait_ready(sup, 2)
        first = _current_pids(sup)[1]
        os.kill(first, signal.SIGKILL)
        _wait_ready(sup, 3)
        assert f"Worker process 1 (pid {first}) was killed by SIGKILL" in sup.log()
        second = _current_pids(sup)[1]
        assert second != first and _alive(second)

        # The restarted child takes jobs like the others.
        enqueue(db, make_specs(60, ms=30))
        wait_until(
            lambda: scalar(db, "select count(*) from public.completions") == 60,
            what="the 60 jobs to complete after the restart",
        )
        pids = {row[0] for row in db.execute("select distinct pid from public.ledger")}
        assert pids == {_current_pids(sup)[0], second}, sup.log()

        # A second death right after the restart waits longer (death 2 in a row).
        os.kill(second, signal.SIGKILL)
        wait_until(
            lambda: len([s for s in _started(sup) if s[1] == 1]) == 3,
            what="the second restart",
        )
        died = re.search(
            rf"^(\S+) .*Worker process 1 \(pid {second}\) was killed by SIGKILL after \S+ s; "
            r"restarting it in (\S+) s \(death 2 in a row\)",
            sup.log(),
            re.M,
        )
        assert died, sup.log()
        announced = float(died.group(2))
        assert 0.5 <= announced < 1.5  # base 0.5 s x 2, jittered by 0.5x to 1.5x
        logged_at = datetime.fromisoformat(died.group(1).replace("Z", "+00:00"))
        restarted_at = _started(sup)[-1][0]
        assert (restarted_at - logged_at).total_seconds() >= announced - 0.05
        _wait_ready(sup, 4)

        sup.send(signal.SIGTERM)
        assert sup.wait(30) == 0, sup.log()
    finally:
        sup.close()


def test_only_process_zero_runs_the_crontab_and_sighup_reaches_every_child(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * work ?id=tick\n")
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path, "--crontab", str(crontab))
    try:
        _wait_ready(sup, 2)
        assert len(re.findall(r"Cron: 1 item\(s\) from crontab file", sup.log())) == 1
        commands = {
            pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for pid in _current_pids(sup).values()
        }
        without_cron = [pid for pid, argv in commands.items() if b"--no-crontab" in argv]
        assert without_cron == [_current_pids(sup)[1]], commands

        sup.send(signal.SIGHUP)
        wait_until(
            lambda: (
                "SIGHUP received; reloading the crontab" in sup.log()
                and "SIGHUP received; no crontab to reload" in sup.log()
            ),
            what="both children to act on the forwarded SIGHUP",
        )
        assert sup.log().count("SIGHUP received; reloading the crontab") == 1
        assert sup.proc.poll() is None and all(_alive(p) for p in commands)

        sup.send(signal.SIGINT)
        assert sup.wait(30) == 0, sup.log()
    finally:
        sup.close()


def test_run_once_runs_every_child_once(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    install_ledger(db)
    enqueue(db, make_specs(40, ms=50))
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path, "--once")
    try:
        assert sup.wait(60) == 0, sup.log()
        check_ledger(db, range(40)).assert_clean()
        assert "in run-once mode" in sup.log()
        assert len(_started(sup)) == 2
    finally:
        sup.close()


def test_a_refused_command_line_stops_the_run_without_restarts(tmp_path: Path) -> None:
    """Children that refuse their flags (exit status 2) are not restarted: status 1."""
    result = subprocess.run(
        [sys.executable, "-c", "import logging, sys, kongtask; logging.basicConfig(level=20); "
         "sys.exit(kongtask.run_processes(2, ['--no-such-flag']))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "its command line is refused" in result.stderr
    assert "restarting it" not in result.stderr
    assert len(re.findall(r"Started worker process", result.stderr)) == 2


def test_children_drain_when_the_supervisor_is_killed(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path)
    try:
        _wait_ready(sup, 2)
        children = list(_current_pids(sup).values())
        sup.send(signal.SIGKILL)
        sup.wait(10)
        wait_until(
            lambda: not any(_alive(pid) for pid in children),
            timeout_s=30,
            what="the orphaned children to stop",
        )
        assert sup.log().count("The supervisor (pid") == 2
        assert scalar(db, "select count(*) from graphile_worker._private_jobs") == 0
    finally:
        sup.close()


def test_bad_tasks_are_reported_once_before_any_child_starts(db_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--processes", "2",
         "--tasks", str(tmp_path / "missing.py")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.count("kongtask: error:") == 1
    assert "Started worker process" not in result.stderr


def test_metrics_ports_are_spread_over_the_children(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """With ``--metrics-port P`` child i serves on P + i."""
    port = _two_free_ports()
    sup = _supervisor(db_url, write_tasks(tmp_path), tmp_path, "--metrics-port", str(port))
    try:
        _wait_ready(sup, 2)
        deadline = time.monotonic() + 30
        for offset in (0, 1):
            wait_until(
                lambda o=offset: _answers(port + o),  # type: ignore[misc]
                timeout_s=max(1.0, deadline - time.monotonic()),
                what=f"/healthz on port {port + offset}",
            )
        sup.send(signal.SIGTERM)
        assert sup.wait(30) == 0, sup.log()
    finally:
        sup.close()


def _two_free_ports() -> int:
    """A port P such that P and P + 1 are both free now."""
    import socket

    for _ in range(100):
        with socket.socket() as low, socket.socket() as high:
            low.bind(("127.0.0.1", 0))
            port = int(low.getsockname()[1])
            try:
                high.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise AssertionError("no two free ports in a row")


def _answers(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def test_ctrl_c_at_a_terminal_drains_each_child_once(
    db_url: str, db: psycopg.Connection[Any], tmp_path: Path
) -> None:
    """A terminal signals its whole foreground group: the children, in groups of their
    own, hear SIGINT once (forwarded), so running jobs finish instead of being forced."""
    install_ledger(db)
    argv = [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--tasks",
            str(write_tasks(tmp_path)), "-j", "1", "--local-queue-size", "1",
            "--poll-interval", "200", "--processes", "2"]  # fmt: skip
    env = {**os.environ, "KONGTASK_LEDGER_URL": to_uri(db_url)}
    log_path = tmp_path / "terminal.log"
    with log_path.open("wb") as log:
        # The supervisor leads a group of its own, as a shell's foreground job does.
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                process_group=0)  # fmt: skip
        try:
            wait_until(
                lambda: log_path.read_text(errors="replace").count("looking for jobs") == 2,
                what="both children to be ready",
            )
            # Each child holds at most two jobs (one running, one buffered), so with
            # four enqueued the other child always finds one, whichever claims first.
            enqueue(db, make_specs(4, ms=2000, mark_start=True))
            wait_until(
                lambda: (
                    scalar(
                        db, "select count(distinct pid) from public.ledger where phase = 'start'"
                    )
                    == 2
                ),
                what="each child to start a slow job",
            )
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    assert text.count("Received SIGINT; shutting down gracefully") == 2, text
    started = [n for (n,) in db.execute("select n from public.ledger where phase = 'start'")]
    assert len(started) == len(set(started)) == 2, started
    # The two running jobs finished; the buffered ones went back unlocked, untouched.
    report = check_ledger(db, started)
    assert report.lost == [] and report.unexpected_repeats == [], report
    assert (report.rows_left, report.job_locks_left, report.queue_locks_left) == (2, 0, 0)
