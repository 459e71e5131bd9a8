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

Children are started with the ``spawn`` method: a child imports the handler
by its module path (falling back to the file a tasks file was loaded from),
so the handler must live at the top level of a module. When a child dies
without an answer, the crash is counted against the job
(``_kongtask_job_crashes``), the attempt fails with a message naming the
signal or exit code, and after ``crash_quarantine_after`` counted crashes the
job is failed for good. The worker never notices anything but a failure.

A handler in a child receives :class:`ChildHelpers`: the job, a logger, an
abort event and its own database connections; nothing of the worker's pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import multiprocessing
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import psycopg

from kongtask.declared import Task, declared
from kongtask.errors import ConfigurationError
from kongtask.job import Job

__all__ = [
    "CRASH_PREFIX",
    "ChildCrashed",
    "ChildError",
    "ChildHelpers",
    "HandlerRef",
    "ProcessTasks",
    "describe_exit",
    "run_in_child",
]

logger = logging.getLogger(__name__)

#: How ``last_error`` starts for an attempt whose child process died; such a
#: job stays a crash suspect, so its next attempt runs in a child again.
CRASH_PREFIX = "kongtask: the process running this job died"

_SPAWN = multiprocessing.get_context("spawn")
#: How often a parent waiting on a child looks at the job's abort event.
_ABORT_POLL_S = 0.2


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

    def load(self) -> Callable[..., Any]:
        """Import the handler (in the child); a Task gives its function."""
        module = sys.modules.get(self.module)
        if module is None:
            try:
                spec = importlib.util.find_spec(self.module)
            except (ImportError, ValueError):
                spec = None
            if spec is None and self.file is not None:
                spec = importlib.util.spec_from_file_location(self.module, self.file)
                if spec is None or spec.loader is None:
                    raise ImportError(f"cannot load {self.module} from {self.file}")
                module = importlib.util.module_from_spec(spec)
                sys.modules[self.module] = module
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module(self.module)
        found: Any = module
        for part in self.qualname.split("."):
            found = getattr(found, part)
        task = declared(found)
        return task.fn if task is not None else found


class ChildHelpers:
    """What a handler in a child process gets as ``helpers``: the job, a logger, an abort
    event and connections of its own (``with_connection``, ``query``)."""

    def __init__(self, job: Job, worker_id: str, conninfo: str) -> None:
        self.job = job
        self.worker_id = worker_id
        self._conninfo = conninfo
        self.abort_event = threading.Event()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that names the job and the worker."""
        return logging.LoggerAdapter(
            logging.getLogger("kongtask.job"),
            {"job_id": self.job.id, "worker_id": self.worker_id},
        )

    @contextlib.contextmanager
    def with_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A fresh autocommit connection to the worker's database, closed afterwards."""
        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            yield conn

    def query(self, statement: Any, params: Any = None) -> list[Any]:
        """Run one statement on a fresh connection; its rows (empty when it returns none)."""
        with self.with_connection() as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []


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


def _call(ref: HandlerRef, payload: Any, job: Job, worker_id: str, conninfo: str) -> Any:
    handler = ref.load()
    helpers = ChildHelpers(job, worker_id, conninfo)
    if inspect.iscoroutinefunction(handler):
        return asyncio.run(handler(payload, helpers))
    return handler(payload, helpers)


def _portable(result: Any) -> Any:
    """``result`` with exceptions in a batch result turned into :class:`ChildError`."""
    if type(result) is list:
        return [
            ChildError(str(item) or type(item).__name__)
            if isinstance(item, BaseException)
            else item
            for item in result
        ]
    return result


def _outcome(ref: HandlerRef, payload: Any, job: Job, worker_id: str, conninfo: str) -> Any:
    """Run the handler; ``("ok", result)`` or ``("error", message, traceback)``."""
    try:
        return ("ok", _portable(_call(ref, payload, job, worker_id, conninfo)))
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        return ("error", str(exc) or type(exc).__name__, text)


def _child_main(
    ref: HandlerRef, payload: Any, job: Job, worker_id: str, conninfo: str, pipe: Connection
) -> None:
    """The body of a one-job child: run the handler and send the outcome back."""
    outcome = _outcome(ref, payload, job, worker_id, conninfo)
    try:
        pipe.send(outcome)
    except Exception as exc:
        pipe.send(("error", f"the handler's result could not be sent back: {exc}", ""))
    pipe.close()


def _unpack(outcome: Any) -> Any:
    if outcome[0] == "ok":
        return outcome[1]
    raise ChildError(outcome[1], outcome[2])


def run_in_child(
    ref: HandlerRef,
    payload: Any,
    job: Job,
    worker_id: str,
    conninfo: str,
    abort_event: threading.Event,
) -> Any:
    """Run the handler in a child process of its own and return its result.

    Raises :class:`ChildError` when the handler raised, :class:`ChildCrashed`
    when the child died without an answer; when ``abort_event`` is set the
    child is terminated and the attempt fails.
    """
    receive, send = _SPAWN.Pipe(duplex=False)
    child = _SPAWN.Process(
        target=_child_main,
        args=(ref, payload, job, worker_id, conninfo, send),
        name=f"kongtask-job-{job.id}",
        daemon=True,
    )
    try:
        child.start()
        send.close()
        while True:
            ready = wait([receive, child.sentinel], timeout=_ABORT_POLL_S)
            if receive in ready or (ready and receive.poll()):
                try:
                    return _unpack(receive.recv())
                except EOFError:
                    break  # the child died with the pipe open and nothing in it
            if ready:
                break
            if abort_event.is_set():
                child.terminate()
                child.join(5)
                raise RuntimeError("aborted: the child process running the job was terminated")
        child.join(5)
        raise ChildCrashed(describe_exit(child.exitcode))
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
            child.join(5)
        if child.pid is not None:
            child.close()


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
                self._pool = ProcessPoolExecutor(self._max_workers, mp_context=_SPAWN)
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
        pool = self._current()
        try:
            future: Future[Any] = pool.submit(_outcome, ref, payload, job, worker_id, conninfo)
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
