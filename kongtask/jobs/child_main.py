"""What runs inside a child process: one job's handler, away from the worker.

Run as a script (``python .../kongtask/jobs/child_main.py FD [NICENESS]``), it is a
one-job-at-a-time child of :class:`kongtask.jobs.isolation.ChildProcess`: the
parent writes pickles to its stdin (the parent's ``sys.path``, then one job
after another, or ``None`` to ask whether it still answers: an empty message
says yes) and it writes each pickled outcome, length first, to file
descriptor ``FD``; it exits when its stdin closes. If it dies first, the
parent sees no whole outcome and reads the exit status instead. A
``NICENESS`` above 0 lowers the child's CPU priority by that much before it
reads its first job (a suspect's child whose parent found no ``nice`` program, see
:mod:`kongtask.jobs.isolation`).

This module imports nothing of kongtask and only the standard library at the
top (``asyncio`` only for a coroutine handler), so a child starts in a
fraction of the time the worker took (the handler's module imports what it
needs), and a fresh interpreter never runs the worker's main script again (as
``multiprocessing``'s spawn would), so a script without a ``__main__`` guard
cannot start a second worker inside it.
The process pool of ``executor="process"`` tasks calls :func:`run_job` too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import pickle
import socket
import sys
import threading
import traceback
import types

#: ``typing.TYPE_CHECKING`` without importing ``typing`` (a few ms of every child's start).
TYPE_CHECKING = False
if TYPE_CHECKING:  # the annotations only
    from collections.abc import Callable, Iterator
    from typing import Any, BinaryIO, NoReturn

#: Marks an exception item of a batch result (carried back as its text).
ERROR_ITEM = "__kongtask_child_error_item__"


class ChildJob:
    """The job a child runs: the worker's job fields as attributes (``id``, ``payload``, …)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)

    def __repr__(self) -> str:
        return f"ChildJob(id={self.__dict__.get('id')!r})"


class ChildHelpers:
    """What a handler in a child process gets as ``helpers``: the job, a logger, an abort
    event and connections of its own (``with_connection``, ``query``); nothing of the
    worker's pool."""

    def __init__(self, job: ChildJob, worker_id: str, conninfo: str) -> None:
        self.job = job
        self.worker_id = worker_id
        self._conninfo = conninfo
        self.abort_event = threading.Event()

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that names the job and the worker."""
        return logging.LoggerAdapter(
            logging.getLogger("kongtask.job"),
            {"job_id": getattr(self.job, "id", None), "worker_id": self.worker_id},
        )

    @contextlib.contextmanager
    def with_connection(self) -> Iterator[Any]:
        """A fresh autocommit connection to the worker's database, closed afterwards."""
        import psycopg

        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            yield conn

    def query(self, statement: Any, params: Any = None) -> list[Any]:
        """Run one statement on a fresh connection; its rows (empty when it returns none)."""
        with self.with_connection() as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description is not None else []


def load_handler(module_name: str, qualname: str, file: str | None) -> Callable[..., Any]:
    """Import a handler by module path (else from the module's file); a Task gives its fn."""
    module = sys.modules.get(module_name)
    if module is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            spec = None
        if spec is None and file is not None:
            spec = importlib.util.spec_from_file_location(module_name, file)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {module_name} from {file}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part)
    fn = getattr(found, "fn", None)  # a kongtask.Task: the function it declares
    return fn if type(found).__name__ == "Task" and callable(fn) else found  # type: ignore[no-any-return]


def run_job(
    ref: tuple[str, str, str | None],
    payload: Any,
    job: dict[str, Any],
    worker_id: str,
    conninfo: str,
) -> tuple[Any, ...]:
    """Run one job's handler: ``("ok", result)`` or ``("error", message, traceback)``."""
    try:
        handler = load_handler(*ref)
        helpers = ChildHelpers(ChildJob(job), worker_id, conninfo)
        result = handler(payload, helpers)
        if isinstance(result, types.CoroutineType):  # an async handler's call
            import asyncio  # only here: it is most of a plain child's start-up

            result = asyncio.run(result)
        if type(result) is list:
            result = [
                (ERROR_ITEM, str(item) or type(item).__name__)
                if isinstance(item, BaseException)
                else item
                for item in result
            ]
        return ("ok", result)
    except BaseException as exc:
        text = "".join(traceback.format_exception(exc))
        return ("error", str(exc) or type(exc).__name__, text)


def serve(out: BinaryIO, stdin: BinaryIO) -> None:
    """Read jobs from ``stdin`` until it closes; write each outcome to ``out``."""
    sys.path[:] = pickle.load(stdin)
    while True:
        try:
            request = pickle.load(stdin)
        except EOFError:
            break
        if request is None:  # are you there? (before reuse)
            out.write(b"\0" * 8)
            out.flush()
            continue
        outcome = run_job(*request)
        try:
            data = pickle.dumps(outcome)
        except Exception as exc:
            data = pickle.dumps(
                ("error", f"the handler's result could not be sent back: {exc}", "")
            )
        out.write(len(data).to_bytes(8, "big") + data)
        out.flush()


def zygote(sock: socket.socket) -> None:
    """Fork one-job children on the worker's request, until its end of ``sock`` closes.

    A request is ``S<niceness>`` with two descriptors (the child's stdin and its
    outcome pipe); the answer is the child's pid. ``W<pid>`` asks, without
    waiting, whether that child has exited: ``-`` while it runs, else its exit
    status as :class:`subprocess.Popen` gives it (a negative signal number).
    Only the worker's question reaps a child, so a pid is never reused while the
    worker may still signal it. A fork of this single-threaded process costs a
    few milliseconds, where a fresh interpreter costs tens.
    """
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(sock, 64, 2)
        except InterruptedError:
            continue
        if not message:
            return  # the worker closed its end (or died)
        kind, number = message[:1], int(message[1:])
        if kind == b"S":
            pid = os.fork()
            if pid == 0:
                _forked_child(sock, number, fds)
            for fd in fds:
                os.close(fd)
            sock.send(str(pid).encode())
        elif kind == b"W":
            try:
                done, status = os.waitpid(number, os.WNOHANG)
            except ChildProcessError:
                done, status = number, 255 << 8  # not ours (any more): say it failed
            if done == 0:
                sock.send(b"-")
            else:
                sock.send(str(os.waitstatus_to_exitcode(status)).encode())
        else:
            sock.send(b"?")  # not a request of ours: answer, so nobody waits for ever


def _forked_child(sock: socket.socket, niceness: int, fds: list[int]) -> NoReturn:
    """A child forked by the zygote: serve jobs on the descriptors it was sent, then exit
    (never return into the zygote's loop)."""
    code = 1
    try:
        sock.close()
        os.setsid()  # out of the zygote's session, as a spawned child is
        if niceness > 0:
            os.nice(niceness)
        stdin_fd, out_fd = fds
        with os.fdopen(stdin_fd, "rb") as stdin, os.fdopen(out_fd, "wb") as out:
            serve(out, stdin)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def main() -> None:
    """``FD [NICENESS]``: serve jobs from stdin, outcomes to FD; ``--zygote FD``: fork
    children on the requests of the socket FD."""
    if sys.argv[1] == "--zygote":
        zygote(socket.socket(fileno=int(sys.argv[2])))
        return
    out = os.fdopen(int(sys.argv[1]), "wb")
    if len(sys.argv) > 2 and int(sys.argv[2]) > 0:
        os.nice(int(sys.argv[2]))
    serve(out, sys.stdin.buffer)


if __name__ == "__main__":
    main()
