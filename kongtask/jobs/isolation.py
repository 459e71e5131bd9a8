"""Running a handler in a child process, so that a crash costs the child, not the worker.

Three kinds of run leave the worker's process:

- a task declared ``isolate=True`` runs every attempt in a child of its own;
- a *suspect* (a job released from a pool that died holding it, see
  :mod:`kongtask.jobs.quarantine`) runs in a child of its own, when its
  handler can be imported by the child;
- a task declared ``executor="process"`` runs in a reusable pool of child
  processes (CPU-bound work, outside the worker's GIL); a pool broken by a
  dying child is replaced, and the jobs it was running fail as crash
  suspects, so their next attempt runs alone in a child and any further
  crash is counted against the job that caused it.

A one-job child runs :mod:`kongtask.jobs.child_main`: a fork of the zygote
(:mod:`kongtask.jobs.zygote`, itself a fresh interpreter of the standard
library alone), or on platforms without one a fresh interpreter. Like
multiprocessing's ``spawn`` it shares no threads or locks with the worker, but
it never runs the worker's main script again, so a script without a
``__main__`` guard cannot start a second worker inside it. The process pool is
``ProcessPoolExecutor`` with ``spawn``, which does import the main module
again: a worker script with ``executor="process"`` tasks must start its worker
under ``if __name__ == "__main__":`` (a Runner refuses to start in such a
child, see :func:`starting_in_spawned_child`). Either way the child imports the
handler by its module path (falling back to the file a tasks file was loaded
from), so the handler must live at the top level of a module. When a child dies
without an answer, the crash is counted against the job
(``_kongtask_job_crashes``), the attempt fails with a message naming the signal
or exit code, and after ``crash_quarantine_after`` counted crashes the job is
failed for good. The worker never notices anything but a failure.

A handler in a child receives :class:`ChildHelpers`: the job, a logger, an
abort event and its own database connections; nothing of the worker's pool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from kongtask.declared import Task
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.jobs import child_main
from kongtask.jobs.child_main import ERROR_ITEM
from kongtask.jobs.zygote import ForkedChild, Zygote, ZygoteGone, supported, wait_or_kill

if TYPE_CHECKING:
    from concurrent.futures import Future, ProcessPoolExecutor

__all__ = [
    "CRASH_PREFIX",
    "ChildCrashed",
    "ChildError",
    "ChildProcess",
    "Children",
    "HandlerRef",
    "ProcessTasks",
    "describe_exit",
    "starting_in_spawned_child",
]

logger = logging.getLogger(__name__)

#: How ``last_error`` starts for an attempt whose child process died; such a
#: job stays a crash suspect, so its next attempt runs in a child again.
CRASH_PREFIX = "kongtask: the process running this job died"

#: How often a parent waiting on a child looks at the job's abort event.
_ABORT_POLL_S = 0.2

#: The ``nice`` program, which lowers a child's priority from its first instruction
#: (None: the child lowers its own once its interpreter is up).
_NICE = shutil.which("nice")


class ChildCrashed(Exception):
    """The process running a job died before answering (the message says how)."""


class ChildError(Exception):
    """An exception a handler raised in a child process, carried back as text."""

    def __init__(self, message: str, remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_traceback = remote_traceback


@dataclass(frozen=True, slots=True)
class HandlerRef:
    """Where a child finds a handler: its module, its qualified name, the module's file."""

    module: str
    qualname: str
    file: str | None

    @classmethod
    def of(cls, handler: Callable[..., Any]) -> HandlerRef:
        """The reference of ``handler``; ConfigurationError saying why a child cannot import it."""
        fn = handler.fn if isinstance(handler, Task) else handler
        module_name = getattr(fn, "__module__", None)
        qualname = getattr(fn, "__qualname__", None)
        if not isinstance(module_name, str) or not isinstance(qualname, str):
            raise ConfigurationError(
                f"{fn!r} has no module and name a child process could import it by",
                name="handler",
                value=fn,
            )
        if "<locals>" in qualname or "<lambda>" in qualname:
            raise ConfigurationError(
                f"{module_name}.{qualname} is defined inside a function (or is a lambda); "
                "a child process imports a handler by module path, so define it at the top "
                "level of a module",
                name="handler",
                value=fn,
            )
        if module_name == "__main__":
            raise ConfigurationError(
                f"{qualname} is defined in the __main__ script; a child process imports a "
                "handler by module path, so move it into a module of its own",
                name="handler",
                value=fn,
            )
        module = sys.modules.get(module_name)
        file = getattr(module, "__file__", None) if module is not None else None
        found: Any = module
        for part in qualname.split("."):
            found = getattr(found, part, None)
        same = found is handler or found is fn
        if not same and not (isinstance(found, Task) and found.fn is fn):
            raise ConfigurationError(
                f"{module_name}.{qualname} does not name this handler at module level "
                "(it was replaced or renamed); a child process imports a handler by module "
                "path, so keep it under its own name at the top level of a module",
                name="handler",
                value=fn,
            )
        return cls(module_name, qualname, file if isinstance(file, str) else None)

    @classmethod
    def maybe(cls, handler: Callable[..., Any]) -> HandlerRef | None:
        """As :meth:`of`, or None when the handler cannot be imported by a child."""
        try:
            return cls.of(handler)
        except ConfigurationError:
            return None

    def as_tuple(self) -> tuple[str, str, str | None]:
        """What a child needs to import it (see :func:`kongtask.jobs.child_main.load_handler`)."""
        return (self.module, self.qualname, self.file)


def starting_in_spawned_child() -> bool:
    """True while a multiprocessing child is importing the parent's main module.

    A Runner started then would be a second worker inside a process-pool child.
    """
    # A spawned child imports multiprocessing before the main module; a worker
    # that never imported it is no such child (and need not import it to know).
    mp = sys.modules.get("multiprocessing")
    return (
        mp is not None
        and mp.parent_process() is not None
        and bool(getattr(mp.current_process(), "_inheriting", False))
    )


def describe_exit(exitcode: int | None) -> str:
    """How a child ended, in words: the signal that killed it, or its exit code."""
    if exitcode is None:
        return "vanished"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"killed by {name}"
    return f"exited with code {exitcode} before answering"


def _job_fields(job: Job) -> dict[str, Any]:
    return {field.name: getattr(job, field.name) for field in dataclasses.fields(job)}


def _unpack(outcome: Any) -> Any:
    """The result of a child's outcome, or its handler's exception as :class:`ChildError`."""
    if outcome[0] != "ok":
        raise ChildError(outcome[1], outcome[2])
    result = outcome[1]
    if type(result) is list:
        return [
            ChildError(item[1])
            if type(item) is tuple and len(item) == 2 and item[0] == ERROR_ITEM
            else item
            for item in result
        ]
    return result


class ChildProcess:
    """A process of its own running jobs one at a time (:mod:`kongtask.jobs.child_main`).

    It is forked by ``zygote`` when one is given (see :mod:`kongtask.jobs.zygote`),
    else a fresh interpreter. Requests go down its stdin as pickles; each outcome
    comes back on a pipe of its own, length first. If the pipe closes before a
    whole outcome came, the child died running that job, and its exit status says
    how. ``niceness`` above 0 lowers the child's CPU priority from its start (a
    fresh interpreter's through ``nice``, so that its start-up, most of its cost,
    is already at the lower priority).
    """

    def __init__(self, niceness: int = 0, zygote: Zygote | None = None) -> None:
        self.niceness = niceness
        self._proc: subprocess.Popen[bytes] | ForkedChild
        read_fd, write_fd = os.pipe()
        try:
            if zygote is not None:
                self._proc, self._stdin = _forked(zygote, write_fd, niceness)
            else:
                self._proc, self._stdin = _spawned(write_fd, niceness)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._read_fd = read_fd
        self._buffer = b""
        self._send(pickle.dumps([p for p in sys.path if isinstance(p, str)]))

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._proc.pid

    def _send(self, data: bytes) -> bool:
        try:
            self._stdin.write(data)
            self._stdin.flush()
            return True
        except (BrokenPipeError, ValueError):
            return False  # it died: its exit status says how

    def _receive(self, abort_event: threading.Event | None) -> bytes | None:
        """The next whole message from the child; None when its pipe closed first."""
        need, header = 8, None
        while True:
            if len(self._buffer) >= need:
                if header is None:
                    header = need = int.from_bytes(self._buffer[:8], "big")
                    self._buffer = self._buffer[8:]
                    continue
                data, self._buffer = self._buffer[:need], self._buffer[need:]
                return data
            readable, _, _ = select.select([self._read_fd], [], [], _ABORT_POLL_S)
            if readable:
                chunk = os.read(self._read_fd, 1 << 16)
                if not chunk:
                    return None  # it closed its end without a whole message: it died
                self._buffer += chunk
            elif abort_event is not None and abort_event.is_set():
                self.close(kill=True)
                raise RuntimeError("aborted: the child process running the job was killed")

    def ready(self) -> bool:
        """Ask an idle child whether it still answers (one round trip); False: it died idle."""
        return self._send(pickle.dumps(None)) and self._receive(None) == b""

    def call(self, request: bytes, abort_event: threading.Event) -> Any:
        """Send one job and wait for its outcome (ChildCrashed when the child dies)."""
        if self._send(request):
            data = self._receive(abort_event)
            if data is not None:
                return _unpack(pickle.loads(data))
        exitcode = self._proc.wait()
        self.close()
        raise ChildCrashed(describe_exit(exitcode))

    def close(self, *, kill: bool = False) -> None:
        """End the child (it exits when its stdin closes; ``kill``: at once)."""
        if kill and self._proc.poll() is None:
            self._proc.kill()
        with contextlib.suppress(OSError, ValueError):
            self._stdin.close()
        wait_or_kill(self._proc)
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1


def _spawned(write_fd: int, niceness: int) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
    """A fresh interpreter writing its outcomes to ``write_fd``, and its stdin."""
    argv = [sys.executable, child_main.__file__, str(write_fd)]
    if niceness > 0:
        argv = [_NICE, "-n", str(niceness), *argv] if _NICE else [*argv, str(niceness)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        pass_fds=(write_fd,),
        # Out of the terminal's process group: a Ctrl-C is the worker's to
        # handle (it kills running children on abort), not an idle child's.
        start_new_session=True,
    )
    assert proc.stdin is not None
    return proc, proc.stdin


def _forked(zygote: Zygote, write_fd: int, niceness: int) -> tuple[ForkedChild, IO[bytes]]:
    """A child forked by ``zygote`` writing its outcomes to ``write_fd``, and its stdin."""
    stdin_r, stdin_w = os.pipe()
    try:
        child = zygote.fork(stdin_r, write_fd, niceness)
    except BaseException:
        os.close(stdin_w)
        raise
    finally:
        os.close(stdin_r)
    return child, os.fdopen(stdin_w, "wb")


class Children:
    """One-job-at-a-time children: a fresh one per run, or reused ones kept idle.

    New children are forks of a zygote (:mod:`kongtask.jobs.zygote`, started on
    the first child) where the platform has one, else fresh interpreters. Reuse
    saves even the fork and the handler module's import; a crash is still the
    crash of the one job the child was running.
    """

    def __init__(self, keep: int, *, zygote: bool = True) -> None:
        self._keep = keep
        self._idle: list[ChildProcess] = []
        self._lock = threading.Lock()
        self._closed = False
        self._use_zygote = zygote and supported()
        self._zygote: Zygote | None = None

    def _new_child(self, niceness: int) -> ChildProcess:
        """A child forked by the zygote, or a fresh interpreter when there is none."""
        with self._lock:
            if self._zygote is not None and self._zygote.owner != os.getpid():
                self._zygote = None  # this process is a fork of the one that started it
            if self._use_zygote and self._zygote is None and not self._closed:
                try:
                    self._zygote = Zygote()
                except OSError as exc:
                    self._use_zygote = False
                    logger.warning("Could not start the zygote for child processes: %s", exc)
            zygote = self._zygote
        if zygote is not None:
            try:
                return ChildProcess(niceness, zygote)
            except ZygoteGone as exc:
                with self._lock:
                    if self._zygote is zygote:
                        self._zygote, self._use_zygote = None, False
                logger.warning(
                    "The zygote of child processes stopped answering (%s); each child is "
                    "a fresh interpreter from now on",
                    exc,
                )
                zygote.close()
        return ChildProcess(niceness)

    def run(
        self,
        ref: HandlerRef,
        payload: Any,
        job: Job,
        worker_id: str,
        conninfo: str,
        abort_event: threading.Event,
        *,
        reuse: bool,
        niceness: int = 0,
    ) -> Any:
        """Run the handler in a child and return its result (see :class:`ChildProcess`);
        the child runs at ``niceness`` (a reused one was started at the same)."""
        request = pickle.dumps((ref.as_tuple(), payload, _job_fields(job), worker_id, conninfo))
        child: ChildProcess | None = None
        while reuse and child is None:
            with self._lock:
                same = [c for c in self._idle if c.niceness == niceness]
                if not same:
                    break
                child = same[-1]
                self._idle.remove(child)
            if not child.ready():
                # It died idle (killed from outside): no job to blame for that.
                child.close()
                child = None
        if child is None:
            child = self._new_child(niceness)
        ok = False
        try:
            result = child.call(request, abort_event)
            ok = True
            return result
        except ChildError:
            ok = True
            raise
        finally:
            if ok and reuse:
                with self._lock:
                    if not self._closed and len(self._idle) < self._keep:
                        self._idle.append(child)
                        child = None
            if child is not None:
                child.close()

    def close(self) -> None:
        """End every idle child, then the zygote."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            zygote, self._zygote = self._zygote, None
        for child in idle:
            child.close()
        if zygote is not None:
            zygote.close()


class ProcessTasks:
    """The reusable process pool of ``executor="process"`` tasks (created on first use)."""

    def __init__(self, max_workers: int) -> None:
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False

    def _current(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError("the process pool is shut down (the worker is stopping)")
            if self._pool is None:
                # Imported here: most workers never run a task in the process pool.
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                spawn = multiprocessing.get_context("spawn")
                self._pool = ProcessPoolExecutor(self._max_workers, mp_context=spawn)
            return self._pool

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
                logger.warning("A child of the process pool died; replacing the pool")
        broken.shutdown(wait=False, cancel_futures=True)

    def run(
        self,
        ref: HandlerRef,
        payload: Any,
        job: Job,
        worker_id: str,
        conninfo: str,
        abort_event: threading.Event,
    ) -> Any:
        """Run the handler on the pool; :class:`ChildCrashed` when the pool broke under it."""
        from concurrent.futures.process import BrokenProcessPool

        pool = self._current()
        try:
            future: Future[Any] = pool.submit(
                child_main.run_job, ref.as_tuple(), payload, _job_fields(job), worker_id, conninfo
            )
            while True:
                try:
                    return _unpack(future.result(timeout=_ABORT_POLL_S))
                except TimeoutError:
                    if abort_event.is_set():
                        future.cancel()
                        raise RuntimeError(
                            "aborted: stopped waiting for the process pool running the job"
                        ) from None
        except BrokenProcessPool as exc:
            self._replace(pool)
            raise ChildCrashed(
                f"a process of the process pool died while it ran this job or another "
                f"({exc}); the pool was replaced"
            ) from None

    def shutdown(self) -> None:
        """Stop the pool's children (running ones are not waited for)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
