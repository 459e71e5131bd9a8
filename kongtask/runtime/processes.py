"""Several worker processes on one host, under one supervisor process.

CPU-bound handlers in one process share one GIL; N worker processes do not.
The supervisor starts N fresh interpreters (``python -m kongtask WORKER-ARGS``,
never a fork of a process that holds threads or connections), each a full
worker with its own pool, executors and pool id. Only process 0 runs the
crontab (the others get ``--no-crontab``), so cron fires once per host.

A process that dies while the run goes on is started again after a back-off
(:func:`kongtask.runtime.backoff.backoff_s`) that grows with each death in a
row and starts over once a process has lived ``stable_after_s``. SIGTERM and
SIGINT are forwarded (the workers drain; a second one makes them stop now),
SIGHUP too (process 0 re-reads its crontab). The supervisor returns once
every process has exited after a stop: 0, or 1 when a process failed fatally
(a usage error, a failure while stopping, a failed run-once).

Children start in a process group of their own, so a terminal's Ctrl-C reaches
them once, through the supervisor; each child watches the supervisor's pid and
drains if the supervisor disappears (see ``KONGTASK_SUPERVISOR_PID``).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

from kongtask.errors import ConfigurationError
from kongtask.runtime.backoff import backoff_s
from kongtask.runtime.os_signals import HANDLED, can_install

__all__ = [
    "PROCESS_INDEX_ENV",
    "SUPERVISOR_PID_ENV",
    "ProcessSupervisor",
    "run_processes",
]

logger = logging.getLogger(__name__)

#: Set in each child: its index, 0 to N-1 (0 runs the crontab).
PROCESS_INDEX_ENV = "KONGTASK_PROCESS_INDEX"
#: Set in each child: the supervisor's pid; a child whose parent changes drains.
SUPERVISOR_PID_ENV = "KONGTASK_SUPERVISOR_PID"

#: The worker's exit status for a command line it refuses: restarting cannot help.
_EXIT_USAGE = 2
#: Exit statuses of a child that a forwarded stop signal ended before it could drain.
_STOPPED_BY_SIGNAL = {-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGINT}
#: How often the supervisor looks at its children when no signal arrives.
_POLL_S = 0.1


def _describe_exit(returncode: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with status {returncode}"


@dataclass
class _Slot:
    """One of the N places a worker process runs in, across its restarts."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    #: Deaths in a row (reset once a process lived ``stable_after_s``).
    deaths: int = 0
    #: When to start the next process (monotonic), if one is due.
    restart_at: float | None = None
    done: bool = False


class ProcessSupervisor:
    """Runs ``processes`` kongtask workers, each ``python -m kongtask *worker_args``.

    ``worker_args`` are the worker's command-line flags (``--tasks``, ``-c``,
    ``-j``, ``--crontab``, ``--once``...; not ``--processes``). Tasks are loaded
    by each child from ``--tasks`` (or ./tasks), as a fresh interpreter cannot
    receive functions. ``run()`` blocks until every child has exited after a
    stop (or, with ``--once``, after each has run what was runnable).
    """

    def __init__(
        self,
        processes: int,
        worker_args: Sequence[str] = (),
        *,
        restart_base_s: float = 0.5,
        restart_cap_s: float = 30.0,
        stable_after_s: float = 10.0,
        python: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
            raise ConfigurationError(
                f"processes must be an integer of at least 1, got {processes!r}", name="processes"
            )
        if isinstance(worker_args, str) or not all(isinstance(a, str) for a in worker_args):
            raise ConfigurationError(
                f"worker_args must be a sequence of strings, got {worker_args!r}",
                name="worker_args",
            )
        for arg in worker_args:
            if arg == "--processes" or arg.startswith("--processes="):
                raise ConfigurationError(
                    "worker_args cannot hold --processes: the supervisor starts the processes",
                    name="worker_args",
                )
        for name, value in (
            ("restart_base_s", restart_base_s),
            ("restart_cap_s", restart_cap_s),
            ("stable_after_s", stable_after_s),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(
                    f"{name} must be a number of seconds above 0, got {value!r}", name=name
                )
        self.processes = processes
        self.worker_args = list(worker_args)
        self.once = "--once" in self.worker_args
        self._restart_base_s = float(restart_base_s)
        self._restart_cap_s = float(restart_cap_s)
        self._stable_after_s = float(stable_after_s)
        self._python = python or sys.executable
        self._env = dict(os.environ if env is None else env)
        self._slots = [_Slot(index) for index in range(processes)]
        self._control: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = False
        self._failed = False
        self._previous: dict[int, Any] = {}

    # --- what callers see ---------------------------------------------------------------

    def pids(self) -> list[int | None]:
        """The pid of the process in each slot now (None while it is down)."""
        return [
            slot.proc.pid if slot.proc is not None and slot.proc.poll() is None else None
            for slot in self._slots
        ]

    def stop(self) -> None:
        """Drain every worker and end the run (as SIGTERM does; safe from any thread)."""
        self._control.put(signal.SIGTERM)

    def reload(self) -> None:
        """Ask every worker to reload (as SIGHUP does; safe from any thread)."""
        self._control.put(signal.SIGHUP)

    def command(self, index: int) -> list[str]:
        """The command line of the process in slot ``index``."""
        argv = [self._python, "-m", "kongtask", *self.worker_args]
        if index > 0:
            argv.append("--no-crontab")
        return argv

    def run(self, *, install_signal_handlers: bool = True) -> int:
        """Start the processes and supervise them until all have exited; the exit status.

        With ``install_signal_handlers`` (and on the main thread) SIGTERM, SIGINT
        and SIGHUP are caught and forwarded to the workers.
        """
        if install_signal_handlers and can_install():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        try:
            logger.info(
                "Supervisor (pid %d) starting %d kongtask worker process(es)%s",
                os.getpid(),
                self.processes,
                " in run-once mode" if self.once else "",
            )
            for slot in self._slots:
                self._spawn(slot)
            return self._supervise()
        finally:
            self._end_children()
            for handled, previous in self._previous.items():
                signal.signal(handled, previous if previous is not None else signal.SIG_DFL)
            self._previous.clear()

    # --- the loop -------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._control.put(signum)

    def _supervise(self) -> int:
        while not all(slot.done for slot in self._slots):
            try:
                signum = self._control.get(timeout=self._next_wait())
            except queue.Empty:
                pass
            else:
                self._handle(signum)
            now = time.monotonic()
            for slot in self._slots:
                self._check(slot, now)
        status = 1 if self._failed else 0
        logger.info("Supervisor: every worker process has exited (status %d)", status)
        return status

    def _next_wait(self) -> float:
        """Until the next due restart, at most one polling period."""
        due = [s.restart_at for s in self._slots if s.restart_at is not None and not s.done]
        if not due:
            return _POLL_S
        return max(0.0, min(_POLL_S, min(due) - time.monotonic()))

    def _handle(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            logger.info("Supervisor: %s received; forwarding it to the workers", name)
        else:
            again = self._stopping
            self._stopping = True
            logger.info(
                "Supervisor: %s received; %s",
                name,
                "forwarding it again (the workers stop now)"
                if again
                else "forwarding it to the workers (they drain)",
            )
            for slot in self._slots:
                if slot.proc is None and not slot.done:
                    slot.done, slot.restart_at = True, None  # a pending restart is dropped
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signum)

    def _check(self, slot: _Slot, now: float) -> None:
        if slot.done:
            return
        if slot.proc is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
            return
        returncode = slot.proc.poll()
        if returncode is None:
            return
        pid, lived = slot.proc.pid, now - slot.started_at
        slot.proc = None
        how = _describe_exit(returncode)
        if self._stopping:
            slot.done = True
            if returncode == 0 or returncode in _STOPPED_BY_SIGNAL:
                logger.info("Worker process %d (pid %d) %s", slot.index, pid, how)
            else:
                self._failed = True
                logger.error("Worker process %d (pid %d) %s while stopping", slot.index, pid, how)
            return
        if returncode == 0:
            slot.done = True
            logger.info(
                "Worker process %d (pid %d) %s%s",
                slot.index,
                pid,
                how,
                "" if self.once else " on its own; it is not restarted",
            )
            return
        if self.once or returncode == _EXIT_USAGE:
            slot.done, self._failed = True, True
            logger.error(
                "Worker process %d (pid %d) %s; %s",
                slot.index,
                pid,
                how,
                "run-once processes are not restarted"
                if self.once
                else "its command line is refused, so every worker is stopped",
            )
            if not self.once:
                self._control.put(signal.SIGTERM)
            return
        if lived >= self._stable_after_s:
            slot.deaths = 0
        delay = backoff_s(
            slot.deaths, base_s=self._restart_base_s, factor=2.0, cap_s=self._restart_cap_s
        )
        slot.deaths += 1
        slot.restart_at = now + delay
        logger.error(
            "Worker process %d (pid %d) %s after %.1f s; restarting it in %.2f s "
            "(death %d in a row)",
            slot.index,
            pid,
            how,
            lived,
            delay,
            slot.deaths,
        )

    def _spawn(self, slot: _Slot) -> None:
        env = dict(self._env)
        env[PROCESS_INDEX_ENV] = str(slot.index)
        env[SUPERVISOR_PID_ENV] = str(os.getpid())
        slot.restart_at = None
        try:
            # A process group of its own: a terminal's Ctrl-C reaches the child once, via us.
            slot.proc = subprocess.Popen(self.command(slot.index), env=env, process_group=0)
        except OSError as exc:
            slot.deaths += 1
            delay = backoff_s(
                slot.deaths, base_s=self._restart_base_s, factor=2.0, cap_s=self._restart_cap_s
            )
            slot.restart_at = time.monotonic() + delay
            logger.error(
                "Could not start worker process %d (%s); trying again in %.2f s",
                slot.index,
                exc,
                delay,
            )
            return
        slot.started_at = time.monotonic()
        logger.info(
            "Started worker process %d (pid %d)%s",
            slot.index,
            slot.proc.pid,
            ", which runs the crontab if any" if slot.index == 0 else ", without cron",
        )

    def _end_children(self) -> None:
        """On the way out (also after an error here): no child outlives the supervisor."""
        for slot in self._slots:
            proc = slot.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_processes(
    processes: int,
    worker_args: Sequence[str] = (),
    *,
    install_signal_handlers: bool = True,
    restart_base_s: float = 0.5,
    restart_cap_s: float = 30.0,
    stable_after_s: float = 10.0,
) -> int:
    """Run ``processes`` kongtask workers (``python -m kongtask *worker_args``) under a
    supervisor in this process until they have all exited; returns the exit status.

    See :class:`ProcessSupervisor`; ``kongtask --processes N`` calls this.
    """
    supervisor = ProcessSupervisor(
        processes,
        worker_args,
        restart_base_s=restart_base_s,
        restart_cap_s=restart_cap_s,
        stable_after_s=stable_after_s,
    )
    return supervisor.run(install_signal_handlers=install_signal_handlers)
