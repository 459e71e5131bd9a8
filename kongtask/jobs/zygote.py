"""A zygote: one small process that forks the one-job children, so a child costs a fork.

A one-job child (:class:`kongtask.jobs.isolation.ChildProcess`) used to be a
fresh interpreter: tens of milliseconds of CPU before its handler started, and
a dead pool's jobs (the suspects, released together) started a burst of them
at once, each holding a worker slot the while. The zygote is a fresh
interpreter too (``child_main.py --zygote``, standard library only, started
on the first child a worker needs), but it stays: each child is then a fork
of it, which imports only the handler's module.

The zygote is single-threaded, so forking it is safe where forking the worker
is not. The worker sends it the child's two pipe ends over a Unix socket
(``SCM_RIGHTS``) and gets the pid back; the zygote reaps a child only when the
worker asks for its exit status, so the worker may signal the pid until then.
It exits when the worker's end of the socket closes, the worker's death
included. Only on Linux (a ``SOCK_SEQPACKET`` socket pair); elsewhere, or when
the zygote cannot start or has died, children are fresh interpreters as before.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from kongtask.jobs import child_main

__all__ = ["ForkedChild", "Zygote", "supported", "wait_or_kill"]

logger = logging.getLogger(__name__)

#: How often :meth:`ForkedChild.wait` asks the zygote again.
_WAIT_POLL_S = 0.005


def supported() -> bool:
    """Whether this platform can run a zygote (Linux: fork, SCM_RIGHTS, SOCK_SEQPACKET)."""
    return sys.platform == "linux" and hasattr(socket, "SOCK_SEQPACKET")


class ZygoteGone(Exception):
    """The zygote did not answer (it died or never started)."""


class Zygote:
    """The worker's end of the zygote: ask it for children and for their exit status."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, child_main.__file__, "--zygote", str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                # Out of the terminal's process group, like every child (see ChildProcess).
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._lock = threading.Lock()
        #: The process that started it: a fork of the worker must start its own.
        self.owner = os.getpid()

    def _ask(self, message: bytes, fds: list[int] | None = None) -> bytes:
        with self._lock:
            try:
                if fds:
                    socket.send_fds(self._sock, [message], fds)
                else:
                    self._sock.send(message)
                answer = self._sock.recv(64)
            except OSError as exc:
                raise ZygoteGone(str(exc)) from None
        if not answer:
            raise ZygoteGone("the zygote closed its end")
        return answer

    def fork(self, stdin_fd: int, out_fd: int, niceness: int) -> ForkedChild:
        """A new child reading jobs from ``stdin_fd`` and writing outcomes to ``out_fd``
        (both stay open here; the caller closes its copies)."""
        pid = int(self._ask(b"S%d" % niceness, [stdin_fd, out_fd]))
        return ForkedChild(self, pid)

    def status(self, pid: int) -> int | None:
        """The exit status of child ``pid`` (reaping it), or None while it runs."""
        answer = self._ask(b"W%d" % pid)
        return None if answer == b"-" else int(answer)

    def close(self) -> None:
        """End the zygote (children it forked run on until their stdin closes)."""
        self._sock.close()
        wait_or_kill(self._proc)


class ForkedChild:
    """A child the zygote forked, with the part of :class:`subprocess.Popen` that
    :class:`~kongtask.jobs.isolation.ChildProcess` uses."""

    def __init__(self, zygote: Zygote, pid: int) -> None:
        self._zygote = zygote
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit status once it exited, else None."""
        if self.returncode is None:
            try:
                self.returncode = self._zygote.status(self.pid)
            except ZygoteGone:
                # Its parent is gone, so it was reparented and reaped elsewhere; its
                # status is lost. Whether it still runs, signal 0 tells.
                if not _alive(self.pid):
                    self.returncode = 255
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for it to exit; its exit status (TimeoutExpired after ``timeout`` s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = threading.Event()
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"child {self.pid}", timeout or 0.0)
            pause.wait(_WAIT_POLL_S)
        return code

    def kill(self) -> None:
        """SIGKILL it (it stays a zombie of the zygote until :meth:`poll` reaps it)."""
        if self.returncode is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_or_kill(proc: subprocess.Popen[bytes] | ForkedChild, grace_s: float = 5.0) -> None:
    """Wait up to ``grace_s`` for ``proc`` to exit on its own, then SIGKILL it and wait."""
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace_s)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
